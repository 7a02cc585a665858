"""scripts/share_study.py end to end on a few steps, through its command line.

Parameter counts are checked against numbers the script does not compute: OpenCLIP's CLIP of the
same shapes for ``none``, and the block's parameters by formula from the config's widths for
what sharing removes. No accuracy or speed is asserted beyond being a valid value.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
from PIL import Image

from mmlm.config import from_name

ROOT = Path(__file__).resolve().parents[1]
MODES = ["none", "all", "attention_mlp@1:2"]
SCORES = ("zeroshot_acc1", "zeroshot_mean_per_class_recall", "image_retrieval_recall@1", "image_retrieval_recall@5",
          "text_retrieval_recall@1", "text_retrieval_recall@5")  # fmt: skip


def study(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "share_study.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip


def block_parts(width: int, mlp_dim: int) -> tuple[int, int, int]:
    """Parameters of one pre-LN block: attention (fused qkv + proj), MLP (fc1 + fc2), its two LayerNorms."""
    attention = (3 * width * width + 3 * width) + (width * width + width)
    mlp = (width * mlp_dim + mlp_dim) + (mlp_dim * width + width)
    return attention, mlp, 2 * 2 * width


@pytest.mark.slow
def test_smoke_run_reports_every_mode_with_independent_parameter_counts(tmp_path):
    out = tmp_path / "out"
    result = study(tmp_path, "--out", str(out), "--steps", "3", "--seeds", "1", "--modes", f"[{', '.join(MODES)}]")
    assert result.returncode == 0, result.stderr[-4000:]

    report = json.loads((out / "share_study.json").read_text())
    modes = report["modes"]
    assert list(modes) == MODES
    for name, mode in modes.items():
        run = mode["runs"][0]
        assert run["seed"] == 0 and run["eval_images"] == 360, name  # the held-out digits
        for key in SCORES:
            assert math.isfinite(mode[key]["mean"]) and 0.0 <= mode[key]["mean"] <= 1.0, (name, key)
        assert mode["samples_per_s"]["mean"] > 0, name
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in table[1:]] == MODES

    cfg = from_name("clip-tiny")
    v, t = cfg.vision, cfg.text
    reference = open_clip.CLIP(
        embed_dim=cfg.embed_dim, quick_gelu=True,
        vision_cfg={"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.depth,
                    "head_width": v.width // v.heads},
        text_cfg={"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
                  "layers": t.depth},
    )  # fmt: skip
    assert modes["none"]["params"] == sum(p.numel() for p in reference.parameters())
    attention, mlp, norms = block_parts(v.width, v.mlp_dim)
    assert modes["none"]["block_params"] == 2 * v.depth * (attention + mlp + norms)
    assert modes["none"]["params"] - modes["all"]["params"] == v.depth * (attention + mlp + norms)
    # one layer (1 of 2) shares attention and MLP; each tower keeps its own LayerNorms
    assert modes["none"]["params"] - modes["attention_mlp@1:2"]["params"] == attention + mlp

    png = out / "images" / "share_study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 0
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_unknown_mode_is_one_line_naming_it(tmp_path):
    out = tmp_path / "out"
    result = study(tmp_path, "--out", str(out), "--steps", "3", "--seeds", "1", "--modes", "[none, everything]")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and "unknown mode 'everything'" in lines[0] and "attention_mlp" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_existing_results_are_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "share_study.json").write_text("{}")
    result = study(tmp_path, "--out", str(out), "--steps", "3", "--seeds", "1", "--modes", "[none]")
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (out / "share_study.json").read_text() == "{}"
