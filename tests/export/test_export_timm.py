"""mmlm ViTs -> timm hub folders, loaded by timm's own code in a process that cannot import mmlm."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import lightning as L
import pytest
import timm
import torch
from _client import run_client
from PIL import Image

import mmlm
from mmlm.checkpoint import read_state_dict
from mmlm.config import IMAGENET_MEAN, IMAGENET_STD, VisionConfig, from_name, update
from mmlm.convert.common import ConversionError
from mmlm.convert.timm_vit import TIMM_NAMES, config_from_timm, hub_config
from mmlm.data import ImageClassificationDataModule
from mmlm.data.transforms import image_transform
from mmlm.export import export
from mmlm.export.convert import convert
from mmlm.paths import ASSETS
from mmlm.tasks import ImageClassification

PHOTO = ASSETS / "images" / "chelsea.jpg"  # 385 x 256: the short side is resized, the long one cropped
VIT = from_name("vit-tiny")
# name -> (config, the timm architecture it should be exported as)
VARIANTS: dict[str, tuple[VisionConfig, str]] = {
    "vit-tiny": (VIT, "vit_tiny_patch16_224"),
    "vit-tiny-no-head": (update(VIT, num_classes=0), "vit_tiny_patch16_224"),
    "vit-tiny-gap": (update(VIT, pool="gap"), "vit_tiny_patch16_224"),
    "clip-tower": (from_name("clip-tiny").vision, "vit_base_patch32_clip_quickgelu_224"),  # norm_pre, eps 1e-5
    "options": (
        update(VIT, image_size=48, act="gelu_tanh", layer_scale=0.1, qkv_bias=False, mlp_ratio=2.0, class_token=False,
               pool="gap", interpolation="bilinear", image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        "vit_tiny_patch16_224",
    ),
}  # fmt: skip

CLIENT = """
import json
from pathlib import Path

import timm, timm.data, torch
from PIL import Image
from safetensors.torch import load_file

job = json.loads(Path("job.json").read_text())
photo = Image.open(job["photo"]).convert("RGB")
out = {}
for name in job["models"]:
    folder = Path("models") / name
    cfg = json.loads((folder / "config.json").read_text())
    file = folder / "model.safetensors"
    weights = load_file(file)
    images = torch.load(Path("inputs") / f"{name}.pt")
    report = {"architecture": cfg["architecture"]}
    loaders = {
        "by_name": lambda: timm.create_model(
            cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"], **cfg["model_args"],
            pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(file))),
        "local_dir": lambda: timm.create_model(f"local-dir:{folder}", pretrained=True),
    }
    for how, load in loaders.items():
        model = load().eval()
        sd = model.state_dict()
        report[how] = {
            "missing": sorted(sd.keys() - weights.keys()),
            "unexpected": sorted(weights.keys() - sd.keys()),
            "not_loaded": sorted(k for k in sd.keys() & weights.keys() if not torch.equal(sd[k], weights[k])),
        }
        with torch.no_grad():
            torch.save(model(images), Path("outputs") / f"{name}-{how}.pt")
    data_config = timm.data.resolve_data_config(pretrained_cfg=cfg["pretrained_cfg"])
    torch.save(timm.data.create_transform(**data_config)(photo), Path("outputs") / f"{name}-pixels.pt")
    out[name] = report
print(json.dumps(out))
"""


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter: unit LayerNorms and zero biases would hide a swapped norm or a dropped bias."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> dict[str, Any]:
    """Two steps of ImageClassification on the digits, as `mmlm fit` runs it: its .ckpt, the model it
    ended with and the model it started from."""
    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    task = ImageClassification("vit-tiny", num_classes=10)
    start = copy.deepcopy(task.model)
    data = ImageClassificationDataModule("digits", "digits", "digits", preset="vit-tiny", batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)  # fmt: skip
    trainer.fit(task, data)
    trainer.save_checkpoint(root / "run.ckpt")
    return {"ckpt": root / "run.ckpt", "trained": task.model.eval(), "start": start.eval()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fine_tuned) -> dict[str, Any]:
    """Every variant exported (the fine-tuned one through `convert`), then loaded by timm in one client run."""
    root = tmp_path_factory.mktemp("timm")
    for sub in ("models", "inputs", "outputs"):
        (root / sub).mkdir()
    torch.manual_seed(0)
    models = {name: randomize_(mmlm.create_model(cfg)).eval() for name, (cfg, _) in VARIANTS.items()}
    for name, model in models.items():
        export(model, root / "models" / name, "timm")
    convert(fine_tuned["ckpt"], root / "models" / "fine-tuned", "timm")
    models["fine-tuned"] = fine_tuned["trained"]
    for name, model in models.items():
        cfg = model.cfg
        torch.save(torch.randn(3, cfg.in_chans, cfg.image_size, cfg.image_size), root / "inputs" / f"{name}.pt")
    (root / "job.json").write_text(json.dumps({"photo": str(PHOTO), "models": list(models)}))
    reports = run_client(CLIENT, cwd=root)
    return {"root": root, "models": models, "reports": reports}


def _logits(exported: dict[str, Any], name: str, model: torch.nn.Module | None = None) -> torch.Tensor:
    with torch.no_grad():
        return (model or exported["models"][name])(torch.load(exported["root"] / "inputs" / f"{name}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [*VARIANTS, "fine-tuned"])
def test_timm_loads_every_weight_and_gives_mmlm_logits(exported, name):
    report = exported["reports"][name]
    assert report["architecture"] == (VARIANTS[name][1] if name in VARIANTS else "vit_tiny_patch16_224")
    expected = _logits(exported, name)
    for how in ("by_name", "local_dir"):
        assert report[how] == {"missing": [], "unexpected": [], "not_loaded": []}, how
        got = torch.load(exported["root"] / "outputs" / f"{name}-{how}.pt")
        gap = (got - expected).abs().max().item()
        print(f"[timm {how}] {name}: logits {tuple(got.shape)}, max|diff| = {gap:.2e}")
        assert got.shape == expected.shape and gap <= 1e-5


@pytest.mark.slow  # fine-tunes before it exports: 8 s
def test_a_fine_tuned_checkpoint_exports_its_trained_weights(exported, fine_tuned):
    got = torch.load(exported["root"] / "outputs" / "fine-tuned-local_dir.pt")
    start = _logits(exported, "fine-tuned", fine_tuned["start"])
    gap = (got - start).abs().max().item()
    print(f"[timm] fine-tuned vs its starting weights: max|diff| = {gap:.2e}")
    assert gap > 1e-3  # the export carries what the two steps learned, not the initial weights


@pytest.mark.parametrize("name", [*VARIANTS, "fine-tuned"])
def test_timm_preprocessing_equals_mmlm_eval_transform(exported, name):
    """timm's resolve_data_config + create_transform from the folder's pretrained_cfg, on a real photo."""
    model = exported["models"][name]
    ours = image_transform(model.cfg, train=False)(Image.open(PHOTO).convert("RGB"))
    theirs = torch.load(exported["root"] / "outputs" / f"{name}-pixels.pt")
    gap = (theirs - ours).abs().max().item()
    print(f"[timm transform] {name}: {tuple(theirs.shape)}, max|diff| = {gap:.2e}")
    assert theirs.shape == ours.shape and gap <= 1e-6


@pytest.mark.parametrize("name", [*VARIANTS, "fine-tuned"])
def test_mmlm_reads_its_timm_export_back_unchanged(exported, name):
    model = exported["models"][name]
    back = mmlm.load_pretrained(exported["root"] / "models" / name)
    assert type(back) is type(model) and back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    # everything but the init recipe and LayerScale's init value (the gammas are weights) survives the trip
    assert dataclasses.replace(back.cfg, init=model.cfg.init, layer_scale=model.cfg.layer_scale) == model.cfg


def test_mmlm_convert_command_writes_the_same_folder(exported, tmp_path):
    from mmlm.cli import main

    source = mmlm.save(exported["models"]["vit-tiny-gap"], tmp_path / "mmlm")
    main(["convert", str(source), str(tmp_path / "timm"), "--to", "timm"])
    ours = exported["root"] / "models" / "vit-tiny-gap"
    assert json.loads((tmp_path / "timm" / "config.json").read_text()) == json.loads((ours / "config.json").read_text())
    a, b = (read_state_dict(f / "model.safetensors") for f in (tmp_path / "timm", ours))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("preset", "architecture"),
    [("vit-ti-16", "vit_tiny_patch16_224"), ("vit-s-16", "vit_small_patch16_224"),
     ("vit-b-16", "vit_base_patch16_224"), ("vit-b-32", "vit_base_patch32_224"),
     ("clip-vit-b-16", "vit_base_patch16_clip_quickgelu_224"), ("clip-vit-b-32", "vit_base_patch32_clip_quickgelu_224")],
)  # fmt: skip
def test_a_standard_vit_is_named_with_no_overrides(preset, architecture):
    """timm's own model of that name (built on the meta device) has exactly the preset's shape and options."""
    cfg = getattr(from_name(preset), "vision", from_name(preset))
    config = hub_config(cfg)
    assert (config["architecture"], config["model_args"]) == (architecture, {})
    with torch.device("meta"):
        ref = timm.create_model(architecture, num_classes=cfg.num_classes)
    read = config_from_timm(ref, config["pretrained_cfg"])
    assert dataclasses.replace(read, init=cfg.init) == cfg


@pytest.mark.slow
def test_the_name_table_matches_timm():
    for name, (eps, fixed) in TIMM_NAMES.items():
        with torch.device("meta"):
            ref = timm.create_model(name)
        cfg = config_from_timm(ref)
        act = fixed.get("act_layer") or "gelu"
        assert (cfg.norm_eps, cfg.patch_size, cfg.width, cfg.depth, cfg.heads, cfg.norm_pre, cfg.act) == (
            eps, fixed["patch_size"], fixed["embed_dim"], fixed["depth"], fixed["num_heads"],
            fixed.get("pre_norm", False), act,
        ), name  # fmt: skip


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (lambda: mmlm.create_model(VIT, pre_norm=False), r"post-LN blocks \(pre_norm=False\)"),
        (lambda: mmlm.create_model(VIT, norm_pre=True), "patch embedding with bias and norm_pre"),
        (lambda: mmlm.create_model(VIT, norm_eps=1e-12), "LayerNorm eps 1e-12"),
        (lambda: mmlm.create_model("clip-tiny"), r"export the CLIP's image tower, model.visual"),
        (lambda: mmlm.create_model("bert-tiny"), "exports ViTs .* not TextEncoder"),
    ],
    ids=["post-ln", "patch-bias-with-norm-pre", "eps", "clip", "text"],
)
def test_what_timm_cannot_express_is_refused_by_name(model, match, tmp_path):
    with pytest.raises(ConversionError, match=match):
        export(model(), tmp_path / "out", "timm")
    assert list(tmp_path.iterdir()) == []  # no folder, not even a partial one
