"""scripts/bench.py --quick --only '[index_build, query]' runs end to end: a real ``mmlm index build`` and real
``mmlm serve`` processes give what the model and FAISS give when called directly. No timing is asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("index build, end to end (per image)", "index build, marginal (per image)",
        "search only, exact, 4,000 x 32",
        "query, 1 client, fp32, exact 4,000", "query, 8 clients, fp32, exact 4,000",
        "query, 1 client, int8, exact 4,000", "query, 8 clients, int8, exact 4,000",
        "search only, IVF64,PQ8, 20,000 x 32",
        "query, 1 client, int8, IVF64,PQ8 20,000", "query, 8 clients, int8, IVF64,PQ8 20,000")  # fmt: skip


@pytest.mark.slow
def test_retrieval_workloads_match_the_model_and_faiss_called_directly(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", "[index_build, query]",
         "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]

    rows = {row["workload"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == list(ROWS), list(rows)
    marginal = rows.pop("index build, marginal (per image)")  # a difference of two times: noise may win
    assert marginal["skipped"] in ("", "a build of 64 took no longer than one of 32: too noisy"), marginal
    for name, row in rows.items():
        assert row["skipped"] == "" and row["unit"] == "s", row  # every row runs on the CPU
        assert row["mmlm_s"] > 0 and row["reference_s"] > 0, row
        if name.startswith("query, 8 clients, int8"):  # int8 quantizes activations per batch, and the server's
            assert row["diff"] < 0.1, row  # micro-batches are not the reference's batches: near, not equal
        else:  # the build stores what encode_image gives; the server answers what Index.search answers
            assert row["diff"] <= 1e-5, row

    ivf = rows["search only, IVF64,PQ8, 20,000 x 32"]["note"]
    reranked, pq_order = map(float, re.search(r"re-ranked (\d\.\d+) / FAISS's PQ order (\d\.\d+)", ivf).groups())
    assert reranked >= 0.95 and reranked > pq_order  # every cluster probed (nprobe 64), candidates rescored exactly
    assert not list(tmp_path.glob("mmlm-bench-*"))  # the scratch folder (indexes, JPEGs, server logs) is gone
