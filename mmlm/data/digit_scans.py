"""scikit-learn's 1,797 handwritten digits as pictures and captions, without torch: ``mmlm serve`` renders a
digits index's items from here, and ``mmlm.data.digits`` makes the same scans a torch ``Dataset``."""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
from PIL import Image

DIGIT_CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "a scan of a handwritten digit {}.",
    "the digit {} written by hand.",
    "a blurry low resolution image of the number {}.",
)


class DigitScans:
    """8x8 scans (16 grey levels) with one caption each, drawn by ``seed`` from ``DIGIT_TEMPLATES``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int, image_size: int) -> None:
        self.images, self.labels, self.image_size = images, labels, image_size
        rng = random.Random(seed)
        self.captions = [
            rng.choice(DIGIT_TEMPLATES).format(DIGIT_CLASSNAMES[y] if rng.random() < 0.5 else str(y)) for y in labels
        ]
        self.classes = list(DIGIT_CLASSNAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, idx: int) -> Image.Image:
        """The scan as an RGB PIL image, ``image_size`` px, ink dark on white."""
        pixels = (255 - self.images[idx] * (255 / 16)).round().astype(np.uint8)
        im = Image.fromarray(pixels).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return im.convert("RGB")


def digits_split(split: Literal["train", "test"], seed: int = 0, test_fraction: float = 0.2
                 ) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """(scans, labels, caption seed) of the train or held-out split, stratified by class and fixed by ``seed``;
    the two splits never share a scan, and draw their captions with different seeds."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is a dev dependency
        raise ImportError("the digits set ships with scikit-learn: pip install scikit-learn") from e
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=digits.target)
    keep = np.sort(train if split == "train" else test)
    return digits.images[keep], digits.target[keep], seed + (split == "test")


def digit_scans(split: Literal["train", "test"], seed: int = 0, test_fraction: float = 0.2, image_size: int = 32
                ) -> DigitScans:  # fmt: skip
    """The scans of ``split`` as ``mmlm.data.digits.digits_image_text`` has them, without a transform."""
    images, labels, caption_seed = digits_split(split, seed, test_fraction)
    return DigitScans(images, labels, caption_seed, image_size)
