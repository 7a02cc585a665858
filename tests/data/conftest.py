"""Fixtures for the data tests: the bundled assets and real digit images."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mmlm.data import ASSETS, digits_image_text, get_tokenizer


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def wordpiece():
    """The WordPiece tokenizer trained on assets/corpus.txt."""
    return get_tokenizer(ASSETS / "tokenizer")


@pytest.fixture(scope="session")
def digit_jpegs() -> list[tuple[bytes, str]]:
    """(JPEG bytes, caption) of 120 real handwritten digits."""
    ds = digits_image_text("train", seed=0)
    out = []
    for i in range(120):
        buf = io.BytesIO()
        ds.image(i).save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), ds.captions[i]))
    return out
