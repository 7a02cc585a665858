"""Evaluation the way CLIP_benchmark does it, and mmlm models inside CLIP_benchmark.

``mmlm zeroshot`` and ``mmlm eval-retrieval`` take a model (``load_model``), a
dataset (``classification_data`` / ``retrieval_data``) and write CLIP_benchmark's
result JSON (``benchmark_result``). Datasets:

===================================  ===================================================================
``digits``                           scikit-learn's 1,797 handwritten digits (``train`` / ``test`` split)
a folder of class folders            torchvision's ImageFolder layout (classification)
``*.csv`` / ``*.tsv`` / ``*.jsonl``  a manifest: ``filepath`` + ``label`` rows (classification), or
                                     ``filepath`` + ``title`` rows, one per caption (retrieval: repeat
                                     the filepath for several captions of one image)
``*.tar``, ``data/{0..9}.tar``       WebDataset shards: an image member plus ``cls`` (an integer label)
                                     or ``txt`` (captions, one per line) or ``json`` (``caption``: a
                                     string or a list)
a CLIP_benchmark ``wds`` folder      ``{split}/nshards.txt``, ``{split}/0.tar ...``, ``classnames.txt``,
                                     ``zeroshot_classification_templates.txt`` (``clip_benchmark_export_wds``)
===================================  ===================================================================

CLIP_benchmark plugs a model in as a loader returning ``(model, transform, tokenizer)``,
where ``tokenizer(texts)`` gives a tensor of ids and ``model.encode_text(ids)`` takes
it alone. ``load_clip_benchmark`` is such a loader for every model mmlm reads::

    import mmlm.benchmark, clip_benchmark.cli
    mmlm.benchmark.register_clip_benchmark()  # model_type "mmlm"
    clip_benchmark.cli.main()  # eval --model_type mmlm --model /path/to/checkpoint --dataset ...
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import webdataset as wds
from torch import nn
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmlm.data import (
    DIGIT_CLASSNAMES,
    DIGIT_TEMPLATES,
    ImageClassificationCollator,
    ImageClassificationDataset,
    ImageTextDataset,
    SkippingDataLoader,
    SkipStats,
    Tokenizer,
    digits_image_text,
    get_tokenizer,
    image_transform,
    load_image,
)
from mmlm.data.skips import BAD_LABEL, BROKEN_SHARD, MISSING_FIELD, SKIPPED, Skip, check_text, split_skips
from mmlm.data.webdataset import IMAGE_EXTS, expand_urls
from mmlm.paths import resolve

CLIP_VOCAB_SIZE = 49408

# ------------------------------------------------------------------------------ the model


def load_model(spec: str | Path, act: str | None = None, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """The image-text model ``spec`` names (``mmlm.models.resolve``; a preset's random weights seeded by
    ``seed``, for smoke tests) in eval mode, refused unless it encodes both images and text."""
    from mmlm.models import resolve as resolve_model

    model = resolve_model(spec, act=act, device=device, seed=seed).eval()
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise ValueError(f"{spec} is a {type(model).__name__}: zero-shot evaluation needs an image-text (CLIP) model")
    return model


def model_tokenizer(model: nn.Module, tokenizer: str | Path | None = None, checkpoint: str | Path | None = None) -> Tokenizer:
    """The tokenizer for ``model``: ``tokenizer`` if given, else one saved in the ``checkpoint`` folder
    (``tokenizer.json``), else the CLIP BPE for a 49,408-token vocabulary. Truncates at the model's context."""
    context = model.cfg.text.context_length
    if tokenizer is not None:
        return get_tokenizer(tokenizer, context_length=context)
    if checkpoint is not None and (resolve(checkpoint) / "tokenizer.json").is_file():
        return get_tokenizer(resolve(checkpoint), context_length=context)
    if model.cfg.text.vocab_size == CLIP_VOCAB_SIZE:
        return get_tokenizer("clip", context_length=context)
    raise ValueError(
        f"the text tower has {model.cfg.text.vocab_size} tokens, not CLIP's {CLIP_VOCAB_SIZE}: give its tokenizer folder"
    )


def describe_model(spec: str | Path, seed: int = 0) -> tuple[str, str]:
    """The ``model`` and ``pretrained`` fields of a result: the argument as given, and the weights' source."""
    path = resolve(spec)
    return str(spec), str(path.resolve()) if path.exists() else f"random-init-seed{seed}"


def benchmark_result(
    dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, float | None], language: str = "en",
    samples: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One run's result, in the JSON layout CLIP_benchmark writes (and its ``build_csv`` reads),
    plus ``samples``: what the metrics were computed on (see ``sample_counts``)."""
    result = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
              "language": language}  # fmt: skip
    return result if samples is None else {**result, "samples": samples}


def sample_counts(loader: SkippingDataLoader) -> dict[str, Any]:
    """``{"used": N, "skipped": {reason: count}}`` of the loader's last full pass.

    A result computed on 1 image out of 3 must say so in the result, not only in a log line.
    """
    return {"used": loader.stats.good, "skipped": loader.stats.history[-1] if loader.stats.history else {}}


def write_result(result: dict[str, Any], path: str | Path | None = None) -> str:
    """Print the result as JSON and write it to ``path`` if given.

    Strict JSON: a metric that does not exist (acc5 with fewer than 5 classes) is ``null``, never
    ``NaN``, which JSON readers other than Python's refuse.
    """
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return text


# ------------------------------------------------------------------------------ datasets


@dataclass
class EvalData:
    """A dataset to evaluate on and what it says about itself."""

    dataset: Dataset
    collate: Callable[[list[Any]], dict[str, Any]]
    classes: list[str] | None = None  # class names in label order (classification)
    templates: list[str] | None = None  # the dataset's own prompt templates, if it has any

    def loader(self, batch_size: int = 64, num_workers: int = 0) -> SkippingDataLoader:
        """Batches in dataset order; bad samples are skipped and counted (``loader.stats``)."""
        return SkippingDataLoader(
            self.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=self.collate,
            stats=SkipStats("eval"),
        )  # fmt: skip


def collate_image_captions(samples: Sequence[Any]) -> dict[str, Any]:
    """``image`` (B, 3, H, W) and ``captions`` (B lists of strings); Skips go under ``skipped``."""
    good, skips = split_skips(samples)
    batch: dict[str, Any] = {SKIPPED: skips}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["captions"] = [s["captions"] for s in good]
    return batch


class ImageCaptions(Dataset):
    """One item per image with all of its captions, ``{"image", "captions"}``, from a manifest with
    one row per caption (rows naming the same image are grouped, as in ``ImageTextDataset``).

    An image that cannot be read, or whose captions are all bad, is skipped with its captions.
    """

    def __init__(
        self, manifest: str | Path, transform: Callable | None = None, image_key: str = "filepath",
        caption_key: str = "title",
    ) -> None:  # fmt: skip
        pairs = ImageTextDataset(manifest, image_key, caption_key)
        self.images, self.texts, self.transform = pairs.images, pairs.texts, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> dict[str, Any] | list[Skip]:
        path = self.images[idx]
        checked = [check_text(t, f"{path} caption {j}") for j, t in enumerate(self.texts[idx])]
        skips = [c for c in checked if isinstance(c, Skip)]
        captions = [c for c in checked if not isinstance(c, Skip)]
        image = load_image(path) if captions else None
        if image is None or isinstance(image, Skip):
            return skips + ([image] if isinstance(image, Skip) else [])
        item = {"image": self.transform(image) if self.transform else image, "captions": captions}
        return {**item, SKIPPED: skips} if skips else item


class EvalShards(IterableDataset):
    """One pass over WebDataset shards, each read once (split over DataLoader workers).

    Items are ``{"image", "label"}`` (``target="label"``: an integer ``cls`` member, as
    CLIP_benchmark writes classification sets) or ``{"image", "captions"}``
    (``target="captions"``: a ``txt`` member with one caption per line, or a ``json``
    member whose ``caption_key`` holds a string or a list).
    """

    def __init__(
        self, urls: str | Sequence[str], transform: Callable | None, target: Literal["label", "captions"],
        caption_key: str = "caption",
    ) -> None:  # fmt: skip
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        self.transform, self.target, self.caption_key = transform, target, caption_key

    def __iter__(self) -> Iterator[dict[str, Any] | Skip]:
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for url in urls:
            yield from self._samples(url)

    def _samples(self, url: str) -> Iterator[dict[str, Any] | Skip]:
        errors: list[Exception] = []

        def handler(exn: Exception) -> bool:
            errors.append(exn)
            return True  # keep going: what was read before the error is still good

        for raw in wds.tarfile_samples([{"url": url}], handler=handler):
            yield self._decode(raw, url)
        if errors:
            yield Skip(BROKEN_SHARD, url, f"{type(errors[0]).__name__}: {errors[0]}")

    def _decode(self, raw: dict[str, Any], url: str) -> dict[str, Any] | Skip:
        name = f"{url}:{raw.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            return Skip(MISSING_FIELD, name, "no image member")
        item: dict[str, Any] = {}
        if self.target == "label":
            try:
                item["label"] = int(raw["cls"])
            except (KeyError, ValueError) as e:
                return Skip(BAD_LABEL, name, f"cls: {e!r}")
        else:
            captions = self._captions(raw, name)
            if isinstance(captions, Skip):
                return captions
            item["captions"] = captions
        image = load_image(raw[ext], f"{name}.{ext}")
        if isinstance(image, Skip):
            return image
        item["image"] = self.transform(image) if self.transform else image
        return item

    def _captions(self, raw: dict[str, Any], name: str) -> list[str] | Skip:
        if "txt" in raw:
            text = check_text(raw["txt"], name)
            candidates: Any = text.splitlines() if isinstance(text, str) else []
        elif "json" in raw:
            try:
                candidates = json.loads(raw["json"]).get(self.caption_key)
            except (ValueError, AttributeError) as e:
                return Skip(MISSING_FIELD, name, f"json: {e}")
            candidates = candidates if isinstance(candidates, list) else [candidates]
        else:
            return Skip(MISSING_FIELD, name, "no txt or json member")
        captions = [c for c in (check_text(c, name) for c in candidates) if not isinstance(c, Skip)]
        return captions or Skip(MISSING_FIELD, name, "no usable caption")


class _Mapped(Dataset):
    def __init__(self, dataset: Dataset, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.dataset, self.fn = dataset, fn

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.fn(self.dataset[idx])


def _one_caption(sample: dict[str, Any]) -> dict[str, Any]:
    return {"image": sample["image"], "captions": [sample["text"]]}


def find_shards(spec: str | Path, split: str = "test") -> tuple[list[str], Path] | None:
    """(shard urls, folder of the metadata files) when ``spec`` names WebDataset shards, else None."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        nshards = path / split / "nshards.txt"
        if nshards.is_file():  # CLIP_benchmark's layout
            n = int(nshards.read_text().strip())
            return [str(path / split / f"{i}.tar") for i in range(n)], path
        tars = sorted(str(p) for p in path.glob("*.tar"))
        return (tars, path) if tars else None
    if ".tar" in text:
        urls = expand_urls(text)
        return urls, Path(urls[0]).parent
    return None


def _metadata(folder: Path, name: str) -> list[str] | None:
    """Lines of ``name`` in ``folder`` or its parent (a split folder's dataset root)."""
    for f in (folder / name, folder.parent / name):
        if f.is_file():
            return [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


def _display_names(found: list[str], given: Sequence[str] | None, source: str) -> list[str]:
    if given is None:
        return found
    if len(given) != len(found):
        raise ValueError(f"{len(given)} class names given, but {source} has {len(found)} classes: {found[:10]}")
    return list(given)


def classification_data(
    spec: str | Path,
    transform: Callable,
    split: str = "test",
    classnames: Sequence[str] | None = None,
    image_key: str = "filepath",
    label_key: str = "label",
) -> EvalData:
    """Labelled images for zero-shot classification (see the module docstring for ``spec``).

    ``classnames`` are display names in label order: for an ImageFolder, of the sorted
    folder names; for a manifest with integer labels, of 0, 1, ...; for a manifest with
    named labels, the names themselves in the order to use.
    """
    text = str(spec)
    collate = ImageClassificationCollator()
    if text == "digits":
        ds = digits_image_text(split, transform=transform)  # type: ignore[arg-type]
        names = _display_names(list(DIGIT_CLASSNAMES), classnames, "digits")
        return EvalData(ds, collate, names, list(DIGIT_TEMPLATES))
    shards = find_shards(spec, split)
    if shards is not None:
        urls, meta = shards
        names = list(classnames) if classnames is not None else _metadata(meta, "classnames.txt")
        return EvalData(EvalShards(urls, transform, "label"), collate, names,
                        _metadata(meta, "zeroshot_classification_templates.txt"))  # fmt: skip
    path = Path(text)
    if path.is_dir():
        ds = ImageClassificationDataset(path, transform)
        return EvalData(ds, collate, _display_names(ds.classes, classnames, str(path)))
    if path.is_file():
        ds = ImageClassificationDataset(path, transform, image_key, label_key)
        numeric = ds.classes == [str(i) for i in range(len(ds.classes))]
        if classnames is not None and not numeric:  # named labels: the given list fixes their order
            ds = ImageClassificationDataset(path, transform, image_key, label_key, classes=list(classnames))
            return EvalData(ds, collate, list(classnames))
        if classnames is not None and len(classnames) < len(ds.classes):
            raise ValueError(f"{len(classnames)} class names given, but {path} has labels up to {len(ds.classes) - 1}")
        return EvalData(ds, collate, list(classnames) if classnames is not None else ds.classes)
    raise FileNotFoundError(f"dataset {text!r}: not 'digits', a folder, a manifest file or WebDataset shards")


def retrieval_data(
    spec: str | Path,
    transform: Callable,
    split: str = "test",
    image_key: str = "filepath",
    caption_key: str | None = None,
) -> EvalData:
    """Images with one or more captions each, for retrieval (see the module docstring for ``spec``).

    ``caption_key``: the manifest column (default ``title``) or the shard json field (default ``caption``).
    """
    text = str(spec)
    if text == "digits":
        digits = digits_image_text(split, transform=transform)  # type: ignore[arg-type]
        return EvalData(_Mapped(digits, _one_caption), collate_image_captions)
    shards = find_shards(spec, split)
    if shards is not None:
        return EvalData(EvalShards(shards[0], transform, "captions", caption_key or "caption"), collate_image_captions)
    if Path(text).is_file():
        return EvalData(ImageCaptions(text, transform, image_key, caption_key or "title"), collate_image_captions)
    raise FileNotFoundError(f"dataset {text!r}: not 'digits', a manifest file or WebDataset shards")


# ------------------------------------------------------------------------------ CLIP_benchmark's interface


class BenchmarkTokenizer:
    """texts -> (B, T) ids, padded with the tokenizer's pad id: what CLIP_benchmark (and open_clip) call.

    Args:
        tokenizer: an mmlm tokenizer.
        context_length: pad every batch to this length as open_clip does (None: the longest text).
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int | None = None) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(texts)["input_ids"]
        if self.context_length is not None and ids.shape[1] < self.context_length:
            ids = nn.functional.pad(ids, (0, self.context_length - ids.shape[1]), value=self.tokenizer.pad_token_id)
        return ids


class BenchmarkModel(nn.Module):
    """An mmlm CLIP with open_clip's ``encode_image(images)`` / ``encode_text(ids)``.

    CLIP_benchmark passes ids without an attention mask. The mask is rebuilt as the
    tokens up to and including the first end-of-text token, which is where mmlm's
    tokenizer ends a single text; a text tower that attends both ways (or pools by
    mean) needs it, a causal eot-pooled one gets the same result either way.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eot_token_id = model.cfg.text.eot_token_id

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.eot_token_id is None:
            return torch.ones_like(input_ids)
        is_eot = input_ids == self.eot_token_id
        first = torch.where(is_eot.any(1), is_eot.int().argmax(1), input_ids.shape[1] - 1)  # no eot: keep every token
        return (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] <= first[:, None]).long()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(input_ids, self.attention_mask(input_ids), normalize=normalize)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """open_clip's output: normalised image and text features and the logit scale."""
        return self.encode_image(images, True), self.encode_text(input_ids, True), self.model.scale()


def load_clip_benchmark(
    model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device: str | torch.device = "cpu",
    act: str | None = None, tokenizer: str | None = None,
) -> tuple[BenchmarkModel, Callable, BenchmarkTokenizer]:  # fmt: skip
    """CLIP_benchmark's loader: ``(model, transform, tokenizer)`` for any model mmlm reads.

    Args:
        model_name: a checkpoint path (when ``pretrained`` is empty) or a preset name.
        pretrained: a checkpoint path (anything ``mmlm.load_pretrained`` reads); empty to use ``model_name``.
        cache_dir: unused (nothing is downloaded).
        device: where the model lives.
        act: MLP activation of an OpenAI / OpenCLIP state dict when it cannot be detected.
        tokenizer: a tokenizer folder, when the checkpoint has none and is not a CLIP BPE model.
    """
    spec = pretrained or model_name
    model = load_model(spec, act, device)
    tok = model_tokenizer(model, tokenizer, spec)
    transform = image_transform(model.cfg.vision, train=False)
    return BenchmarkModel(model).eval(), transform, BenchmarkTokenizer(tok, model.cfg.text.context_length)


def register_clip_benchmark(name: str = "mmlm") -> None:
    """Make ``load_clip_benchmark`` CLIP_benchmark's model type ``name`` (``--model_type mmlm``)."""
    from clip_benchmark import models

    models.TYPE2FUNC[name] = load_clip_benchmark
    if name not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(name)  # the CLI reads this list (by reference) for its choices


__all__ = [
    "BenchmarkModel",
    "BenchmarkTokenizer",
    "EvalData",
    "EvalShards",
    "ImageCaptions",
    "benchmark_result",
    "classification_data",
    "collate_image_captions",
    "describe_model",
    "find_shards",
    "load_clip_benchmark",
    "load_model",
    "model_tokenizer",
    "register_clip_benchmark",
    "retrieval_data",
    "write_result",
]
