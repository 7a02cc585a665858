"""A real image-caption set that needs no download: scikit-learn's 1,797 handwritten digits.

Each 8x8 scan (16 grey levels) becomes a dark-on-white RGB image with a caption
drawn from ``DIGIT_TEMPLATES`` (spelled-out or numeral class name). The same
class names and templates build a zero-shot classifier. The scans themselves (no torch) are in
``mmlm.data.digit_scans``; this module makes them a torch ``Dataset``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from torch.utils.data import Dataset

from mmlm.data.digit_scans import DIGIT_CLASSNAMES as DIGIT_CLASSNAMES
from mmlm.data.digit_scans import DIGIT_TEMPLATES as DIGIT_TEMPLATES
from mmlm.data.digit_scans import DigitScans, digits_split


class DigitsImageText(DigitScans, Dataset):
    """Digit images with one caption each; items ``{"image", "text", "label", "image_id"}``."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, seed: int, image_size: int, transform: Callable | None
    ) -> None:
        super().__init__(images, labels, seed, image_size)
        self.transform = transform

    def __getitem__(self, idx: int) -> dict[str, Any]:
        image: Any = self.image(idx)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "text": self.captions[idx], "label": int(self.labels[idx]), "image_id": idx}


def digits_image_text(
    split: Literal["train", "test"],
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int = 32,
    transform: Callable | None = None,
) -> DigitsImageText:
    """The train or held-out split of the digits, stratified by class and fixed by ``seed``.

    Args:
        split: ``"train"`` or ``"test"``; the two never share an image.
        seed: fixes the split and the caption drawn for each image.
        test_fraction: share of each class held out.
        image_size: side of the upsampled image (bicubic from 8x8).
        transform: applied to the RGB PIL image (e.g. ``image_transform(cfg, train)``).
    """
    images, labels, caption_seed = digits_split(split, seed, test_fraction)
    return DigitsImageText(images, labels, caption_seed, image_size, transform)


def write_clip_benchmark_wds(root: str | Path, split: Literal["train", "test"] = "test", shards: int = 2) -> Path:
    """The digits ``split`` as a CLIP_benchmark ``wds`` folder (the layout its ``clip_benchmark_export_wds`` writes).

    ``root/SPLIT/0.tar ...`` hold PNG + ``cls`` samples (item ``i`` in shard ``i % shards``), with
    ``root/SPLIT/nshards.txt``, ``root/classnames.txt`` and ``root/zeroshot_classification_templates.txt``
    (``{c}`` marks the class). Read it with ``clip_benchmark eval --dataset wds/digits --dataset_root ROOT``
    or ``mmlm zeroshot MODEL --dataset ROOT``. ``root`` must be new or empty: nothing is overwritten.
    """
    import webdataset as wds

    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} already exists and is not an empty folder: give a new one")
    if shards < 1:
        raise ValueError(f"shards={shards}: give a number >= 1")
    (root / split).mkdir(parents=True)
    ds = digits_image_text(split)
    for shard in range(shards):
        with wds.TarWriter(str(root / split / f"{shard}.tar")) as sink:
            for i in range(shard, len(ds), shards):
                png = io.BytesIO()
                ds.image(i).save(png, format="PNG")  # PNG keeps every pixel
                sink.write({"__key__": f"s{i:04d}", "png": png.getvalue(), "cls": int(ds.labels[i])})
    (root / split / "nshards.txt").write_text(str(shards))
    (root / "classnames.txt").write_text("\n".join(DIGIT_CLASSNAMES) + "\n")
    templates = [t.replace("{}", "{c}") for t in DIGIT_TEMPLATES]  # CLIP_benchmark's placeholder is {c}
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root
