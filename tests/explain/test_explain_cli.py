"""``mmlm explain`` as people type it: heatmap and attention PNGs for a CLIP, HTML / PNG token
attributions for a text classifier, and one error line for each mistake."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import mmlm
from mmlm.cli import main
from mmlm.config import TextWithHeadsConfig, from_name
from mmlm.data.tokenizers import get_tokenizer
from mmlm.explain.heatmaps import image_tensor, text_embeddings
from mmlm.paths import ASSETS

PHOTO = ASSETS / "images" / "chelsea.jpg"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MMLM_DEBUG", raising=False)


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    """A text classifier saved as an mmlm folder with its tokenizer beside it."""
    tokenizer = get_tokenizer("assets/tokenizer", context_length=128)
    text = from_name("bert-tiny", vocab_size=tokenizer.vocab_size, context_length=128)
    model = mmlm.create_model(TextWithHeadsConfig(text=text, heads=("pooler", "classifier"), num_labels=4))
    folder = tmp_path_factory.mktemp("classifier")
    mmlm.save(model, folder, overwrite=True)
    tokenizer.save(folder)
    return folder


def png(path) -> Image.Image:
    picture = Image.open(io.BytesIO(path.read_bytes()))
    assert picture.format == "PNG"
    return picture


@pytest.mark.slow
def test_heatmaps_of_two_captions(tmp_path, capsys):
    out = tmp_path / "heat.png"
    main(["explain", "clip-tiny", str(PHOTO), "a tabby cat", "a rocket", "--method", "occlusion", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    model = mmlm.resolve("clip-tiny", seed=0).eval()
    photo = Image.open(PHOTO).convert("RGB")
    with torch.no_grad():
        cosines = model.encode_image(image_tensor(model.visual, photo)) @ text_embeddings(model, ["a tabby cat", "a rocket"]).T
    assert printed[:2] == [f"{c:+.3f}  {t}" for c, t in zip(cosines[0].tolist(), ["a tabby cat", "a rocket"])]
    assert png(out).width > png(out).height  # the photo and two overlays side by side


def test_attention_grid(tmp_path):
    out = tmp_path / "sub" / "attention.png"
    main(["explain", "clip-tiny", str(PHOTO), "--method", "attention", "--out", str(out)])
    assert png(out).height > 0


def test_token_attributions(classifier_folder, tmp_path, capsys):
    out = tmp_path / "why.html"
    main(["explain", str(classifier_folder), "--text", "Special names customise module attribute access.",
          "--classes", "[statement, expression, datamodel, builtins]", "--out", str(out)])  # fmt: skip
    page = out.read_text()
    assert ">customise</span>" in page or ">custom" in page
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}"
    main(["explain", str(classifier_folder), "--text", "a short text", "--out", str(tmp_path / "why.png")])
    assert png(tmp_path / "why.png").width == 800


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["explain", *args])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmlm explain: error: ")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.slow
def test_mistakes_give_one_line(classifier_folder, tmp_path, capsys):
    assert "image nope.png does not exist" in fails(capsys, "clip-tiny", "nope.png", "a cat")
    assert "give one or more texts after the image" in fails(capsys, "clip-tiny", str(PHOTO))
    assert "--text explains a text classifier alone" in fails(capsys, "clip-tiny", str(PHOTO), "--text", "a cat")
    assert "text classifier" in fails(capsys, "clip-tiny", "--text", "a cat")
    assert "image heatmaps need a CLIP" in fails(capsys, str(classifier_folder), str(PHOTO), "a cat")
    assert "name a .png file" in fails(capsys, "clip-tiny", str(PHOTO), "a cat", "--out", str(tmp_path / "h.jpg"))
    assert "--classes names 2 classes; the classifier has 4" in fails(
        capsys, str(classifier_folder), "--text", "a", "--classes", "[a, b]")
    assert "not-a-model" in fails(capsys, "not-a-model", str(PHOTO), "a cat")
    assert "--method nope: expected one of similarity, rollout, gradcam, occlusion, attention" in fails(
        capsys, "clip-tiny", str(PHOTO), "a cat", "--method", "nope")  # a value outside the choices
