"""Real ``mmlm serve`` processes on loopback over indexes of the bundled photographs, shared by the
tests of this folder and killed at the end of the session.

- ``indexes``: ``assets`` (the 21 photographs and their 49 captions) and ``dups`` (a folder with two
  identical copies of a photograph, another one, and a symlink to a photograph outside the folder).
- ``server``: both indexes, no API key; ``onnx_server``: the same with ``--runtime onnx`` (``onnx_folder``:
  clip-tiny exported to ONNX); ``digits_index``: the digits' test split.
- ``keyed_server``: ``assets`` only, an API key (given through ``MMLM_API_KEY``), CORS for one origin,
  and ``image_url`` allowed from the open server's ``/items/``.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _process import start_server, stop_server

from mmlm.factory import load
from mmlm.paths import ASSETS
from mmlm.retrieval import Index, build_index

API_KEY = "s3cret-key"
ALLOWED_ORIGIN = "http://allowed.example"
@dataclass
class Indexes:
    assets: Index
    dups: Index
    outside: Path  # the photograph the dups folder's symlink points at


@pytest.fixture(scope="session")
def indexes(tmp_path_factory) -> Indexes:
    root = tmp_path_factory.mktemp("indexes")
    photos = root / "dups-data"
    photos.mkdir()
    shutil.copy(ASSETS / "images" / "astronaut.jpg", photos / "a.jpg")
    shutil.copy(ASSETS / "images" / "astronaut.jpg", photos / "b.jpg")
    shutil.copy(ASSETS / "images" / "coffee.jpg", photos / "c.jpg")
    outside = root / "outside" / "rocket.jpg"
    outside.parent.mkdir()
    shutil.copy(ASSETS / "images" / "rocket.jpg", outside)
    (photos / "link.jpg").symlink_to(outside)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from two threads on a busy machine
    try:
        assets = build_index("clip-tiny", str(ASSETS / "captions.csv"), root / "assets", batch_size=32, accelerator="cpu")
        dups = build_index("clip-tiny", str(photos), root / "dups", batch_size=32, accelerator="cpu")
    finally:
        torch.set_num_threads(threads)
    return Indexes(assets, dups, outside)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def digits_index(tmp_path_factory) -> Path:
    """The digits' test split (360 scans, no image files) indexed with clip-tiny."""
    folder = tmp_path_factory.mktemp("digits") / "digits"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_index("clip-tiny", "digits", folder, batch_size=128, accelerator="cpu").close()
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture(scope="session")
def onnx_folder(tmp_path_factory) -> Path:
    """The indexes' model (clip-tiny, seed 0) as ``mmlm convert MODEL DST --to onnx`` exports it."""
    from mmlm.export import export

    loaded = load("clip-tiny", seed=0)
    return Path(export(loaded.model, tmp_path_factory.mktemp("onnx") / "clip-tiny.onnx", "onnx",
                       tokenizer=loaded.require_tokenizer()))  # fmt: skip


@pytest.fixture(scope="session")
def server(indexes, tmp_path_factory):
    s = start_server([f"assets={indexes.assets.folder}", f"dups={indexes.dups.folder}"], tmp_path_factory.mktemp("open"))
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def onnx_server(indexes, onnx_folder, tmp_path_factory):
    """``server`` with ``--runtime onnx``: the same indexes, queries encoded by ONNX Runtime."""
    args = [f"assets={indexes.assets.folder}", f"dups={indexes.dups.folder}", "--runtime", "onnx", "--onnx",
            str(onnx_folder)]  # fmt: skip
    s = start_server(args, tmp_path_factory.mktemp("onnx-server"))
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def keyed_server(indexes, server, tmp_path_factory):
    args = [f"assets={indexes.assets.folder}", "--cors_origins", ALLOWED_ORIGIN,
            "--image_url_allow", f"{server.url}/items/"]  # fmt: skip
    s = start_server(args, tmp_path_factory.mktemp("keyed"), MMLM_API_KEY=API_KEY)
    s.api_key, s.cors_origin = API_KEY, ALLOWED_ORIGIN
    yield s
    stop_server(s)


@dataclass
class Reference:
    """The model and data the indexes were built from, to compute what a search must return."""

    model: torch.nn.Module
    items: dict[str, list[str]]  # captions.csv: file path -> its captions, in manifest order

    def text(self, texts: list[str]) -> np.ndarray:
        tokens = load(self.model).require_tokenizer()(texts)
        with torch.no_grad():
            return self.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()


@pytest.fixture(scope="session")
def reference() -> Reference:
    with open(ASSETS / "captions.csv", newline="") as f:
        items: dict[str, list[str]] = {}
        for row in csv.DictReader(f):
            items.setdefault(row["filepath"], []).append(row["title"])
    return Reference(load("clip-tiny", seed=0).model, items)
