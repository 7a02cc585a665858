"""LightningModules: contrastive alignment, captioning, distillation, language pretraining and fine-tuning."""

from mmlm.tasks.base import Task, adamw, warmup_cosine
from mmlm.tasks.caption import Captioning
from mmlm.tasks.contrastive import ContrastiveAlignment
from mmlm.tasks.distill import ClipDistillation
from mmlm.tasks.finetune import ImageClassification, QuestionAnswering, TextClassification, TokenClassification
from mmlm.tasks.pretrain import LanguagePretraining

__all__ = [
    "Captioning",
    "ClipDistillation",
    "ContrastiveAlignment",
    "ImageClassification",
    "LanguagePretraining",
    "QuestionAnswering",
    "Task",
    "TextClassification",
    "TokenClassification",
    "adamw",
    "warmup_cosine",
]
