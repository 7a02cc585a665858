"""Fixtures for the zero-shot tests: a small mmlm checkpoint and the digits test split as real files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import mmlm
from mmlm.data import DIGIT_CLASSNAMES, digits_image_text


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random clip-tiny saved as an mmlm folder, its weights shaken so that predictions spread over classes."""
    torch.manual_seed(0)
    model = mmlm.create_model("clip-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # from OpenCLIP's init, 0.1 still predicts one class for all
    return mmlm.save(model, tmp_path_factory.mktemp("ckpt") / "clip-tiny")


@pytest.fixture(scope="session")
def digit_pngs() -> list[tuple[bytes, int]]:
    """(PNG bytes, label) of the 360 real scans of the digits test split; PNG keeps every pixel."""
    ds = digits_image_text("test")
    out = []
    for i in range(len(ds)):
        buf = io.BytesIO()
        ds.image(i).save(buf, format="PNG")
        out.append((buf.getvalue(), int(ds.labels[i])))
    return out


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory, digit_pngs) -> Path:
    """The digits test split as an ImageFolder: root/<class name>/<i>.png."""
    root = tmp_path_factory.mktemp("digits_folder")
    for i, (png, label) in enumerate(digit_pngs):
        folder = root / DIGIT_CLASSNAMES[label]
        folder.mkdir(exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(png)
    return root
