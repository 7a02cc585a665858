"""A running server serves the new version an `mmlm index sync` writes, without a restart and without failing a
query: queries run without pause through the swap, and /search finds the new file within a few seconds."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _inprocess import serving
from PIL import Image

from mmlm.retrieval import build_index, sync_index

N = 40


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def folder_index(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(N):
        (images / f"{i:03d}.png").write_bytes(noise_png(i))
    index = build_index("clip-tiny", str(images), tmp_path / "ix", batch_size=64, accelerator="cpu")
    assert index is not None
    index.close()
    return images, tmp_path / "ix"


@pytest.mark.slow  # polls a server through a sync: 3 s
@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_a_sync_is_served_without_a_restart_and_no_query_fails(folder_index, runtime, request):
    images, ix = folder_index
    new = noise_png(10_000)
    query = {"image": base64.b64encode(new).decode(), "k": 3}
    chosen = {"runtime": "onnx", "onnx": request.getfixturevalue("onnx_folder")} if runtime == "onnx" else {}
    with serving({"f": str(ix)}, reload_s=0.2, **chosen) as api:
        assert [(i["name"], i["version"], i["items"]) for i in api.json("/indices")] == [("f", "v000001", N)]
        assert api.json("/search", query)["hits"][0]["metadata"]["filepath"] != "new.png"
        statuses: list[int] = []
        stop = threading.Event()

        def hammer() -> None:  # queries without pause, before, during and after the swap
            while not stop.is_set():
                for body in ({"text": "noise", "k": 5}, {"item": 3, "k": 5}):
                    status, answer = api.post("/search", body)
                    statuses.append(status)
                    assert status != 200 or all("filepath" in h["metadata"] for h in answer["hits"])

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            (images / "new.png").write_bytes(new)
            (images / "000.png").unlink()
            os.rename(images / "001.png", images / "renamed.png")
            synced, report = sync_index(ix)
            synced.close()
            assert report["version"] == "v000002" and report["counts"]["embedded"] == 1
            swapped = time.monotonic()
            while time.monotonic() - swapped < 10:
                hits = api.json("/search", query)["hits"]
                if hits[0]["metadata"]["filepath"] == "new.png":
                    break
                time.sleep(0.05)
            took = time.monotonic() - swapped
            time.sleep(0.5)  # more queries on the new version
        finally:
            stop.set()
            thread.join(30)
        assert hits[0]["metadata"]["filepath"] == "new.png" and hits[0]["score"] > 0.999 and took < 5
        assert [(i["version"], i["items"]) for i in api.json("/indices")] == [("v000002", N)]
        assert len(statuses) > 20 and set(statuses) == {200}, sorted(set(statuses))
        paths = {h["metadata"]["filepath"] for h in api.json("/search", {"text": "noise", "k": N})["hits"]}
        assert "000.png" not in paths and "001.png" not in paths and {"renamed.png", "new.png"} <= paths
        # the replaced Index is closed after its grace, or at shutdown at the latest
        retired = [index for _, index in api.app.state.reloader.retired]
        assert len(retired) == 1 and not retired[0].closed
    assert retired[0].closed
