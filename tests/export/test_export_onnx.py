"""mmlm CLIP -> ONNX folder (``mmlm convert --to onnx``), read by a process that can import neither torch nor
mmlm, and by ``OnnxEncoder``: the embeddings are mmlm's to 1e-4, the int8 ones close to them, and what
cannot be written is refused in one line with nothing left behind.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _client import run_client
from PIL import Image

import mmlm
from mmlm.cli import main
from mmlm.compress import quantize_int8
from mmlm.config import HALF, update
from mmlm.convert.common import ConversionError
from mmlm.export import export
from mmlm.export.convert import convert
from mmlm.factory import load
from mmlm.paths import ASSETS
from mmlm.serve.runtime.onnx import OnnxEncoder

IMAGES = sorted((ASSETS / "images").glob("*.jpg"))  # 21 photos: RGB and greyscale, several aspect ratios
WORDPIECE = ASSETS / "tokenizer"  # a BERT-style tokenizer: [CLS] text [SEP], 4,016 tokens
ROOT = Path(__file__).resolve().parents[2]


def _captions() -> list[str]:
    with open(ASSETS / "captions.csv", newline="") as f:
        return list(dict.fromkeys(row["title"] for row in csv.DictReader(f)))


TITLES = _captions()
LONG = "A Rocket On Its Launch Pad, " + " and ".join(TITLES[8:20])  # longer than every context here: truncated
# two lengths at batch 1 and 7: short texts (padded to the longest of the batch) and ones cut at the context;
# CLIP's clean-up must run on the entity and the mojibake
TEXTS = {
    "short1": ["a cat"],
    "long1": [LONG],
    "short7": ["a cat", "Fish &amp; chips", "cafÃ© au lait", *TITLES[:4]],
    "long7": [LONG, *TITLES[4:9], LONG.upper()],
}

CLIENT = """
import html, json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer

job = json.load(open("job.json"))
facts = {}
for name, spec in job.items():
    folder = spec["folder"]
    meta = json.load(open(folder + "/onnx.json"))
    tok = Tokenizer.from_file(folder + "/tokenizer.json")  # truncation and padding come with the file
    image = ort.InferenceSession(folder + "/image.onnx", providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(folder + "/text.onnx", providers=["CPUExecutionProvider"])
    clean = lambda t: t
    if meta["clean"] == "clip":  # CLIP's clean-up, as onnx.json asks
        import ftfy
        clean = lambda t: " ".join(html.unescape(html.unescape(ftfy.fix_text(t))).split())
    for key, texts in spec["texts"].items():
        encodings = tok.encode_batch([clean(t) for t in texts])
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        np.save(f"{name}-{key}-ids.npy", ids)
        np.save(f"{name}-{key}-text.npy", text.run(["embeds"], {"input_ids": ids, "attention_mask": mask})[0])
    for key, path in spec["pixels"].items():
        np.save(f"{name}-{key}-image.npy", image.run(["embeds"], {"pixels": np.load(path)})[0])
    facts[name] = {
        "image_inputs": [[i.name, i.type, i.shape] for i in image.get_inputs()],
        "text_inputs": [[i.name, i.type, i.shape] for i in text.get_inputs()],
        "outputs": [o.name for o in image.get_outputs() + text.get_outputs()],
        "meta": meta,
        "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mmlm")),
    }
print(json.dumps(facts))
"""


def _shaken(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Every parameter moved off its init: unit LayerNorms and zero biases would hide a dropped one."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def _siglip_cfg() -> mmlm.config.CLIPConfig:
    """SigLIP's shape: a logit bias, 0.5 mean/std, bilinear resizing, a bidirectional text tower pooled at its
    last real token, a WordPiece tokenizer (pad id 0 = [PAD], not CLIP's)."""
    return update(
        mmlm.from_name("clip-tiny"), init_logit_scale=2.3, init_logit_bias=-10.0,
        vision={"image_mean": HALF, "image_std": HALF, "interpolation": "bilinear", "act": "gelu"},
        text={"vocab_size": 4016, "eot_token_id": 3, "context_length": 24, "causal": False, "pool": "last",
              "act": "gelu"},
    )  # fmt: skip


def _digits_folder(root: Path) -> Path:
    """The main job's model (configs/align/clip-digits-tiny.yaml: clip-tiny), random weights, as an mmlm folder."""
    torch.manual_seed(1)
    return mmlm.save(_shaken(mmlm.create_model("clip-tiny")), root / "digits_mmlm")


def _siglip_folder(root: Path) -> Path:
    torch.manual_seed(2)
    return mmlm.save(_shaken(mmlm.create_model(_siglip_cfg())), root / "siglip_mmlm")


def _vit_b_32_folder(root: Path) -> Path:
    torch.manual_seed(3)
    return mmlm.save(_shaken(mmlm.create_model("clip-vit-b-32"), std=0.02), root / "b32_mmlm")


def _openclip_folder(root: Path) -> Path:
    """An OpenCLIP model (open_clip builds it from its config, random weights) in OpenCLIP's hub layout:
    GELU, layer scale, no ln_pre, average pooling with a final LayerNorm, eps 1e-6, the CLIP BPE."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 40, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2,
                       "ls_init_value": 0.1, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True,
                       "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"context_length": 20, "width": 64, "heads": 2, "layers": 2, "ls_init_value": 0.1,
                     "norm_kwargs": {"eps": 1e-6}},
    }  # fmt: skip
    torch.manual_seed(4)
    ref = _shaken(open_clip.CLIP(**model_cfg))
    folder = root / "openclip_hub"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return folder


def _exported(root: Path, sources: dict[str, tuple[Path, str | None]]) -> dict:
    """Each source converted as ``mmlm convert SRC DST --to onnx [--tokenizer T]`` does, run by one client
    process without torch or mmlm; returns, per name, mmlm's loaded model and what the client computed."""
    job, loaded = {}, {}
    for name, (src, tokenizer) in sources.items():
        folder = convert(src, root / f"{name}_onnx", to="onnx", tokenizer=tokenizer)
        loaded[name] = load(src, tokenizer=tokenizer)  # what mmlm itself runs for this checkpoint
        pixels = {}
        for batch in (1, 7):
            path = root / f"{name}-b{batch}.npy"
            np.save(path, torch.stack([loaded[name].transform(Image.open(p)) for p in IMAGES[:batch]]).numpy())
            pixels[f"b{batch}"] = str(path)
        job[name] = {"folder": str(folder), "texts": TEXTS, "pixels": pixels}
    (root / "job.json").write_text(json.dumps(job))
    facts = run_client(CLIENT, cwd=root, refuse=("mmlm", "torch"))
    return {"root": root, "loaded": loaded, "facts": facts, "job": job}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("onnx_small")
    return _exported(root, {"digits": (_digits_folder(root), None), "siglip": (_siglip_folder(root), str(WORDPIECE))})


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("onnx_large")
    return _exported(root, {"vit_b_32": (_vit_b_32_folder(root), None), "openclip": (_openclip_folder(root), None)})


def _check_client(run: dict, name: str) -> None:
    root, loaded, facts = run["root"], run["loaded"][name], run["facts"][name]
    model, tok = loaded.model, loaded.require_tokenizer()
    S = model.cfg.vision.image_size
    assert facts["imported"] == []  # neither torch nor mmlm came in through a side door
    assert facts["image_inputs"] == [["pixels", "tensor(float)", [facts["image_inputs"][0][2][0], 3, S, S]]]
    assert isinstance(facts["image_inputs"][0][2][0], str)  # a dynamic batch axis
    assert [[n, t] for n, t, _ in facts["text_inputs"]] == [["input_ids", "tensor(int64)"],
                                                            ["attention_mask", "tensor(int64)"]]  # fmt: skip
    assert all(isinstance(d, str) for _, _, shape in facts["text_inputs"] for d in shape)  # batch and seq
    assert facts["outputs"] == ["embeds", "embeds"]
    meta = facts["meta"]
    assert (meta["format"], meta["version"], meta["int8"]) == ("mmlm-onnx", 1, False)
    assert (meta["embed_dim"], meta["image_size"]) == (model.cfg.embed_dim, S)
    assert meta["weights_hash"] == loaded.weights_hash  # what an index built from the same model records
    assert meta["logit_scale"] == pytest.approx(model.scale().item())
    assert meta["logit_bias"] == (None if model.logit_bias is None else pytest.approx(model.logit_bias.item()))
    gaps = []
    with torch.no_grad():
        for key, texts in TEXTS.items():
            batch = tok(texts)
            ids = np.load(root / f"{name}-{key}-ids.npy")
            assert np.array_equal(ids, batch["input_ids"].numpy()), key  # truncated and padded as mmlm does
            ours = model.encode_text(batch["input_ids"], batch["attention_mask"]).numpy()
            theirs = np.load(root / f"{name}-{key}-text.npy")
            assert theirs.shape == (len(texts), model.cfg.embed_dim)
            gaps.append(np.abs(theirs - ours).max())
        for key, path in run["job"][name]["pixels"].items():
            ours = model.encode_image(torch.from_numpy(np.load(path))).numpy()
            theirs = np.load(root / f"{name}-{key}-image.npy")
            assert theirs.shape == ours.shape
            gaps.append(np.abs(theirs - ours).max())
    print(f"[onnx {name}] max|ONNX Runtime - mmlm| = {max(gaps):.1e}")
    assert max(gaps) < 1e-4
    assert np.load(root / f"{name}-long7-ids.npy").shape[1] == tok.context_length  # the long texts were cut


@pytest.mark.parametrize("name", ["digits", "siglip"])
def test_client_without_torch_gets_mmlm_embeddings(small, name):
    _check_client(small, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_32", "openclip"])
def test_client_without_torch_gets_mmlm_embeddings_large(large, name):
    _check_client(large, name)


# ------------------------------------------------------------------------------ OnnxEncoder


def test_encoder_equals_mmlm_on_photos_and_texts(small):
    for name in ("digits", "siglip"):
        loaded = small["loaded"][name]
        enc = OnnxEncoder.open(small["job"][name]["folder"], threads=1)
        assert (enc.dim, enc.image_size, enc.weights_hash) == (
            loaded.model.cfg.embed_dim, loaded.model.cfg.vision.image_size, loaded.weights_hash
        )  # fmt: skip
        photos = [Image.open(p) for p in IMAGES]
        assert {p.mode for p in photos} >= {"RGB", "L"}  # greyscale ones too
        pixels = np.stack([enc.preprocess(p) for p in photos])
        ours = torch.stack([loaded.transform(p) for p in photos])
        np.testing.assert_allclose(pixels, ours.numpy(), atol=1e-5, rtol=0)
        texts = [t for batch in TEXTS.values() for t in batch]
        tokens = loaded.require_tokenizer()(texts)
        assert np.array_equal(enc.tokenize(texts)["input_ids"], tokens["input_ids"].numpy())
        with torch.no_grad():
            image = loaded.model.encode_image(ours).numpy()
            text = loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()
        np.testing.assert_allclose(enc.encode_image(pixels), image, atol=1e-4, rtol=0)
        np.testing.assert_allclose(enc.encode_text(texts), text, atol=1e-4, rtol=0)
        assert enc.encode_text(["a cat"]).shape == (1, enc.dim)
        lazy = OnnxEncoder.open(small["job"][name]["folder"], threads=1, lazy_image=True)
        assert lazy._image is None  # no image session until an image comes
        assert np.array_equal(lazy.encode_image(pixels), enc.encode_image(pixels)) and lazy._image is not None


def test_weights_are_external_data_beside_each_graph(small):
    """Each graph names its weights in ``NAME.onnx.data`` (memory-mapped by ONNX Runtime): no tensor of
    ``EXTERNAL`` bytes or more is inside the graph, the data file holds every external one, with the graph's mode."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from mmlm.export.onnx import EXTERNAL

    folder = Path(small["job"]["digits"]["folder"])
    for name in ("image", "text"):
        graph = onnx.load(str(folder / f"{name}.onnx"), load_external_data=False)
        outside = [ExternalDataInfo(t) for t in graph.graph.initializer if uses_external_data(t)]
        inside = [len(t.raw_data) for t in graph.graph.initializer if not uses_external_data(t)]
        assert outside and max(inside, default=0) < EXTERNAL
        assert {info.location for info in outside} == {f"{name}.onnx.data"}
        data = folder / f"{name}.onnx.data"
        assert data.stat().st_size == max(info.offset + info.length for info in outside)
        assert sum(info.length for info in outside) == data.stat().st_size  # one after the other, nothing else
        assert data.stat().st_mode == (folder / f"{name}.onnx").stat().st_mode


def test_encoder_imports_no_torch(small):
    """The query path of a server without torch: open, encode a text and an image, and torch never loaded."""
    folder = small["job"]["digits"]["folder"]
    code = (
        "import json, sys; from PIL import Image; from mmlm.serve.runtime.onnx import OnnxEncoder; "
        f"e = OnnxEncoder.open({folder!r}); e.encode_text(['a cat']); "
        f"e.encode_image(e.preprocess(Image.open({str(IMAGES[0])!r}))[None]); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'lightning', 'transformers', 'timm'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_encoder_refuses_a_folder_it_cannot_read(small, tmp_path):
    import shutil

    src = Path(small["job"]["digits"]["folder"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        OnnxEncoder.open(tmp_path / "nope")
    cases = {
        "format": (lambda m: m.update(format="other"), r"onnx.json: format is 'other', not 'mmlm-onnx'"),
        "version": (lambda m: m.update(version=2), r"onnx.json: version 2 is not 1"),
        "dim": (lambda m: m.update(embed_dim="32"), r"onnx.json: field 'embed_dim' is '32', expected int"),
        "int8": (lambda m: m.update(int8=1), r"onnx.json: field 'int8' is 1, expected bool"),
        "clean": (lambda m: m.update(clean="nfkc"), r"onnx.json: clean is 'nfkc'"),
    }
    for case, (edit, message) in cases.items():
        bad = tmp_path / case
        shutil.copytree(src, bad)
        meta = json.loads((bad / "onnx.json").read_text())
        edit(meta)
        (bad / "onnx.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=message):
            OnnxEncoder.open(bad)
    (tmp_path / "format" / "text.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"text.onnx is missing"):
        OnnxEncoder.open(tmp_path / "format")
    (tmp_path / "version" / "preprocess.json").write_text("[1]")
    (tmp_path / "version" / "onnx.json").write_text((src / "onnx.json").read_text())
    with pytest.raises(ValueError, match=r"preprocess.json holds a list, not a JSON object"):
        OnnxEncoder.open(tmp_path / "version")
    (tmp_path / "dim" / "onnx.json").write_text((src / "onnx.json").read_text())
    (tmp_path / "dim" / "image.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match=r"image.onnx is not an ONNX graph"):
        OnnxEncoder.open(tmp_path / "dim")
    enc = OnnxEncoder.open(src)
    with pytest.raises(ValueError, match=r"expected pixels of shape \(batch, 3, 32, 32\), got \(3, 32, 32\); stack"):
        enc.encode_image(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(TypeError, match="a list of texts"):
        enc.encode_text("a cat")


def test_a_preset_converts_to_the_model_mmlm_loads_for_its_name(tmp_path):
    """`mmlm convert clip-tiny DST --to onnx` draws the preset as `mmlm index build clip-tiny` and the torch
    server do (seed 0): the same weights hash, the same embeddings."""
    enc = OnnxEncoder.open(convert("clip-tiny", tmp_path / "onnx", to="onnx"))
    loaded = load("clip-tiny")
    assert enc.weights_hash == loaded.weights_hash and enc.meta["source"] == "clip-tiny"
    tokens = loaded.require_tokenizer()(["a cat", "the number seven"])
    with torch.no_grad():
        ours = loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()
    np.testing.assert_allclose(enc.encode_text(["a cat", "the number seven"]), ours, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ int8


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The main job's model trained briefly (configs/align/clip-digits-tiny.yaml, 200 steps: held-out zero-shot
    accuracy well above chance), its ``mmlm fit`` checkpoint exported float32 and int8 (``--int8``)."""
    from mmlm.cli import lightning_cli

    root = tmp_path_factory.mktemp("onnx_trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: two threads wait for each other
    try:
        run = lightning_cli(["--config", str(ROOT / "configs/align/clip-digits-tiny.yaml"), *QUIET,
                             "--trainer.default_root_dir", str(root), "--trainer.max_steps", "200",
                             "--trainer.val_check_interval", "200"], run=False)  # fmt: skip
        run.trainer.fit(run.model, run.datamodule)
    finally:
        torch.set_num_threads(threads)
    checkpoint = root / "last.ckpt"
    run.trainer.save_checkpoint(checkpoint)
    main(["convert", str(checkpoint), str(root / "fp32"), "--to", "onnx"])
    main(["convert", str(checkpoint), str(root / "int8"), "--to", "onnx", "--int8"])
    return {"checkpoint": checkpoint, "fp32": root / "fp32", "int8": root / "int8"}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.slow
def test_int8_zero_shot_within_a_point_of_float(trained):
    """Held-out digits (360 scans never trained on), classified zero-shot with the digits templates by mmlm in
    torch, by the float32 graphs and by the int8 ones: float32 ONNX = torch, int8 within 1 point, every int8
    embedding at cosine >= 0.99 to its float32 one."""
    from mmlm.data.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, digits_image_text
    from mmlm.eval.zeroshot import build_classifier

    loaded = load(trained["checkpoint"])
    fp32, int8 = OnnxEncoder.open(trained["fp32"]), OnnxEncoder.open(trained["int8"])
    assert (int8.meta["int8"], fp32.meta["int8"]) == (True, False)
    assert int8.weights_hash == fp32.weights_hash == loaded.weights_hash  # the float model's, in both
    size = lambda folder, name: sum(p.stat().st_size for p in folder.glob(f"{name}.onnx*"))  # noqa: E731
    assert size(trained["int8"], "text") < 0.5 * size(trained["fp32"], "text")  # int8 weights in the file
    ds = digits_image_text("test")
    photos = [ds.image(i) for i in range(len(ds))]
    labels = np.asarray(ds.labels)
    prompts = [t.format(c) for c in DIGIT_CLASSNAMES for t in DIGIT_TEMPLATES]

    def accuracy(text: np.ndarray, image: np.ndarray) -> float:
        classes = text.reshape(len(DIGIT_CLASSNAMES), len(DIGIT_TEMPLATES), -1).mean(1)
        classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
        return float(((image @ classes.T).argmax(1) == labels).mean())

    pixels = np.stack([fp32.preprocess(p) for p in photos])
    results, embeds = {}, {}
    for name, enc in (("fp32", fp32), ("int8", int8)):
        embeds[name] = enc.encode_text(prompts), enc.encode_image(pixels)
        results[name] = accuracy(*embeds[name])
    with torch.no_grad():
        weights = build_classifier(loaded.model, loaded.require_tokenizer(), DIGIT_CLASSNAMES, DIGIT_TEMPLATES)
        image = loaded.model.encode_image(torch.stack([loaded.transform(p) for p in photos]))
    results["torch"] = float(((image @ weights).argmax(1).numpy() == labels).mean())
    text_cos, image_cos = (_cosines(a, b) for a, b in zip(embeds["int8"], embeds["fp32"]))
    print(f"[onnx int8] zero-shot on 360 held-out digits: {results}; cosine to float32: "
          f"text min {text_cos.min():.4f}, image min {image_cos.min():.4f}")  # fmt: skip
    assert results["torch"] > 0.5  # trained: chance is 0.1
    assert abs(results["fp32"] - results["torch"]) <= 1 / 360  # a tie broken the other way at most
    assert abs(results["int8"] - results["fp32"]) <= 0.01
    assert text_cos.min() >= 0.99 and image_cos.min() >= 0.99


@pytest.mark.slow
def test_int8_embeddings_of_random_models_stay_close(small, large, tmp_path):
    """int8 of untrained towers too (tiny ones, whose few wide activations quantize worst, and a ViT-B/32):
    cosine >= 0.99 to float32 for every photo and text."""
    for run, name in ((small, "digits"), (small, "siglip"), (large, "vit_b_32")):
        fp32 = OnnxEncoder.open(run["job"][name]["folder"])
        export(run["loaded"][name].model, tmp_path / name, "onnx", int8=True,
               tokenizer=run["loaded"][name].tokenizer if name == "siglip" else None)  # fmt: skip
        int8 = OnnxEncoder.open(tmp_path / name)
        pixels = np.stack([fp32.preprocess(Image.open(p)) for p in IMAGES])
        texts = [t for batch in TEXTS.values() for t in batch]
        image = _cosines(int8.encode_image(pixels), fp32.encode_image(pixels))
        text = _cosines(int8.encode_text(texts), fp32.encode_text(texts))
        print(f"[onnx int8 {name}] cosine to float32: image min {image.min():.4f}, text min {text.min():.4f}")
        assert image.min() >= 0.99 and text.min() >= 0.99, name


# ------------------------------------------------------------------------------ refusals


def test_what_onnx_cannot_hold_is_refused_in_one_line(tmp_path, capsys):
    cases = [
        (["convert", "bert-tiny", str(tmp_path / "text_only"), "--to", "onnx"], "two-tower CLIP models"),
        (["convert", "vit-tiny", str(tmp_path / "image_only"), "--to", "onnx"], "not a VisionTransformer"),
        (["convert", "clip-tiny", str(tmp_path / "hf_int8"), "--to", "hf", "--int8"], "--int8 applies to --to onnx"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    siglip = mmlm.create_model(_siglip_cfg())
    with pytest.raises(ConversionError, match=r"4016 tokens, not the CLIP BPE's 49408: give .*--tokenizer"):
        export(siglip, tmp_path / "no_tokenizer", "onnx")
    with pytest.raises(ConversionError, match="cannot write a torch int8 model.*pass --int8"):
        export(quantize_int8(mmlm.create_model("clip-tiny")), tmp_path / "torch_int8", "onnx")
    assert list(tmp_path.iterdir()) == []  # no folder, no .partial, for any of them


@pytest.mark.slow  # a fresh Python importing the CLI: seconds, and main() above checks the same in-process
def test_cli_refusal_exits_2_in_a_process(tmp_path):
    """`mmlm convert` itself, as a user runs it: one line on stderr, exit status 2, no folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mmlm.cli", "convert", "bert-tiny", str(tmp_path / "out"), "--to",
                           "onnx"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mmlm convert: error: --to onnx writes two-tower CLIP models (an image and a text tower), not a TextEncoder "
        "(add --debug for the traceback)"
    ]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ the exporter


@pytest.mark.slow
def test_dynamo_exporter_is_exact_too(small, tmp_path):
    """The exporter not chosen (torch.export + onnxscript) stays exact, for the day TorchScript goes."""
    loaded = small["loaded"]["digits"]
    export(loaded.model, tmp_path / "dynamo", "onnx", dynamo=True)
    enc = OnnxEncoder.open(tmp_path / "dynamo")
    assert "dynamo=True" in enc.meta["exporter"]
    texts = TEXTS["short7"] + TEXTS["long1"]
    tokens = loaded.require_tokenizer()(texts)
    pixels = np.stack([enc.preprocess(Image.open(p)) for p in IMAGES[:7]])
    with torch.no_grad():
        text = loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()
        image = loaded.model.encode_image(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(enc.encode_text(texts), text, atol=1e-4, rtol=0)
    np.testing.assert_allclose(enc.encode_image(pixels), image, atol=1e-4, rtol=0)
    np.testing.assert_allclose(enc.encode_image(pixels[:1]), image[:1], atol=1e-4, rtol=0)
