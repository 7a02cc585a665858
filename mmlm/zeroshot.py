"""Zero-shot classification: class names x prompt templates -> classifier weights -> metrics.

The classifier is built as OpenCLIP and CLIP_benchmark build it: every prompt is
encoded and L2-normalised, the prompts of a class are averaged, and the average is
normalised again. Column c of the (D, C) weight matrix is class c.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Template = str | Callable[[str], str]

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a photo of the {}.", "an image of a {}.", "{}")


def fill(template: Template, classname: str) -> str:
    return template.format(classname) if isinstance(template, str) else template(classname)


@torch.no_grad()
def build_classifier(
    model,
    tokenizer: Callable[[list[str]], dict[str, torch.Tensor]],
    classnames: Sequence[str],
    templates: Sequence[Template] = SIMPLE_TEMPLATES,
    classes_per_batch: int = 10,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(D, C) zero-shot weights: the normalised mean of each class's normalised prompt embeddings."""
    device = device or next(model.parameters()).device
    columns = []
    for start in range(0, len(classnames), classes_per_batch):
        names = classnames[start : start + classes_per_batch]
        texts = [fill(t, c) for c in names for t in templates]
        tokens = tokenizer(texts)
        emb = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device), normalize=True)
        emb = emb.reshape(len(names), len(templates), -1).mean(dim=1)  # (classes, D)
        columns.append(F.normalize(emb, dim=-1).T)
    return torch.cat(columns, dim=1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall, as CLIP_benchmark reports them."""
    num_classes = num_classes or logits.shape[1]
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, k)
    hit = top == labels[:, None]
    pred = top[:, 0]
    recalls = [(pred[labels == c] == c).float().mean() for c in range(num_classes) if (labels == c).any()]
    return {
        "acc1": hit[:, :1].any(1).float().mean().item(),
        "acc5": hit.any(1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }
