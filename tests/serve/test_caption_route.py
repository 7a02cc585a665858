"""``POST /caption``: a CoCa index's model says what is in an uploaded image or a stored item, with the words
``mmlm caption`` prints for the same picture (one decoding path, ``mmlm.caption.captions_of``); a CLIP index
refuses with a 400, bad bodies get a 422."""

from __future__ import annotations

import base64
import shutil

import pytest
import torch
from _inprocess import serving
from PIL import Image

from mmlm.caption import caption as caption_command
from mmlm.paths import ASSETS
from mmlm.retrieval import build_index


@pytest.fixture(scope="module")
def coca_index(tmp_path_factory):
    """Three photographs indexed by coca-tiny (random weights, seed 0: what ``mmlm caption coca-tiny`` loads)."""
    root = tmp_path_factory.mktemp("coca")
    for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(ASSETS / "images" / name, root / name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_index("coca-tiny", str(root), root.parent / "coca.index", batch_size=8, accelerator="cpu").close()
    finally:
        torch.set_num_threads(threads)
    return root


def test_caption_answers_what_mmlm_caption_prints(coca_index, indexes, capsys):
    expected = {r["image"]: r["caption"] for r in caption_command(
        ["coca-tiny", *(str(coca_index / n) for n in ("astronaut.jpg", "rocket.jpg"))], max_new_tokens=8)}  # fmt: skip
    capsys.readouterr()
    assert all(expected.values())  # random weights still write some words
    upload = base64.b64encode((coca_index / "astronaut.jpg").read_bytes()).decode()
    with serving({"coca": str(coca_index.parent / "coca.index"), "assets": str(indexes.assets.folder)}) as api:
        by_upload = api.json("/caption", {"image": upload, "max_new_tokens": 8})
        assert by_upload == {"caption": expected[str(coca_index / "astronaut.jpg")], "index": "coca"}
        rocket = next(i for i in range(3) if api.json(f"/items/coca/{i}")["filepath"] == "rocket.jpg")
        by_item = api.json("/caption", {"item": rocket, "index": "coca", "max_new_tokens": 8})
        assert by_item["caption"] == expected[str(coca_index / "rocket.jpg")]

        status, answer = api.post("/caption", {"item": 0, "index": "assets"})
        assert status == 400 and "cannot caption" in answer["detail"]
        for bad in ({}, {"item": 0, "image": upload}, {"item": 0, "max_new_tokens": 0}, {"item": 0, "num_beams": 9},
                    {"item": 0, "colour": 1}):  # fmt: skip
            assert api.post("/caption", {"index": "coca", **bad})[0] == 422, bad
        assert api.post("/caption", {"index": "coca", "item": 99})[0] == 404
        assert api.post("/caption", {"index": "coca", "image": "bm90IGFuIGltYWdl"})[0] == 415  # "not an image": an unsupported media type, as /search answers it


def test_a_caption_of_a_decoded_image_is_the_commands(coca_index):
    """The runtime decodes the picture as the command does: the same RGB image gives the same words."""
    from mmlm.factory import load
    from mmlm.serve.runtime.torch import TorchRuntime

    loaded = load("coca-tiny")
    runtime = TorchRuntime(loaded.model, loaded.require_tokenizer(), "cpu")
    assert runtime.can_caption
    with Image.open(coca_index / "coffee.jpg") as im:
        text = runtime.caption(im.convert("RGB"), max_new_tokens=6, num_beams=2)
    assert text == caption_command(["coca-tiny", str(coca_index / "coffee.jpg")], max_new_tokens=6, num_beams=2)[0][
        "caption"]  # fmt: skip
