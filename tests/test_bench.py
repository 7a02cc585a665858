"""scripts/bench.py --quick runs end to end: every workload reports, and both sides compute the same outputs.

No timing is asserted: speed is measured by the benchmark, never by a test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("CLIP image encode", "CLIP text encode", "CLIP text encode, both T=77", "CLIP train step",
             "ViT-B/16 forward", "BERT-base forward", "CLIP tokenizer")  # fmt: skip


def test_quick_bench_prints_every_workload_with_matching_outputs(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]

    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| workload | mmlm | reference | ratio")
    for name in WORKLOADS:
        assert any(line.startswith(f"| {name}") for line in table[1:]), f"no row for {name!r}:\n{result.stdout}"

    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(table) - 1  # the header (the separator starts "|---")
    for row in rows:
        assert math.isfinite(row["diff"]) and row["diff"] <= 1e-4, row
        assert row["mmlm_s"] > 0 and row["reference_s"] > 0, row
