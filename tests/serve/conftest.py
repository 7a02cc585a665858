"""Real ``mmlm serve`` processes on loopback over indexes of the bundled photographs, shared by the
tests of this folder and killed at the end of the session.

- ``indexes``: ``assets`` (the 21 photographs and their 49 captions) and ``dups`` (a folder with two
  identical copies of a photograph, another one, and a symlink to a photograph outside the folder).
- ``server``: both indexes, no API key.
- ``keyed_server``: ``assets`` only, an API key (given through ``MMLM_API_KEY``), CORS for one origin,
  and ``image_url`` allowed from the open server's ``/items/``.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mmlm.factory import load
from mmlm.paths import ASSETS
from mmlm.retrieval import Index, build_index

API_KEY = "s3cret-key"
ALLOWED_ORIGIN = "http://allowed.example"
STARTUP = 180  # seconds a server may take to come up on a busy 2-core machine


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None = None
    cors_origin: str | None = None

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request sent as written: no header added, the path not normalised."""
        host, port = self.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            connection.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def get(self, path: str, **headers: str) -> tuple[int, bytes]:
        status, _, data = self.request("GET", path, **headers)
        return status, data

    def post(self, path: str, body: bytes | str | dict, content_type: str | None = "application/json",
             **headers: str) -> tuple[int, bytes]:  # fmt: skip
        """POST ``body`` (a dict as JSON) with ``content_type``; None sends no Content-Type, as ClipClient does."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
        if content_type is not None:
            headers["Content-Type"] = content_type
        status, _, out = self.request("POST", path, data, **headers)
        return status, out

    def json(self, path: str, body: dict | None = None, **headers: str):
        status, data = self.get(path, **headers) if body is None else self.post(path, body, **headers)
        assert status == 200, (status, data[:500])
        return json.loads(data)


def start_server(args: list[str], cwd: Path, **env: str) -> Server:
    """``python -m mmlm.cli serve ARGS --port 0``: waits for the port it prints and for ``/healthz``."""
    log = cwd / "server.log"
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "mmlm.cli", "serve", *args, "--port", "0"],
                                   cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            server = Server(found.group(1), process, log)
            if server.get("/healthz")[0] == 200:
                return server
        if process.poll() is not None:
            raise AssertionError(f"mmlm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"mmlm serve did not come up in {STARTUP} s:\n{log.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


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
def server(indexes, tmp_path_factory):
    s = start_server([f"assets={indexes.assets.folder}", f"dups={indexes.dups.folder}"], tmp_path_factory.mktemp("open"))
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
