"""Map-style image datasets: image-text pairs from a manifest, image classification.

Each ``__getitem__`` returns a sample dict, or a :class:`~mmlm.data.skips.Skip`
when the image or caption is bad; the collators drop and count those.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from mmlm.data.manifest import label_indices, read_manifest, require_columns
from mmlm.data.skips import BAD_LABEL, Skip, check_text, load_image


class ImageTextDataset(Dataset):
    """Image-caption pairs from a CSV / TSV / JSONL manifest (OpenCLIP's CsvDataset, grown up).

    One row per caption (OpenCLIP style) or, in JSONL, a list of captions per row.
    Rows naming the same image share one ``image_id``, so retrieval metrics can
    count any of an image's captions as a hit.

    Args:
        manifest: path to the manifest.
        image_key: column with the image path, relative to the manifest's folder
            (or ``root``) unless absolute.
        caption_key: column with the caption (or, in JSONL, a list of captions).
        transform: applied to the RGB PIL image (e.g. ``image_transform(cfg, train)``).
        root: folder image paths are relative to; default: the manifest's folder.
        captions: ``"all"``: one item per (image, caption) pair; ``"random"``: one
            item per image with one of its captions drawn each time (training on
            multi-caption sets such as COCO).
        separator: CSV field separator; default ``,`` for .csv and tab for .tsv.
        label_key: column with the image's class label (name or integer); items then carry
            ``label``, for zero-shot validation. An image without a known label is skipped.
        classes: class names in label order; default: as ``ImageClassificationDataset`` finds them.
    """

    def __init__(
        self,
        manifest: str | Path,
        image_key: str = "filepath",
        caption_key: str = "title",
        transform: Callable | None = None,
        root: str | Path | None = None,
        captions: Literal["all", "random"] = "all",
        separator: str | None = None,
        label_key: str | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        rows = read_manifest(manifest, separator)
        require_columns(rows, [image_key, caption_key] + ([label_key] if label_key else []), manifest)
        root = Path(root) if root is not None else Path(manifest).parent
        self.transform = transform
        self.captions = captions
        self.images: list[str] = []  # image_id -> path
        self.texts: list[list[Any]] = []  # image_id -> its captions (possibly bad ones)
        index: dict[str, int] = {}
        for row in rows:
            rel = row.get(image_key)
            path = str(root / rel) if isinstance(rel, str) and rel else f"<row without {image_key}>"
            if path not in index:
                index[path] = len(self.images)
                self.images.append(path)
                self.texts.append([])
            caps = row.get(caption_key)
            self.texts[index[path]].extend(caps if isinstance(caps, list) else [caps])
        self.pairs = [(i, j) for i, caps in enumerate(self.texts) for j in range(len(caps))]
        self.labels: list[int | None] | None = None
        if label_key is not None:  # one label per image: that of its first row
            first = {}
            for row in rows:
                rel = row.get(image_key)
                first.setdefault(str(root / rel) if isinstance(rel, str) and rel else None, row.get(label_key))
            self.classes, self.labels = label_indices([first.get(path) for path in self.images], classes)

    def __len__(self) -> int:
        return len(self.pairs) if self.captions == "all" else len(self.images)

    def __getitem__(self, idx: int) -> dict[str, Any] | Skip:
        if self.captions == "all":
            image_id, j = self.pairs[idx]
        else:
            image_id = idx
            j = random.randrange(len(self.texts[image_id]))
        path = self.images[image_id]
        text = check_text(self.texts[image_id][j], f"{path} caption {j}")
        if isinstance(text, Skip):
            return text
        label = self.labels[image_id] if self.labels is not None else None
        if self.labels is not None and label is None:
            return Skip(BAD_LABEL, path, "label not among the classes")
        image = load_image(path)
        if isinstance(image, Skip):
            return image
        if self.transform is not None:
            image = self.transform(image)
        item = {"image": image, "text": text, "image_id": image_id}
        return item if label is None else {**item, "label": label}


class ImageClassificationDataset(Dataset):
    """(image, label) pairs from an ImageFolder tree (``root/class/x.jpg``) or a CSV / JSONL manifest.

    Args:
        source: a folder (torchvision's ImageFolder layout) or a manifest file.
        transform: applied to the RGB PIL image.
        image_key / label_key: manifest columns. Labels may be class names or integers.
        classes: class names in label order; default: sorted folder names, or the
            sorted distinct labels of the manifest (integer labels 0..max as given).
    """

    def __init__(
        self,
        source: str | Path,
        transform: Callable | None = None,
        image_key: str = "filepath",
        label_key: str = "label",
        classes: Sequence[str] | None = None,
    ) -> None:
        self.transform = transform
        source = Path(source)
        if source.is_dir():
            names, class_to_idx = find_classes(str(source))
            if classes is not None:
                class_to_idx = {c: i for i, c in enumerate(classes)}
                names = list(classes)
            self.samples: list[tuple[str, Any]] = make_dataset(str(source), class_to_idx, extensions=IMG_EXTENSIONS)
            self.classes = list(names)
        else:
            rows = read_manifest(source)
            require_columns(rows, [image_key, label_key], source)
            self.classes, labels = label_indices([row[label_key] for row in rows], classes)
            self.samples = [(str(source.parent / str(row[image_key])), y) for row, y in zip(rows, labels)]
        if not self.samples:
            raise ValueError(f"no images found in {source}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Any] | Skip:
        path, label = self.samples[idx]
        if label is None:
            return Skip(BAD_LABEL, path, f"label {label!r}")
        image = load_image(path)
        if isinstance(image, Skip):
            return image
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": label}
