"""mmlm CLIP -> open_clip folder, loaded by open_clip's own factory in a process without mmlm.

open_clip's ``create_model_and_transforms("local-dir:DIR")`` and ``get_tokenizer("local-dir:DIR")``
preprocess the bundled photos and tokenise real captions; their embeddings must be mmlm's.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from _client import run_client
from PIL import Image

import mmlm
from mmlm.config import HALF, update
from mmlm.convert.common import ConversionError
from mmlm.data.tokenizers import clip_tokenizer, get_tokenizer
from mmlm.data.transforms import image_transform
from mmlm.export import export
from mmlm.export.convert import convert
from mmlm.paths import ASSETS

pytestmark = pytest.mark.slow

IMAGES = sorted((ASSETS / "images").glob("*.jpg"))  # 21 photos, RGB and greyscale, several aspect ratios
WORDPIECE = ASSETS / "tokenizer"  # a BERT-style tokenizer: [CLS] text [SEP], 4,016 tokens


def _captions() -> list[str]:
    with open(ASSETS / "captions.csv", newline="") as f:
        titles = list(dict.fromkeys(row["title"] for row in csv.DictReader(f)))
    # a text longer than every context here: both libraries must cut it and keep the end-of-text token
    return titles[:8] + ["A Rocket On Its Launch Pad, " + " and ".join(titles[8:14])]


CAPTIONS = _captions()


def _cfg(name: str) -> mmlm.config.CLIPConfig:
    tiny = mmlm.from_name("clip-tiny")  # quick_gelu, 32 px, patch 8, the CLIP BPE
    if name == "quick_gelu":
        return tiny
    if name == "gelu_widths":  # towers of different width, heads, depth and MLP size
        return update(
            tiny, embed_dim=24,
            vision={"act": "gelu", "width": 96, "heads": 3, "depth": 3, "image_size": 48, "patch_size": 16},
            text={"act": "gelu", "width": 64, "heads": 2, "depth": 2, "mlp_ratio": 2.0},
        )  # fmt: skip
    if name == "siglip_wordpiece":  # SigLIP's bias, its 0.5 mean/std, bilinear resizing, a non-CLIP tokenizer
        return update(
            tiny, init_logit_scale=2.3, init_logit_bias=-10.0,
            vision={"image_mean": HALF, "image_std": HALF, "interpolation": "bilinear"},
            text={"vocab_size": 4016, "eot_token_id": 3, "context_length": 24},
        )  # fmt: skip
    if name == "openclip_options":  # what OpenCLIP's config switches express beyond the OpenAI layout
        return update(
            tiny,
            vision={"act": "gelu", "layer_scale": 0.1, "pool": "gap", "norm_pre": False, "norm_eps": 1e-6,
                    "image_size": 40},
            text={"act": "gelu_tanh", "layer_scale": 0.1, "norm_eps": 1e-6},
        )  # fmt: skip
    raise KeyError(name)


CASES = ("quick_gelu", "gelu_widths", "siglip_wordpiece", "openclip_options")

CLIENT = """
import json, sys, torch, open_clip
from PIL import Image

job = json.load(open("job.json"))
facts = {}
for name, folder in job["folders"].items():
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    model.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
    pixels = torch.stack([preprocess(Image.open(p)) for p in job["images"]])
    ids = tokenizer(job["captions"])
    with torch.no_grad():
        image_embeds, text_embeds = model.encode_image(pixels), model.encode_text(ids)
    bias = model.logit_bias
    torch.save({"pixels": pixels, "ids": ids, "image": image_embeds, "text": text_embeds,
                "logit_scale": model.logit_scale.detach(), "logit_bias": None if bias is None else bias.detach()},
               name + ".pt")
    v, t = model.visual.transformer.resblocks[0], model.transformer.resblocks[0]
    facts[name] = {
        "act": [type(b.mlp.gelu).__name__ + getattr(b.mlp.gelu, "approximate", "") for b in (v, t)],
        "heads": [v.attn.num_heads, t.attn.num_heads], "eps": [v.ln_1.eps, t.ln_1.eps],
        "context_length": model.context_length, "vocab_size": model.vocab_size,
        "image_size": list(model.visual.image_size), "patch_size": list(model.visual.patch_size),
        "tokenizer": type(tokenizer).__name__,
    }
print(json.dumps(facts))
"""


def _model(name: str) -> mmlm.CLIP:
    torch.manual_seed(CASES.index(name))
    model = mmlm.create_model(_cfg(name))
    with torch.no_grad():  # LayerNorms at 1/0 and zero biases would hide a swapped norm or a dropped bias
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tokenizer(model: mmlm.CLIP):
    ctx = model.cfg.text.context_length
    return clip_tokenizer(ctx) if model.cfg.text.vocab_size == 49408 else get_tokenizer(WORDPIECE, context_length=ctx)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported (one through ``mmlm convert`` with ``--tokenizer``) and loaded by open_clip once."""
    root = tmp_path_factory.mktemp("open_clip")
    models, folders = {}, {}
    for name in CASES:
        models[name] = model = _model(name)
        folders[name] = root / name
        if name == "siglip_wordpiece":
            mmlm.save(model, root / "mmlm_siglip")
            convert(root / "mmlm_siglip", folders[name], to="open_clip", tokenizer=str(WORDPIECE))
        else:
            export(model, folders[name], "open_clip")
    job = {"folders": {k: str(v) for k, v in folders.items()}, "images": [str(p) for p in IMAGES], "captions": CAPTIONS}
    (root / "job.json").write_text(json.dumps(job))
    facts = run_client(CLIENT, cwd=root)
    outputs = {name: torch.load(root / f"{name}.pt") for name in CASES}
    return models, folders, facts, outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_open_clip_embeddings_equal_mmlm(exported, name):
    models, _, facts, outputs = exported
    model, out, fact = models[name], outputs[name], facts[name]
    cfg = model.cfg
    transform, tok = image_transform(cfg.vision, train=False), _tokenizer(model)
    pixels = torch.stack([transform(Image.open(p)) for p in IMAGES])
    batch = tok(CAPTIONS)
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=False)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=False)

    # open_clip's preprocess = mmlm's eval transform: 1 grey level is 1/255/std > 1e-2 here
    torch.testing.assert_close(out["pixels"], pixels, atol=1e-6, rtol=0)
    # its tokenizer (SimpleTokenizer, or HFTokenizer on the saved WordPiece) = mmlm's ids, padded to the context
    ids = torch.nn.functional.pad(batch["input_ids"], (0, cfg.text.context_length - batch["input_ids"].shape[1]))
    assert torch.equal(out["ids"], ids)
    gaps = {k: (out[k] - ours).abs().max().item() for k, ours in (("image", image), ("text", text))}
    print(f"[open_clip {name}] max|diff| image {gaps['image']:.1e}, text {gaps['text']:.1e}")
    torch.testing.assert_close(out["image"], image, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["text"], text, atol=1e-5, rtol=0)
    assert out["image"].std() > 0.1 and out["text"].std() > 0.1  # embeddings that differ per input

    assert out["logit_scale"].item() == model.logit_scale.item()
    if cfg.init_logit_bias is None:
        assert out["logit_bias"] is None
    else:
        assert out["logit_bias"].item() == model.logit_bias.item() != cfg.init_logit_bias  # the trained value
    v, t = cfg.vision, cfg.text
    acts = {"quick_gelu": "QuickGELU", "gelu": "GELUnone", "gelu_tanh": "GELUtanh"}
    assert fact["act"] == [acts[v.act], acts[t.act]]
    assert fact["heads"] == [v.heads, t.heads] and fact["eps"] == [v.norm_eps, t.norm_eps]
    assert (fact["context_length"], fact["vocab_size"]) == (t.context_length, t.vocab_size)
    assert fact["image_size"] == [v.image_size] * 2 and fact["patch_size"] == [v.patch_size] * 2
    assert fact["tokenizer"] == ("HFTokenizer" if name == "siglip_wordpiece" else "SimpleTokenizer")


@pytest.mark.parametrize("name", CASES)
def test_round_trip_gives_identical_weights_and_config(exported, name):
    """mmlm -> open_clip folder -> ``mmlm.load_pretrained``: every tensor bit for bit, and the config equal in
    every field (init ones included: ``init_logit_scale`` / ``init_logit_bias`` travel in model_cfg, and
    ``init`` is OpenCLIP's ``clip`` in these models)."""
    models, folders, _, _ = exported
    model = models[name]
    back = mmlm.load_pretrained(folders[name])
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        torch.testing.assert_close(theirs[k], v, rtol=0, atol=0, msg=k)
    assert back.cfg == model.cfg


def _differing(a, b, prefix: str = "") -> set[str]:
    """Dotted names of the dataclass fields whose values differ, nested configs compared field by field."""
    out = set()
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            out |= _differing(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.add(prefix + f.name)
    return out


def test_fields_open_clip_has_no_place_for(tmp_path):
    """A CLIP with every field set away from its default: exactly the fields OpenCLIP's CLIP has no option for
    (training-time regularisation and init recipe, sentence-encoder and MLM extras, mmlm's logit-scale clamp)
    come back as defaults; the ones it has (pad id, initial logit scale, ...) come back as they were."""
    cfg = update(
        _cfg("openclip_options"), init_logit_scale=1.5, max_logit_scale=3.0,
        vision={"dropout": 0.1, "attn_dropout": 0.1, "drop_path": 0.1, "init": "timm", "patch_dropout": 0.25},
        text={"dropout": 0.1, "attn_dropout": 0.1, "drop_path": 0.1, "init": "timm", "pad_token_id": 1,
              "mask_token_id": 5, "max_seq_length": 16, "do_lower_case": True},
    )  # fmt: skip
    model = mmlm.create_model(cfg).eval()
    export(model, tmp_path / "oc", "open_clip")
    back = mmlm.load_pretrained(tmp_path / "oc")
    assert _differing(back.cfg, cfg) == {
        "max_logit_scale",
        *(f"{tower}.{f}" for tower in ("vision", "text") for f in ("dropout", "attn_dropout", "drop_path", "init")),
        *(f"text.{f}" for f in ("mask_token_id", "max_seq_length", "do_lower_case")),
    }
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_what_open_clip_cannot_express_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="share='attention_mlp'"):
        export(mmlm.create_model("clip-shared-tiny"), tmp_path / "shared", "open_clip")
    tiny = mmlm.from_name("clip-tiny")
    with pytest.raises(ConversionError, match="quick_gelu switch sets both towers"):
        export(mmlm.create_model(update(tiny, text={"act": "gelu"})), tmp_path / "mixed", "open_clip")
    with pytest.raises(ConversionError, match="bidirectional"):
        export(mmlm.create_model(update(tiny, text={"causal": False})), tmp_path / "bi", "open_clip")
    with pytest.raises(ConversionError, match="not L2-normalised"):  # a sentence encoder's Normalize, mid-CLIP
        export(mmlm.create_model(update(tiny, text={"normalize": True})), tmp_path / "normalized", "open_clip")
    with pytest.raises(ConversionError, match="CLIP and CoCa models only"):
        export(mmlm.create_model("vit-tiny"), tmp_path / "vit", "open_clip")
    wordpiece = mmlm.create_model(_cfg("siglip_wordpiece"))
    with pytest.raises(ConversionError, match="--tokenizer"):  # 4,016 tokens: not the CLIP BPE
        export(wordpiece, tmp_path / "no_tok", "open_clip")
    with pytest.raises(ConversionError, match="pools id 3"):  # the CLIP BPE ends texts with 49407
        export(wordpiece, tmp_path / "clip_tok", "open_clip", tokenizer=clip_tokenizer(24))
    assert not any(tmp_path.rglob("*.json"))  # nothing written for a refused model
