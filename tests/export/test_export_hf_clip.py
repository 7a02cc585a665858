"""mmlm CLIP -> ``export(model, DIR, "hf")`` -> transformers' own CLIPModel, AutoProcessor and pipeline.

The transformers side always runs in a process that cannot import mmlm, offline (``_client``): the
folder must carry everything, tokenizer and preprocessing included.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _client import run_client
from PIL import Image

import mmlm
from mmlm.config import update
from mmlm.convert import ConversionError
from mmlm.data import image_transform
from mmlm.data.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, digits_image_text
from mmlm.data.eval_datasets import classification_data
from mmlm.data.tokenizers import Tokenizer, clip_tokenizer, train_tokenizer
from mmlm.eval.zeroshot import build_classifier
from mmlm.export import export
from mmlm.export.convert import convert
from mmlm.paths import ASSETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from _parity import assert_parity, randomize_

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLASSES = list(DIGIT_CLASSNAMES)
SENTENCES = [
    "A photo of a cat.",
    "Hello, World! It's 2024: 3.14159 & 42% off... (really?)",
    "Naïve café owners in Zürich said: déjà vu!",
    "cafe\u0301 with a combining accent, ÅNGSTRÖM and Ça coûte 12,50 €",
    "Don't stop   believin' -- #1 @home $5.00 [ok] 東京 2020; Москва",
    "the quick brown fox jumps over the lazy dog " * 8,  # longer than clip-tiny's 32 tokens
]


def _varied(**overrides) -> mmlm.CLIP:
    """Towers of different width / heads / depth, patch 8 on 40 px, random weights off their init."""
    cfg = update(
        mmlm.from_name("clip-tiny"),
        vision={"width": 48, "heads": 3, "depth": 3, "image_size": 40},
        text={"width": 64, "heads": 4, "depth": 2},
        **overrides,
    )
    return randomize_(mmlm.create_model(cfg)).eval()


@torch.no_grad()
def _digit_clip() -> mmlm.CLIP:
    """clip-tiny that tells digits apart: perturbed random towers, projections fitted by least squares
    so that a digit's images and prompts land on the same axis (random towers alone put every image
    in one class)."""
    model = randomize_(mmlm.create_model("clip-tiny")).eval()
    train = digits_image_text("train", transform=image_transform(model.cfg.vision, train=False))
    images = torch.stack([train[i]["image"] for i in range(400)])
    prompts = [t.format(name) for c in range(10) for t in DIGIT_TEMPLATES for name in (CLASSES[c], str(c))]
    tokens = clip_tokenizer(model.cfg.text.context_length)(prompts)

    def fit(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = F.one_hot(labels, model.cfg.embed_dim).float()
        return torch.linalg.solve(x.T @ x + 1e-2 * torch.eye(x.shape[1]), x.T @ y).T

    image_features = model.visual.pool(model.visual.forward_features(images))
    text_features = model.text(tokens["input_ids"], tokens["attention_mask"])
    model.visual_projection.weight.copy_(fit(image_features, torch.as_tensor(train.labels[:400])))
    model.text_projection.weight.copy_(fit(text_features, torch.arange(10).repeat_interleave(len(prompts) // 10)))
    return model


def _fit_checkpoint(init: Path, root: Path) -> Path:
    """The ``last.ckpt`` of a one-step ``mmlm fit`` of the digits config, starting from ``init``."""
    from mmlm.cli import lightning_cli

    lightning_cli(["fit", "--config", str(ROOT / "configs/align/clip-digits-tiny.yaml"),
                   "--model.init_args.model", str(init), "--trainer.max_steps", "1",
                   "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
                   "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = root.glob("**/last.ckpt")
    return ckpt


# ------------------------------------------------------------------------------ digits, from `mmlm fit`

DIGITS_CLIENT = """
import json, torch, transformers
from PIL import Image

spec = json.load(open("inputs.json"))
model = transformers.CLIPModel.from_pretrained("hf").eval()
processor = transformers.AutoProcessor.from_pretrained("hf")
pipe = transformers.pipeline("zero-shot-image-classification", model="hf")
images = [Image.open(p) for p in spec["images"]]
tokenizers = {}
for name in ("CLIPTokenizer", "CLIPTokenizerFast", "AutoTokenizer"):
    tok = getattr(transformers, name).from_pretrained("hf")
    tokenizers[name] = {"class": type(tok).__name__, "model_max_length": tok.model_max_length,
                        "ids": tok(spec["sentences"], truncation=True)["input_ids"]}
scores = {t: [{r["label"]: r["score"] for r in rows}
              for rows in pipe(images, candidate_labels=spec["classes"], hypothesis_template=t,
                              batch_size=len(images))]
          for t in spec["templates"]}
pixels = processor(images=images, return_tensors="pt")["pixel_values"]
text = processor(text=spec["sentences"], padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    image_embeds = model.get_image_features(pixel_values=pixels)
    text_embeds = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
torch.save({"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
            "image_embeds": getattr(image_embeds, "pooler_output", image_embeds),
            "text_embeds": getattr(text_embeds, "pooler_output", text_embeds)}, "hf_out.pt")
print(json.dumps({"processor": [type(processor).__name__, type(processor.tokenizer).__name__,
                                type(processor.image_processor).__name__],
                  "tokenizers": tokenizers, "scores": scores}))
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """A one-step `mmlm fit` checkpoint of a digit-telling clip-tiny, through ``convert(ckpt, DIR, "hf")``,
    queried by transformers on 60 held-out digit scans saved as PNG files."""
    torch.manual_seed(0)  # module fixtures run before the per-test seed
    root = tmp_path_factory.mktemp("digits")
    ckpt = _fit_checkpoint(mmlm.save(_digit_clip(), root / "init"), root / "runs")
    convert(ckpt, root / "hf", "hf")
    model = mmlm.load_pretrained(ckpt)
    data = classification_data("digits", image_transform(model.cfg.vision, train=False), split="test")
    paths = []
    for i in range(60):
        data.dataset.image(i).save(root / f"{i}.png")
        paths.append(f"{i}.png")
    spec = {"images": paths, "classes": CLASSES, "templates": list(DIGIT_TEMPLATES), "sentences": SENTENCES}
    (root / "inputs.json").write_text(json.dumps(spec))
    out = run_client(DIGITS_CLIENT, cwd=root)
    return {"root": root, "model": model, "labels": torch.as_tensor(data.dataset.labels[:60]),
            "images": [Image.open(root / p) for p in paths], "out": out, "hf": torch.load(root / "hf_out.pt")}  # fmt: skip


@pytest.mark.slow
def test_fit_checkpoint_converts_to_a_complete_transformers_folder(digits):
    folder, vision = digits["root"] / "hf", digits["model"].cfg.vision
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json",
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
        ".mmlm-output.json",  # the marker: `convert --overwrite` may replace this folder, and only this kind
    }  # fmt: skip
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": vision.image_size} and pre["resample"] == 3  # PIL bicubic
    assert pre["crop_size"] == {"height": vision.image_size, "width": vision.image_size}
    assert (pre["image_mean"], pre["image_std"]) == (list(vision.image_mean), list(vision.image_std))
    assert digits["out"]["processor"] == ["CLIPProcessor", "CLIPTokenizer", "CLIPImageProcessor"]
    back, trained = mmlm.load_pretrained(folder).state_dict(), digits["model"].state_dict()
    assert back.keys() == trained.keys()
    for k, v in trained.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)


def test_clip_tokenizer_gives_mmlm_ids_and_truncates_at_the_context(digits):
    ours = clip_tokenizer(32)
    expected = [ours.encode(s) for s in SENTENCES]
    assert len(expected[-1]) == 32  # the long sentence is cut, its end-of-text kept
    for name, got in digits["out"]["tokenizers"].items():
        assert got["class"] == "CLIPTokenizer" and got["model_max_length"] == 32, name
        assert got["ids"] == expected, name


def test_pipeline_predicts_as_mmlm_zeroshot(digits):
    """transformers' zero-shot pipeline on the PNG files = `mmlm zeroshot`'s classifier, template by template."""
    model, labels = digits["model"], digits["labels"]
    transform = image_transform(model.cfg.vision, train=False)
    tok = clip_tokenizer(model.cfg.text.context_length)
    with torch.no_grad():
        features = model.encode_image(torch.stack([transform(im) for im in digits["images"]]))
        for template in DIGIT_TEMPLATES:
            logits = model.scale() * features @ build_classifier(model, tok, CLASSES, [template])  # (60, 10)
            ours = logits.argmax(1)
            hf = digits["out"]["scores"][template]
            theirs = torch.tensor([CLASSES.index(max(s, key=s.get)) for s in hf])
            assert torch.equal(theirs, ours), template
            assert len(ours.unique()) >= 5, f"{template}: degenerate predictions {ours.bincount(minlength=10)}"
            scores = torch.tensor([[s[c] for c in CLASSES] for s in hf])
            gap = assert_parity(scores, logits.softmax(-1), atol=1e-4, what=f"pipeline scores, {template!r}")
            accuracy = (ours == labels).double().mean().item()
            print(f"[digits] {template!r}: top-1 agreement 60/60, accuracy {accuracy:.3f}, score gap {gap:.1e}")


def test_clip_model_and_processor_give_mmlm_inputs_and_embeddings(digits):
    model, hf = digits["model"], digits["hf"]
    transform = image_transform(model.cfg.vision, train=False)
    pixels = torch.stack([transform(im) for im in digits["images"]])
    assert_parity(hf["pixel_values"], pixels, atol=1e-6, what="processor pixel_values vs mmlm eval transform")
    tokens = clip_tokenizer(model.cfg.text.context_length)(SENTENCES)
    mask = tokens["attention_mask"]
    assert torch.equal(hf["attention_mask"], mask)
    assert torch.equal(hf["input_ids"][mask.bool()], tokens["input_ids"][mask.bool()])
    with torch.no_grad():
        image = model.encode_image(hf["pixel_values"], normalize=False)
        assert_parity(hf["image_embeds"], image, atol=1e-5, what="image embeds of the processor's pixels")
        text = model.encode_text(tokens["input_ids"], mask, normalize=False)
        assert_parity(hf["text_embeds"], text, atol=1e-5, what="text embeds")
        # end to end: the last bits of the pixels' 1/255 scaling grow through the towers
        image = model.encode_image(pixels, normalize=False)
        assert_parity(hf["image_embeds"], image, atol=1e-4, what="image embeds of mmlm's pixels")


# ------------------------------------------------------------------------------ other shapes, SigLIP, own tokenizer

MODELS_CLIENT = """
import json, torch, transformers
from PIL import Image

out = {}
for name in ("varied", "siglip", "bpe"):
    model = transformers.CLIPModel.from_pretrained(name).eval()
    x = torch.load(f"{name}_in.pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=x["pixel_values"])
        text = model.get_text_features(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        logits = model(**x).logits_per_image
    torch.save({"image_embeds": getattr(image, "pooler_output", image),
                "text_embeds": getattr(text, "pooler_output", text), "logits_per_image": logits}, f"{name}_out.pt")
spec = json.load(open("inputs.json"))
photos = [Image.open(p) for p in spec["photos"]]
torch.save({backend: transformers.AutoImageProcessor.from_pretrained("varied", backend=backend)(
    images=photos, return_tensors="pt")["pixel_values"] for backend in ("torchvision", "pil")}, "pixels.pt")
tok = transformers.AutoTokenizer.from_pretrained("bpe")
processor = transformers.AutoProcessor.from_pretrained("bpe")
scores = {}
for name in ("bpe", "bpe_nopad"):
    pipe = transformers.pipeline("zero-shot-image-classification", model=name)
    rows = pipe([Image.open(p) for p in spec["images"]], candidate_labels=spec["classes"],
                hypothesis_template=spec["template"], batch_size=len(spec["images"]))
    scores[name] = [{r["label"]: r["score"] for r in row} for row in rows]
print(json.dumps({"ids": tok(spec["sentences"], truncation=True)["input_ids"],
                  "processor_ids": processor(text=spec["sentences"], truncation=True)["input_ids"],
                  "model_max_length": tok.model_max_length, "scores": scores}))
"""


def _bpe_tokenizer(root: Path):
    corpus = root / "corpus.txt"
    lines = [t.format(n) for t in DIGIT_TEMPLATES for c in range(10) for n in (CLASSES[c], str(c))]
    corpus.write_text("\n".join(lines * 3 + SENTENCES[:3]) + "\n", encoding="utf-8")
    return train_tokenizer([corpus], vocab_size=400, out_dir=root / "tokenizer", kind="bpe")


def _photos() -> list[Image.Image]:
    """Real photos, wide, tall and smaller than 40 px, whose 40 px centre crop starts on a whole pixel
    (transformers floors a half-pixel offset where torchvision, and so mmlm, rounds it)."""
    chelsea = Image.open(ASSETS / "images/chelsea.jpg").convert("RGB")  # 385 x 256
    rocket = Image.open(ASSETS / "images/rocket.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_90)
    return [chelsea, rocket, chelsea.resize((30, 50), Image.Resampling.BILINEAR)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Three exports queried by transformers in one client: shapes unlike clip-tiny's, a SigLIP-style CLIP
    with a bias, and a CLIP whose text tower uses a byte-level BPE trained here."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    tok = _bpe_tokenizer(root)
    text = {"vocab_size": tok.vocab_size, "eot_token_id": tok.eot_token_id, "pad_token_id": tok.pad_token_id}
    built = {
        "varied": _varied(),
        "siglip": _varied(init_logit_scale=math.log(10), init_logit_bias=-10.0),
        "bpe": randomize_(mmlm.create_model(update(mmlm.from_name("clip-tiny"), text=text))).eval(),
    }
    inputs = {}
    for name, model in built.items():
        export(model, root / name, "hf", tokenizer=tok if name == "bpe" else None)
        eot, size = model.cfg.text.eot_token_id, model.cfg.vision.image_size
        ids = torch.randint(3, min(model.cfg.text.vocab_size, 49406), (3, 11))  # right-padded, each ending in eot
        mask = torch.ones(3, 11, dtype=torch.long)
        for i, n in enumerate([4, 11, 7]):
            ids[i, n - 1], ids[i, n:], mask[i, n:] = eot, model.cfg.text.pad_token_id, 0
        inputs[name] = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, size, size)}
        torch.save(inputs[name], root / f"{name}_in.pt")
    # a tokenizer with no pad token: the pipeline pads with end-of-text, as mmlm's Tokenizer does
    no_pad = Tokenizer(tok.backend, special_tokens={"eos": tok.special_tokens["eos"]})
    export(built["bpe"], root / "bpe_nopad", "hf", tokenizer=no_pad)
    images = digits_image_text("test", image_size=32)
    for i in range(6):
        images.image(i).save(root / f"{i}.png")
    for i, photo in enumerate(_photos()):
        photo.save(root / f"photo{i}.png")
    spec = {"images": [f"{i}.png" for i in range(6)], "classes": CLASSES, "template": DIGIT_TEMPLATES[0],
            "sentences": SENTENCES, "photos": [f"photo{i}.png" for i in range(3)]}  # fmt: skip
    (root / "inputs.json").write_text(json.dumps(spec))
    out = run_client(MODELS_CLIENT, cwd=root)
    hf = {name: torch.load(root / f"{name}_out.pt") for name in built}
    return {"root": root, "models": built, "inputs": inputs, "hf": hf, "out": out, "tokenizer": tok,
            "pixels": torch.load(root / "pixels.pt")}  # fmt: skip


@pytest.mark.slow
def test_processor_resizes_and_crops_as_mmlm(models):
    """The processor's resize + centre crop + normalisation on photos of other shapes and sizes: exact with
    its PIL backend; transformers 5's default torchvision backend resizes tensors, within one grey level."""
    vision = models["models"]["varied"].cfg.vision
    transform = image_transform(vision, train=False)
    ours = torch.stack([transform(Image.open(models["root"] / f"photo{i}.png")) for i in range(3)])
    assert_parity(models["pixels"]["pil"], ours, atol=1e-6, what="pixel_values, PIL backend")
    grey_level = 1 / 255 / min(vision.image_std)
    assert_parity(models["pixels"]["torchvision"], ours, atol=grey_level + 1e-6, what="pixel_values, torchvision")


@pytest.mark.parametrize("name", ["varied", "siglip"])
def test_clip_model_matches_mmlm(models, name):
    model, x, hf = models["models"][name], models["inputs"][name], models["hf"][name]
    with torch.no_grad():
        images, texts = x["pixel_values"], (x["input_ids"], x["attention_mask"])
        assert_parity(hf["image_embeds"], model.encode_image(images, normalize=False), atol=1e-5, what=f"{name} image")
        assert_parity(hf["text_embeds"], model.encode_text(*texts, normalize=False), atol=1e-5, what=f"{name} text")
        ours = model(images, *texts).logits_per_image
    bias = 0.0 if model.logit_bias is None else model.logit_bias.item()
    # CLIPModel has no bias; a bias shared by all pairs leaves the softmax over texts unchanged
    assert_parity(hf["logits_per_image"] + bias, ours, atol=1e-5, what=f"{name} logits (+ mmlm's bias)")
    assert_parity(hf["logits_per_image"].softmax(-1), ours.softmax(-1), atol=1e-6, what=f"{name} softmax")


def test_siglip_bias_comes_back_exactly(models):
    model = models["models"]["siglip"]
    assert model.logit_bias.item() != -10.0  # randomize_ moved it off its init
    assert json.loads((models["root"] / "siglip/config.json").read_text())["logit_bias_init_value"] == -10.0
    back = mmlm.load_pretrained(models["root"] / "siglip")
    assert back.cfg == model.cfg
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("preset", ["clip-tiny", "varied"])
def test_round_trip_gives_identical_weights(tmp_path, preset):
    model = randomize_(mmlm.create_model(preset)).eval() if preset == "clip-tiny" else _varied()
    mmlm.export_hf_clip(model, tmp_path / "hf")
    back = mmlm.load_pretrained(tmp_path / "hf")
    assert back.cfg == model.cfg
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_given_tokenizer_drives_processor_and_pipeline(models):
    tok, out, model = models["tokenizer"], models["out"], models["models"]["bpe"]
    files = {p.name for p in (models["root"] / "bpe").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= files
    assert out["model_max_length"] == model.cfg.text.context_length
    expected = [e.ids for e in tok.encode_batch(SENTENCES, context_length=model.cfg.text.context_length)]
    assert len(max(expected, key=len)) == model.cfg.text.context_length  # the long sentence is cut
    assert out["ids"] == expected and out["processor_ids"] == expected
    transform = image_transform(model.cfg.vision, train=False)
    images = torch.stack([transform(Image.open(models["root"] / f"{i}.png")) for i in range(6)])
    prompts = tok([DIGIT_TEMPLATES[0].format(c) for c in CLASSES])
    with torch.no_grad():
        ours = model(images, prompts["input_ids"], prompts["attention_mask"]).logits_per_image.softmax(-1)
    for name in ("bpe", "bpe_nopad"):
        theirs = torch.tensor([[row[c] for c in CLASSES] for row in out["scores"][name]])
        assert_parity(theirs, ours, atol=1e-5, what=f"pipeline scores with the given tokenizer ({name})")


def test_tokenizer_must_fit_the_text_tower(tmp_path, models):
    other_vocab = mmlm.create_model(update(mmlm.from_name("clip-tiny"), text={"vocab_size": 1000}))
    with pytest.raises(ConversionError, match="--tokenizer"):
        export(other_vocab, tmp_path / "a", "hf")
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.partial").exists()  # refused: nothing written
    with pytest.raises(ConversionError, match="does not fit the text tower"):
        export(mmlm.create_model("clip-tiny"), tmp_path / "b", "hf", tokenizer=models["tokenizer"])


def test_convert_entry_point_both_directions(tmp_path):
    model = _varied()
    mmlm.save(model, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "again", to="mmlm")
    again = mmlm.load(tmp_path / "again")
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), model.encode_image(images), rtol=0, atol=0)


def test_what_clip_model_cannot_express_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="share='attention_mlp'"):
        mmlm.export_hf_clip(mmlm.create_model("clip-shared-tiny"), tmp_path / "shared")
    with pytest.raises(ConversionError, match="exports mmlm CLIP models"):
        mmlm.export_hf_clip(mmlm.create_model("bert-tiny"), tmp_path / "bert")
