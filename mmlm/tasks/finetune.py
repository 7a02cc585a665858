"""Fine-tuning heads on either tower: image / text / token classification and extractive QA.

Each task is an encoder (a tower from a preset or a checkpoint) plus one thin linear
head; ``linear_probe`` freezes the encoder and trains the head alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmlm.data.collators import IGNORE
from mmlm.data.text_datasets import extract_answers
from mmlm.models import CLIP, TextEncoder, TextWithHeads, VisionTransformer
from mmlm.tasks.base import Task, adamw, build_model


def tower(model: str, overrides: dict[str, Any] | None, kind: type[nn.Module]) -> nn.Module:
    """The ``kind`` tower of a preset or checkpoint: a CLIP gives its visual / text tower."""
    loaded = build_model(model, overrides)
    if isinstance(loaded, CLIP):
        loaded = loaded.visual if kind is VisionTransformer else loaded.text
    if isinstance(loaded, TextWithHeads):
        loaded = loaded.encoder
    if not isinstance(loaded, kind):
        raise TypeError(f"{model} gives a {type(loaded).__name__}, this task needs a {kind.__name__}")
    if isinstance(loaded, VisionTransformer):
        loaded.head = nn.Identity()  # the task brings its own head
    return loaded


def accuracy_per_stage(num_classes: int) -> nn.ModuleDict:
    # keys are not "train" / "val": a ModuleDict key may not shadow Module.train
    return nn.ModuleDict(
        {f"{s}_accuracy": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
         for s in ("train", "val")}
    )  # fmt: skip


class _FineTune(Task):
    """Shared: linear probe (frozen encoder in eval mode) and the data module's class count check."""

    encoder: nn.Module

    def __init__(self, linear_probe: bool, optimizer: OptimizerCallable, warmup_steps: int, min_lr_ratio: float):
        super().__init__(optimizer, warmup_steps, min_lr_ratio)
        self.linear_probe = linear_probe

    def freeze_if_probe(self) -> None:
        if self.linear_probe:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.linear_probe:
            self.encoder.eval()
        return self

    def setup(self, stage: str) -> None:
        expected = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        if expected is not None and expected != self.hparams.num_classes:
            raise ValueError(f"the data has {expected} classes, the task num_classes={self.hparams.num_classes}")


class _Classification(_FineTune):
    """One label per sample: cross-entropy and accuracy; subclasses give ``logits(batch)``."""

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self.logits(batch)
        loss = F.cross_entropy(logits, batch["label"])
        accuracy = self.accuracy[f"{stage}_accuracy"]
        accuracy(logits, batch["label"])
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train")
        self.log(f"{stage}/accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def predict_step(self, batch, batch_idx) -> dict[str, torch.Tensor]:
        """Class probabilities and the predicted class (``mmlm predict``)."""
        probs = self.logits(batch).softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1)}


class ImageClassification(_Classification):
    """Fine-tune or linearly probe an image tower (ViT, or a CLIP's visual tower).

    Args:
        model: vision / CLIP preset (random init) or checkpoint (timm ViT, OpenCLIP, HF CLIP, mmlm).
        num_classes: output classes; must equal the data module's.
        linear_probe: freeze the encoder, train only the head.
        model_overrides: preset field overrides.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    def __init__(
        self,
        model: str = "vit-tiny",
        num_classes: int = 10,
        linear_probe: bool = False,
        model_overrides: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(linear_probe, optimizer, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.encoder = tower(model, model_overrides, VisionTransformer)
        self.head = nn.Linear(self.encoder.cfg.width, num_classes)
        self.freeze_if_probe()
        self.accuracy = accuracy_per_stage(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))  # (B, num_classes)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["image"])


class TextClassification(_Classification):
    """Sequence classification on the pooled output of a text tower (BERT, MiniLM, GPT-2, CLIP text).

    Args:
        model: text / CLIP preset (random init) or checkpoint.
        num_classes: output classes; must equal the data module's.
        linear_probe: freeze the encoder, train only the head.
        dropout: dropout before the classifier.
        model_overrides: preset field overrides.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    def __init__(
        self,
        model: str = "bert-tiny",
        num_classes: int = 2,
        linear_probe: bool = False,
        dropout: float = 0.1,
        model_overrides: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(linear_probe, optimizer, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.encoder = tower(model, model_overrides, TextEncoder)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.cfg.width, num_classes))
        self.freeze_if_probe()
        self.accuracy = accuracy_per_stage(num_classes)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids))  # (B, num_classes)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))


class TokenClassification(_FineTune):
    """Per-token tagging (NER, chunking) with entity-level precision / recall / F1 (seqeval, BIO tags).

    Args:
        model: text preset (random init) or checkpoint.
        num_classes: number of tags; must equal the data module's.
        linear_probe: freeze the encoder, train only the head.
        dropout: dropout before the classifier.
        model_overrides: preset field overrides.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    def __init__(
        self,
        model: str = "bert-tiny",
        num_classes: int = 9,
        linear_probe: bool = False,
        dropout: float = 0.1,
        model_overrides: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(linear_probe, optimizer, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.encoder = tower(model, model_overrides, TextEncoder)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.cfg.width, num_classes))
        self.freeze_if_probe()
        self._tags: tuple[list[list[str]], list[list[str]]] = ([], [])

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.head(self.encoder.forward_features(input_ids, attention_mask, token_type_ids))  # (B, T, C)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE), logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._tags = ([], [])

    def validation_step(self, batch, batch_idx):
        loss, logits = self._loss(batch)
        self.log("val/loss", loss, sync_dist=True)
        names = self.trainer.datamodule.classes
        for pred, gold in zip(logits.argmax(-1).tolist(), batch["labels"].tolist()):
            keep = [i for i, g in enumerate(gold) if g != IGNORE]  # first sub-word of each word
            self._tags[0].append([names[gold[i]] for i in keep])
            self._tags[1].append([names[pred[i]] for i in keep])

    def on_validation_epoch_end(self) -> None:
        from seqeval.metrics import f1_score, precision_score, recall_score

        gold, pred = self._tags
        if gold:
            self.log("val/entity_f1", f1_score(gold, pred), prog_bar=True)
            self.log("val/entity_precision", precision_score(gold, pred))
            self.log("val/entity_recall", recall_score(gold, pred))


class QuestionAnswering(_FineTune):
    """Extractive QA (SQuAD): start / end logits over the context tokens; exact match and F1.

    Args:
        model: text preset (random init) or checkpoint (e.g. a BERT folder).
        linear_probe: freeze the encoder, train only the span head.
        model_overrides: preset field overrides.
        max_answer_length: longest answer span in tokens at evaluation.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    def __init__(
        self,
        model: str = "bert-tiny",
        linear_probe: bool = False,
        model_overrides: dict[str, Any] | None = None,
        max_answer_length: int = 30,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(linear_probe, optimizer, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.encoder = tower(model, model_overrides, TextEncoder)
        self.head = nn.Linear(self.encoder.cfg.width, 2)  # start, end
        self.freeze_if_probe()
        self._answers: dict[int, str] = {}

    def setup(self, stage: str) -> None:  # no class count to check
        pass

    def on_validation_epoch_start(self) -> None:
        self._answers = {}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.head(self.encoder.forward_features(input_ids, attention_mask, token_type_ids)).unbind(-1)
        return start, end  # (B, T) each

    def _loss(self, batch):
        start, end = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        loss = (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2
        return loss, start, end

    def training_step(self, batch, batch_idx):
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, start, end = self._loss(batch)
        self.log("val/loss", loss, sync_dist=True)
        contexts = [e["context"] for e in self.trainer.datamodule.datasets["val"].examples]
        # an example whose windows fall in different batches keeps the answer of its last batch
        self._answers.update(
            extract_answers(start, end, batch["offset_mapping"], batch["example_index"], contexts,
                            self.hparams.max_answer_length)  # fmt: skip
        )

    def on_validation_epoch_end(self) -> None:
        examples = self.trainer.datamodule.datasets["val"].examples
        preds = [{"prediction_text": text, "id": examples[i]["id"]} for i, text in self._answers.items()]
        target = [
            {"answers": {"text": [a["text"] for a in examples[i]["answers"]] or [""],
                         "answer_start": [a["answer_start"] for a in examples[i]["answers"]] or [0]},
             "id": examples[i]["id"]}
            for i in self._answers
        ]  # fmt: skip
        scores = torchmetrics.functional.text.squad(preds, target)
        self.log("val/exact_match", scores["exact_match"])
        self.log("val/f1", scores["f1"], prog_bar=True)
