"""Language pretraining: MLM, NSP and CLM, alone or as a weighted sum, on a ``TextWithHeads``.

    batch -> encoder.forward_features -> mlm head -> CE on masked positions      (labels: -100 = skip)
                                      -> pooler -> nsp head -> CE on is-next
                                      -> clm head -> CE on the next token          (document-masked when packed)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import OptimizerCallable

from mmlm.data.collators import IGNORE, document_attention_mask
from mmlm.factory import resolve
from mmlm.models import text_with_heads
from mmlm.tasks.base import Task, adamw


class LanguagePretraining(Task):
    """Pretrain a text Transformer with MLM, NSP and/or CLM.

    Args:
        model: a text model (e.g. BERT, GPT-2): a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any
            checkpoint ``mmlm.load_pretrained`` reads.
        model_overrides: preset field overrides; ``vocab_size`` must match the tokenizer.
        mlm_weight: weight of the masked-LM loss (0 = no MLM head).
        nsp_weight: weight of the next-sentence loss (0 = no NSP head).
        clm_weight: weight of the causal-LM loss (0 = no CLM head); needs a causal model.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    def __init__(
        self,
        model: str = "bert-tiny",
        model_overrides: dict[str, Any] | None = None,
        mlm_weight: float = 1.0,
        nsp_weight: float = 0.0,
        clm_weight: float = 0.0,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(optimizer, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        heads = tuple(
            h for h, w in (("mlm", mlm_weight), ("pooler", nsp_weight), ("nsp", nsp_weight), ("clm", clm_weight)) if w
        )
        if not heads:
            raise ValueError("give at least one of mlm_weight, nsp_weight, clm_weight a non-zero weight")
        # a checkpoint's own heads keep their weights, the others start fresh
        self.model = text_with_heads(resolve(model, overrides=model_overrides), heads)
        if clm_weight and not self.model.cfg.text.causal:
            raise ValueError("CLM needs a causal text model (e.g. a gpt2 preset)")
        self.weights = {"mlm": mlm_weight, "nsp": nsp_weight, "clm": clm_weight}
        vocab = self.model.cfg.text.vocab_size
        self.metrics = torch.nn.ModuleDict()
        for stage in ("train", "val"):
            for name in ("mlm", "clm"):
                if self.weights[name]:
                    self.metrics[f"{stage}_{name}_perplexity"] = torchmetrics.text.Perplexity(ignore_index=IGNORE)
                    self.metrics[f"{stage}_{name}_accuracy"] = torchmetrics.classification.MulticlassAccuracy(
                        vocab, average="micro", ignore_index=IGNORE
                    )
            if nsp_weight:
                self.metrics[f"{stage}_nsp_accuracy"] = torchmetrics.classification.MulticlassAccuracy(2, average="micro")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        vocab = getattr(dm, "vocab_size", None)
        if vocab is not None and vocab > self.model.cfg.text.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but the model only {self.model.cfg.text.vocab_size}: "
                f"set model_overrides.vocab_size: {vocab}"
            )

    def losses(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        enc = self.model.encoder
        attn_mask = None
        if "document_ids" in batch:  # packed documents: no attention across their boundaries
            attn_mask = document_attention_mask(batch["document_ids"], causal=enc.cfg.causal)
        x = enc.forward_features(
            batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), attn_mask=attn_mask
        )  # (B, T, W)
        embedding = enc.token_embed.weight
        out: dict[str, torch.Tensor] = {}
        if self.weights["mlm"]:
            labels = batch["labels"]
            selected = labels != IGNORE  # only masked positions reach the (B, T, vocab) head
            logits = self.model.mlm(x[selected], embedding)  # (N, vocab)
            out["mlm"] = F.cross_entropy(logits, labels[selected])
            self._update(stage, "mlm", logits[None], labels[selected][None])
        if self.weights["nsp"]:
            logits = self.model.nsp(self.model.pooler(x))
            out["nsp"] = F.cross_entropy(logits, batch["next_sentence_label"])
            self.metrics[f"{stage}_nsp_accuracy"].update(logits, batch["next_sentence_label"])
        if self.weights["clm"]:
            logits = self.model.clm(x[:, :-1], embedding)  # predict token t + 1 from t
            labels = batch["labels"][:, 1:]
            out["clm"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
            self._update(stage, "clm", logits, labels)
        return out

    def _update(self, stage: str, name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.detach().float()
        self.metrics[f"{stage}_{name}_perplexity"].update(logits, labels)
        self.metrics[f"{stage}_{name}_accuracy"].update(logits.flatten(0, 1), labels.flatten())

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        parts = self.losses(batch, stage)
        loss = sum(self.weights[k] * v for k, v in parts.items())
        batch_size = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=stage != "train")
        for name, value in parts.items():
            self.log(f"{stage}/{name}_loss", value, batch_size=batch_size, sync_dist=stage != "train")
        for key, metric in self.metrics.items():
            if key.startswith(stage):
                self.log(f"{stage}/{key[len(stage) + 1 :]}", metric, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
