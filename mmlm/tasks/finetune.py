"""Fine-tuning on either tower: image / text / token classification and extractive QA.

Each task holds one mmlm model, ``self.model``, its head included, so the checkpoint of
any task loads without the task (``mmlm.load_pretrained(run.ckpt)``):

    ImageClassification   VisionTransformer with num_classes        -> (B, classes)
    TextClassification    TextWithHeads, head "classifier"          -> logits (B, classes)
                          (+ "pooler" on a BERT, as transformers has it)
    TokenClassification   TextWithHeads, head "token_classifier"    -> logits (B, T, tags)
    QuestionAnswering     TextWithHeads, head "qa"                  -> start_logits, end_logits (B, T)

The encoder comes from a preset or a checkpoint; a CLIP gives a standalone copy of its
tower (``mmlm.models.tower``). ``linear_probe`` trains the head alone.

Token classification and QA score whole examples (entity F1, SQuAD EM / F1): under DDP
every rank's predictions are gathered before scoring, so N processes score what one does.
(Lightning's DistributedSampler repeats up to N - 1 samples to give every rank as many:
QA keeps one answer per example, entity F1 counts a repeated sentence twice.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmlm.data.collators import IGNORE
from mmlm.data.text_datasets import Answers, extract_answers, merge_answers
from mmlm.factory import resolve
from mmlm.models import CLIP, text_with_heads, tower, vit_with_classes
from mmlm.tasks.base import Task, adamw


def accuracy_per_stage(num_classes: int) -> nn.ModuleDict:
    # keys are not "train" / "val": a ModuleDict key may not shadow Module.train
    return nn.ModuleDict(
        {f"{s}_accuracy": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
         for s in ("train", "val")}
    )  # fmt: skip


class _FineTune(Task):
    """Shared: linear probe (the head trains, the rest is frozen and in eval mode), the class
    count check, and gathering python objects from every rank."""

    model: nn.Module
    head_names: tuple[str, ...]  # the modules of ``model`` a linear probe trains

    def __init__(self, linear_probe: bool, optimizer: OptimizerCallable, warmup_steps: int, min_lr_ratio: float):
        super().__init__(optimizer, warmup_steps, min_lr_ratio)
        self.linear_probe = linear_probe

    def freeze_if_probe(self) -> None:
        if self.linear_probe:
            self.model.requires_grad_(False)
            for name in self.head_names:
                getattr(self.model, name).requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.linear_probe:
            self.model.eval()  # the frozen encoder: no dropout, no drop path
            for name in self.head_names:
                getattr(self.model, name).train(mode)
        return self

    def setup(self, stage: str) -> None:
        expected = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        if expected is not None and expected != self.hparams.num_classes:
            raise ValueError(f"the data has {expected} classes, the task num_classes={self.hparams.num_classes}")

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items`` (tag lists, answers), concatenated in rank order."""
        world = self.trainer.world_size
        if world == 1:
            return items
        parts: list[list[Any] | None] = [None] * world
        torch.distributed.all_gather_object(parts, items)
        return [item for part in parts for item in part]


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
        model: a ViT or a CLIP (its image tower): a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any
            checkpoint ``mmlm.load_pretrained`` reads.
        num_classes: output classes; must equal the data module's.
        linear_probe: freeze the encoder, train only the head.
        model_overrides: preset field overrides.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    head_names = ("head",)

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
        self.model = vit_with_classes(resolve(model, part="image", overrides=model_overrides), num_classes)
        self.freeze_if_probe()
        self.accuracy = accuracy_per_stage(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, num_classes)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["image"])


class TextClassification(_Classification):
    """Sequence classification on the pooled output of a text tower (BERT, MiniLM, GPT-2, CLIP text).

    A BERT-shaped encoder (bidirectional, post-LN) classifies its pooler output (dense + tanh on
    [CLS], kept from the checkpoint when it has one) as ``BertForSequenceClassification`` does,
    so the fine-tuned model exports to it; causal towers (GPT-2, CLIP text) classify their own
    pooled token. A linear probe freezes the pooler with the encoder, as freezing a
    ``BertForSequenceClassification``'s ``bert`` does.

    Args:
        model: a text model or a CLIP (its text tower): a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or
            any checkpoint ``mmlm.load_pretrained`` reads.
        num_classes: output classes; must equal the data module's.
        linear_probe: freeze the encoder, train only the head.
        dropout: dropout before the classifier.
        model_overrides: preset field overrides.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    head_names = ("dropout", "classifier")

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
        source = resolve(model, overrides=model_overrides)
        text = source.cfg.text if isinstance(source, CLIP) else tower(source, "text").cfg  # no copy of a CLIP tower
        bert = not (text.causal or text.pre_norm)  # what mmlm.export writes as a transformers BERT
        heads = ["pooler", "classifier"] if bert else ["classifier"]
        self.model = text_with_heads(source, heads, num_labels=num_classes, classifier_dropout=dropout)
        self.freeze_if_probe()
        self.accuracy = accuracy_per_stage(num_classes)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.model(input_ids, attention_mask, token_type_ids)["logits"]  # (B, num_classes)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))


class TokenClassification(_FineTune):
    """Per-token tagging (NER, chunking) with entity-level precision / recall / F1 (seqeval, BIO tags).

    A word's tag is read at its first sub-word: the positions the batch's ``labels`` do not ignore.

    Args:
        model: a text model: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint
            ``mmlm.load_pretrained`` reads.
        num_classes: number of tags; must equal the data module's.
        linear_probe: freeze the encoder, train only the head.
        dropout: dropout before the classifier.
        model_overrides: preset field overrides.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    head_names = ("dropout", "token_classifier")

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
        self.model = text_with_heads(
            resolve(model, overrides=model_overrides), ["token_classifier"], num_labels=num_classes,
            classifier_dropout=dropout,
        )  # fmt: skip
        self.freeze_if_probe()
        self._tags: list[tuple[list[str], list[str]]] = []  # (gold, predicted) per sentence

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.model(input_ids, attention_mask, token_type_ids)["logits"]  # (B, T, C)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE), logits

    def word_tags(self, tags: torch.Tensor, labels: torch.Tensor) -> list[list[str]]:
        """(B, T) tag ids -> the tag names of each sentence's words (at their first sub-words)."""
        names = self.trainer.datamodule.classes
        return [[names[t] for t in row[keep].tolist()] for row, keep in zip(tags, labels != IGNORE)]

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._tags = []

    def validation_step(self, batch, batch_idx):
        loss, logits = self._loss(batch)
        self.log("val/loss", loss, sync_dist=True)
        labels = batch["labels"]
        self._tags.extend(zip(self.word_tags(labels, labels), self.word_tags(logits.argmax(-1), labels)))

    def on_validation_epoch_end(self) -> None:
        from seqeval.metrics import f1_score, precision_score, recall_score

        tags = self.gather_objects(self._tags)
        if tags:
            gold, pred = (list(t) for t in zip(*tags))
            self.log("val/entity_f1", f1_score(gold, pred), prog_bar=True)
            self.log("val/entity_precision", precision_score(gold, pred))
            self.log("val/entity_recall", recall_score(gold, pred))

    def predict_step(self, batch, batch_idx) -> dict[str, list[list[str]]]:
        """The predicted tag name of every word, per sentence (``mmlm predict``)."""
        logits = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return {"tags": self.word_tags(logits.argmax(-1), batch["labels"])}


class QuestionAnswering(_FineTune):
    """Extractive QA (SQuAD): start / end logits over the context tokens; exact match and F1.

    An example's answer is the best span over all its windows, wherever they fall.

    Args:
        model: a text model (e.g. a BERT folder): a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any
            checkpoint ``mmlm.load_pretrained`` reads.
        linear_probe: freeze the encoder, train only the span head.
        model_overrides: preset field overrides.
        max_answer_length: longest answer span in tokens at evaluation.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    head_names = ("qa",)

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
        self.model = text_with_heads(resolve(model, overrides=model_overrides), ["qa"])
        self.freeze_if_probe()
        self._answers: Answers = {}

    def setup(self, stage: str) -> None:  # no class count to check
        pass

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, attention_mask, token_type_ids)
        return out["start_logits"], out["end_logits"]  # (B, T) each

    def _loss(self, batch):
        start, end = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        loss = (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2
        return loss, start, end

    def _answers_of(self, batch, start, end, split: str, best: Answers | None = None) -> Answers:
        examples = self.trainer.datamodule.datasets[split].examples
        return extract_answers(start, end, batch["offset_mapping"], batch["example_index"],
                               [e["context"] for e in examples], self.hparams.max_answer_length, best)  # fmt: skip

    def training_step(self, batch, batch_idx):
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._answers = {}

    def validation_step(self, batch, batch_idx):
        loss, start, end = self._loss(batch)
        self.log("val/loss", loss, sync_dist=True)
        self._answers_of(batch, start, end, "val", best=self._answers)

    def on_validation_epoch_end(self) -> None:
        # DDP gives each rank some windows of an example: the best span over every rank's wins
        answers = merge_answers({}, self.gather_objects([(i, s, t) for i, (s, t) in self._answers.items()]))
        if not answers:
            return
        examples = self.trainer.datamodule.datasets["val"].examples
        preds = [{"prediction_text": text, "id": examples[i]["id"]} for i, (_, text) in answers.items()]
        target = [
            {"answers": {"text": [a["text"] for a in examples[i]["answers"]] or [""],
                         "answer_start": [a["answer_start"] for a in examples[i]["answers"]] or [0]},
             "id": examples[i]["id"]}
            for i in answers
        ]  # fmt: skip
        scores = torchmetrics.functional.text.squad(preds, target)
        self.log("val/exact_match", scores["exact_match"])
        self.log("val/f1", scores["f1"], prog_bar=True)

    def predict_step(self, batch, batch_idx) -> dict[str, list]:
        """The answer text of each example in the batch, with its score (start + end logit).

        ``mmlm predict`` runs on ``test_data``. An example whose windows fall in two batches
        is answered in both: keep its highest-scoring answer.
        """
        start, end = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        answers = self._answers_of(batch, start, end, "test")
        examples = self.trainer.datamodule.datasets["test"].examples
        return {"id": [examples[i]["id"] for i in answers], "answer": [t for _, t in answers.values()],
                "score": [s for s, _ in answers.values()]}  # fmt: skip
