"""``mmlm serve --runtime onnx``: the query path with ONNX Runtime, ``tokenizers``, NumPy, Pillow and FAISS only.

The model is the indexes' own (clip-tiny, exported by ``mmlm convert --to onnx``, the ``onnx_folder`` fixture of
conftest.py): the ONNX path must answer what the torch path answers (same top-10 ids, scores within 1e-4 in
float32), in a process where torch cannot even be imported, and refuse a folder of other weights in one line."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _inprocess import serving
from _ranking import b64, item_of

from mmlm.cli import main
from mmlm.paths import ASSETS

SCORES = 1e-4  # fp32: the ONNX graphs and Pillow preprocessing against torch and torchvision
QUERIES = ["a rocket on its launch pad", "a cup of coffee", "a dog", "mountains"]
PHOTOS = ["rocket.jpg", "coffee_spoon.jpg", "astronaut.jpg"]

# an import hook refusing torch: the serving path must not even try
NO_TORCH = '''
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "lightning"):
            raise ImportError(f"the onnx serving path imported {name}")
        return None

sys.meta_path.insert(0, NoTorch())
'''

SERVE = '''
import base64, json, sys
from fastapi.testclient import TestClient
from mmlm.serve.app import create_app
from mmlm.serve.served import open_indexes
from mmlm.serve.settings import Settings

params = json.loads(sys.argv[1])
settings = Settings(threads=1, runtime="onnx")
served = open_indexes({"assets": params["index"]}, runtime="onnx", onnx=params["onnx"], threads=1)
encoder = served["assets"].runtime.encoder
with TestClient(create_app(settings, served)) as client:  # its start-up warms the text graph only
    text = client.post("/search", json={"text": "a rocket on its launch pad", "k": 10}).json()
    lazy = [encoder._image is None]
    image = client.post("/search", json={"image": params["image"], "k": 10}).json()
    lazy.append(encoder._image is None)
    explain = client.post("/explain", json={"text": "a rocket", "item": 0})
    indices = client.get("/indices").json()
print(json.dumps({"text": [h["id"] for h in text["hits"]], "text_scores": [h["score"] for h in text["hits"]],
                  "image": [h["id"] for h in image["hits"]], "explain": [explain.status_code, explain.json()],
                  "indices": indices, "lazy": lazy, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
'''


def run_python(code: str, *args: str, cwd: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                         check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


def hits(api, body: dict) -> tuple[list[int], np.ndarray]:
    answer = api.json("/search", body)["hits"]
    return [h["id"] for h in answer], np.array([h["score"] for h in answer])


def same_answers(torch_api, onnx_api, bodies: list[dict]) -> None:
    for body in bodies:
        (ids, scores), (onnx_ids, onnx_scores) = hits(torch_api, body), hits(onnx_api, body)
        assert onnx_ids == ids, body.get("text") or "image"
        np.testing.assert_allclose(onnx_scores, scores, atol=SCORES, rtol=0)


@pytest.mark.server  # a process of its own: one that may import torch would prove nothing
def test_the_onnx_path_answers_without_torch(indexes, onnx_folder, tmp_path):
    params = json.dumps({"index": str(indexes.assets.folder), "onnx": str(onnx_folder),
                         "image": b64(ASSETS / "images" / "rocket.jpg")})  # fmt: skip
    out = run_python(NO_TORCH + textwrap.dedent(SERVE), params, cwd=tmp_path)
    assert out["torch"] == []
    assert out["lazy"] == [True, False]  # the image graph: built by the first image query, not at start
    assert out["image"][0] == item_of("rocket.jpg") and len(out["text"]) == 10
    assert out["explain"][0] == 400 and "--runtime torch" in out["explain"][1]["detail"]
    assert (out["indices"][0]["runtime"], out["indices"][0]["explain"]) == ("onnx", False)


@pytest.mark.slow  # two servers in this process over two indexes: ~6 s
def test_onnx_answers_what_torch_answers(indexes, digits_index, onnx_folder):
    folders = {"assets": str(indexes.assets.folder), "digits": str(digits_index)}
    with serving(folders) as torch_api, serving(folders, runtime="onnx", onnx=onnx_folder) as onnx_api:
        assert {i["runtime"] for i in onnx_api.json("/indices")} == {"onnx"}
        photos = [{"image": b64(ASSETS / "images" / name), "k": 10} for name in PHOTOS]
        same_answers(torch_api, onnx_api, [{"text": q, "k": 10} for q in QUERIES] + photos)
        same_answers(torch_api, onnx_api, [{"text": q, "k": 10, "modality": "text"} for q in QUERIES[:2]])
        # a digit has no file: its pixels are rendered (no torchvision) and preprocessed by the runtime
        status, png = onnx_api.get("/items/digits/7/image")
        assert status == 200 and png.startswith(b"\x89PNG")
        digits = [{"text": "a handwritten seven", "k": 10, "index": "digits"},
                  {"image": base64.b64encode(png).decode(), "k": 10, "index": "digits"}]  # fmt: skip
        same_answers(torch_api, onnx_api, digits)
        # an item of one index as the query of another: the stored embedding (one runtime serves both)
        body = {"text": "", "image_url": "/items/digits/7/image", "indice_name": "assets", "num_images": 10,
                "deduplicate": False}  # fmt: skip
        torch_ids = [r["id"] for r in torch_api.json("/knn-service", body)]
        assert [r["id"] for r in onnx_api.json("/knn-service", body)] == torch_ids


def test_a_folder_of_other_weights_or_none_is_refused_in_one_line(indexes, onnx_folder, tmp_path, capsys):
    other = tmp_path / "other.onnx"
    shutil.copytree(onnx_folder, other)
    meta = json.loads((other / "onnx.json").read_text())
    (other / "onnx.json").write_text(json.dumps({**meta, "weights_hash": "0" * 64}))
    index = indexes.assets.folder
    beside = index.with_name(index.name.removesuffix(".index") + ".onnx")
    onnx = ["--runtime", "onnx"]
    for args, says in (([*onnx, "--onnx", str(other)], [str(other), str(index), "0" * 12]),  # other weights
                       (onnx, [str(beside), str(index)]),  # none beside the index
                       (["--onnx", str(other)], ["--runtime onnx"])):  # fmt: skip
        with pytest.raises(SystemExit) as exit:  # before any server starts: refused while opening the indexes
            main(["serve", str(index), *args, "--port", "0"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("mmlm serve: error: ") and all(s in lines[0] for s in says), lines[0]


def test_onnx_folder_beside_the_index(tmp_path):
    from mmlm.serve.runtime.load import onnx_beside

    assert onnx_beside(tmp_path / "photos.index") == tmp_path / "photos.onnx"
    assert onnx_beside(tmp_path / "photos") == tmp_path / "photos.onnx"
    assert onnx_beside(tmp_path / "a.index.index") == tmp_path / "a.index.onnx"


def test_pixels_of_the_torch_runtime_are_numpy(indexes):
    from PIL import Image

    from mmlm.factory import load
    from mmlm.serve.runtime.torch import TorchRuntime

    loaded = load("clip-tiny", seed=0)
    runtime = TorchRuntime(loaded.model, loaded.require_tokenizer(), "cpu", weights_hash=loaded.weights_hash)
    pixels = runtime.preprocess(Image.open(io.BytesIO((ASSETS / "images" / "rocket.jpg").read_bytes())).convert("RGB"))
    assert pixels.dtype == np.float32 and pixels.shape == (3, runtime.image_size, runtime.image_size)
    vectors = runtime.encode_image(np.stack([pixels, pixels]))
    assert vectors.shape == (2, runtime.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    stored = indexes.assets.embeddings("image")[item_of("rocket.jpg")]
    np.testing.assert_allclose(vectors[0], stored, atol=1e-5)
    assert runtime.weights_hash == indexes.assets.manifest["model"]["weights_hash"] and runtime.can_explain
