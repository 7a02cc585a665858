"""Zero-shot classification: class names x prompt templates -> classifier weights -> metrics.

The classifier is built as OpenCLIP and CLIP_benchmark build it: every prompt is
encoded and L2-normalised, the prompts of a class are averaged, and the average is
normalised again. Column c of the (D, C) weight matrix is class c. An image's
prediction is the class whose column is most similar to its normalised embedding::

    class names x templates -> prompts -> encode_text -> normalise -> mean per class -> normalise -> W (D, C)
    images -> encode_image -> normalise -> (N, D) @ W -> logits (N, C) -> acc1, acc5, mean per-class recall
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmlm.data.digits import DIGIT_TEMPLATES
from mmlm.paths import resolve

Template = str | Callable[[str], str]

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a photo of the {}.", "an image of a {}.", "{}")

# The 80 prompts of OpenAI CLIP's ImageNet evaluation (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb,
# MIT licence), in the order open_clip keeps them (open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES).
# Order matters only to the last bit of the mean; tests check the list equals open_clip's.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": SIMPLE_TEMPLATES,
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "imagenet": OPENAI_IMAGENET_TEMPLATES,
    "digits": DIGIT_TEMPLATES,
}


def fill(template: Template, classname: str) -> str:
    """The prompt for one class. ``{}`` is OpenCLIP's placeholder, ``{c}`` CLIP_benchmark's; both work."""
    return template.format(classname, c=classname) if isinstance(template, str) else template(classname)


def _read_list(path: Path) -> list[str]:
    """A JSON list, or one entry per non-empty line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return items
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_templates(spec: str | Path) -> list[str]:
    """A named template set (``simple``, ``openai`` = ``imagenet``: the 80 CLIP prompts, ``digits``) or a file
    with one template per line (or a JSON list); ``{}`` or ``{c}`` marks the class name."""
    if isinstance(spec, str) and spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    path = resolve(spec)
    if not path.is_file():
        raise ValueError(f"templates {spec!r}: neither a built-in set ({', '.join(TEMPLATE_SETS)}) nor a file")
    templates = _read_list(path)
    for t in templates:
        if "{}" not in t and "{c}" not in t:
            raise ValueError(f"{path}: template {t!r} has no '{{}}' or '{{c}}' for the class name")
    return templates


def load_classnames(path: str | Path) -> list[str]:
    """Class names in label order: one per line, or a JSON list."""
    names = _read_list(resolve(path))
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


@torch.no_grad()
def build_classifier(
    model,
    tokenizer: Callable[[list[str]], dict[str, torch.Tensor]],
    classnames: Sequence[str],
    templates: Sequence[Template] = SIMPLE_TEMPLATES,
    classes_per_batch: int = 10,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """(D, C) zero-shot weights: the normalised mean of each class's normalised prompt embeddings."""
    device = device or next(model.parameters()).device
    columns = []
    starts = range(0, len(classnames), classes_per_batch)
    for start in tqdm(starts, desc="classes", unit="batch", disable=not progress):
        names = classnames[start : start + classes_per_batch]
        texts = [fill(t, c) for c in names for t in templates]
        tokens = tokenizer(texts)
        emb = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device), normalize=True)
        emb = emb.reshape(len(names), len(templates), -1).mean(dim=1)  # (classes, D)
        columns.append(F.normalize(emb, dim=-1).T)
    return torch.cat(columns, dim=1)


@torch.no_grad()
def encode_images(
    model, batches: Iterable[dict[str, Any]], device: torch.device | str | None = None, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) L2-normalised image embeddings (float32, on the CPU) and (N,) labels of every batch.

    ``batches`` yields dicts with ``image`` (B, 3, H, W) and ``label`` (B,), e.g. a
    ``SkippingDataLoader`` with ``ImageClassificationCollator``.
    """
    device = device or next(model.parameters()).device
    features, labels = [], []
    for batch in tqdm(batches, desc="images", unit="batch", disable=not progress):
        features.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        labels.append(batch["label"].cpu())
    if not features:
        raise ValueError("no images to classify")
    return torch.cat(features), torch.cat(labels)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> dict[str, float | None]:
    """acc1, acc5 and mean per-class recall, as CLIP_benchmark reports them.

    acc5 is None (JSON ``null``) with fewer than 5 classes, where CLIP_benchmark writes NaN,
    which is not JSON. The mean per-class recall (sklearn's balanced accuracy) averages over
    the classes that occur in ``labels``.
    """
    num_classes = num_classes or logits.shape[1]
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, k)
    hit = top == labels[:, None]
    pred = top[:, 0]
    recalls = [(pred[labels == c] == c).double().mean() for c in range(num_classes) if (labels == c).any()]
    return {
        "acc1": hit[:, :1].any(1).double().mean().item(),
        "acc5": hit.any(1).double().mean().item() if num_classes >= 5 else None,
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def zero_shot_classify(
    model,
    tokenizer: Callable[[list[str]], dict[str, torch.Tensor]],
    batches: Iterable[dict[str, Any]],
    classnames: Sequence[str],
    templates: Sequence[Template] = OPENAI_IMAGENET_TEMPLATES,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[dict[str, float | None], torch.Tensor, torch.Tensor]:
    """Classify every image of ``batches``: (metrics, logits (N, C), labels (N,)).

    Logits are cosine similarities times 100, CLIP's scale; the metrics do not depend on it.
    """
    weights = build_classifier(model, tokenizer, classnames, templates, device=device, progress=progress)
    features, labels = encode_images(model, batches, device, progress)
    logits = 100.0 * features @ weights.float().cpu()
    return classification_metrics(logits, labels, len(classnames)), logits, labels


def save_confusion_matrix(
    labels: torch.Tensor | np.ndarray,
    predictions: torch.Tensor | np.ndarray,
    classnames: Sequence[str],
    path: str | Path,
    normalize: bool = True,
    overwrite: bool = False,
) -> np.ndarray:
    """Write the confusion matrix (rows: true class, columns: predicted) as a PNG; returns the counts.

    An existing ``path`` is refused unless ``overwrite`` (``mmlm.outputs``).

    ``normalize`` colours each row by its share of the true class (a recall per cell).
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display, no global backend
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    n = len(classnames)
    counts = confusion_matrix(labels, predictions, labels=np.arange(n))
    shown = counts / np.maximum(counts.sum(1, keepdims=True), 1) if normalize else counts
    side = min(max(6.0, 0.35 * n), 40.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    few = n <= 30  # cell values and tick labels only while they stay legible
    ConfusionMatrixDisplay(shown, display_labels=list(classnames) if few else None).plot(
        ax=ax, include_values=few, values_format=".2f" if normalize else "d", xticks_rotation="vertical",
        cmap="Blues", colorbar=True,
    )  # fmt: skip
    if not few:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))
    from mmlm import outputs

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    outputs.write_file(path, buf.getvalue(), overwrite)
    return counts
