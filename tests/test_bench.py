"""scripts/bench.py --quick runs end to end: every workload reports, and both sides compute the same outputs.

No timing is asserted: speed is measured by the benchmark, never by a test. The retrieval workloads
(``index_build``, ``query``: scripts/bench_retrieval.py) are left to their own test.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("clip_image", "clip_text", "clip_int8", "clip_train", "clip_train_patch_dropout", "clip_memory", "vit",
         "bert", "mlm_train", "tokenizer", "coca_generate")  # fmt: skip
ROWS = ("CLIP image encode", "CLIP text encode", "CLIP text encode, both T=77", "CLIP image encode, int8",
        "CLIP text encode, int8", "CLIP train step (fwd+bwd+AdamW)", "CLIP train step, patch dropout 0.5",
        "CLIP train step, patch dropout 0.5 vs none", "CLIP train step, peak memory",
        "CLIP train step, peak memory, grad checkpointing", "CLIP train step, peak memory, micro_batches=4",
        "ViT-B/16 forward", "BERT-base forward (padded)", "BERT-base MLM train step (fwd+bwd+AdamW)",
        "CLIP tokenizer", "CoCa greedy captions, KV cache", "CoCa greedy captions, no cache",
        "CoCa: KV cache vs no cache")  # fmt: skip


@pytest.mark.slow
def test_quick_bench_prints_every_workload_with_matching_outputs(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", f"[{', '.join(NAMES)}]",
         "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]

    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| workload | mmlm | reference | ratio")
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == list(ROWS), result.stdout

    rows = json.loads(out.read_text())["rows"]
    assert [row["workload"] for row in rows] == list(ROWS)
    for row in rows:
        assert row["skipped"] == "", row  # every row runs on the CPU
        assert row["mmlm_s"] > 0 and row["reference_s"] > 0, row  # seconds, or MiB for the memory rows
        if row["agreement"] == "min_cos":  # int8 against float32
            assert row["diff"] >= 0.99, row
        else:
            assert math.isfinite(row["diff"]) and row["diff"] <= 1e-4, row
    units = {row["workload"]: row["unit"] for row in rows}
    assert [name for name, unit in units.items() if unit == "MiB"] == [name for name in ROWS if "memory" in name]
    assert {row["agreement"] for row in rows if "int8" in row["workload"]} == {"min_cos"}


@pytest.fixture
def bench(monkeypatch):
    """scripts/bench.py imported as ``python scripts/bench.py`` finds its neighbours (scripts/ first on the
    path); sys.path and the scripts' entries in sys.modules are as they were afterwards."""
    scripts = ROOT / "scripts"
    names = {p.stem for p in scripts.glob("*.py")}
    before = names & set(sys.modules)
    monkeypatch.syspath_prepend(str(scripts))  # restores sys.path, which bench.py also extends, on teardown
    try:
        yield importlib.import_module("bench")
    finally:
        for name in names & set(sys.modules) - before:
            del sys.modules[name]


def test_rows_that_cannot_run_on_a_gpu_are_printed_with_their_reason(tmp_path, bench):
    b = bench.Bench(bench.TIERS["quick"], torch.device("cuda"), torch.bfloat16, tmp_path)
    rows = bench.clip_int8(b)  # decides from the device alone, before any model or CUDA call

    assert [(r.workload, r.skipped) for r in rows] == [
        ("CLIP image encode, int8", "int8 dynamic quantization runs on the CPU only"),
        ("CLIP text encode, int8", "int8 dynamic quantization runs on the CPU only"),
    ]
    table = bench.markdown(rows, {"load_avg_1min": 0.0, "device": "cuda", "cpu_count": 2})
    lines = [line for line in table.splitlines() if line.startswith("| CLIP")]
    assert lines == [f"| {r.workload} | skipped | skipped | - | - | open_clip + quantize_dynamic | skipped: {r.skipped} |"
                     for r in rows]  # fmt: skip
    assert bench.json_ready(bench.asdict(rows[0]))["mmlm_s"] is None  # JSON has no NaN


@pytest.mark.parametrize(("args", "message"), [
    (["--only", "[nope]"], "bench.py: error: unknown workload(s) ['nope']; known: clip_image,"),
    (["--quick", "--full"], "bench.py: error: --quick and --full exclude each other"),
])  # fmt: skip
@pytest.mark.slow
def test_a_mistake_is_one_line_before_anything_runs(args, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.iterdir())
