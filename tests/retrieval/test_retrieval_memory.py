"""50k images x 50k texts: the full float32 score matrix would be 10 GB; chunked evaluation stays far below."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mmlm.retrieval.evaluate

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")
EVALUATE = Path(mmlm.retrieval.evaluate.__file__)
N, D = 50_000, 32
FULL_MATRIX_BYTES = N * N * 4
LIMIT_BYTES = 1.5e9

# A fresh process, so that its peak RSS (ru_maxrss, exact: no sampling) owes nothing to other tests (Linux only). It loads
# mmlm/retrieval/evaluate.py by path: the module needs only torch, while importing the mmlm package pulls in
# Lightning (seconds of start-up, a few hundred MB of baseline).
SCRIPT = textwrap.dedent(f"""
    import importlib.util, json, resource, time
    import torch, torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("evaluate", {str(EVALUATE)!r})
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    retrieval_metrics = evaluate.retrieval_metrics

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn({N}, {D}, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn({N}, {D}, generator=g), dim=-1)
    # Resident now (not the peak so far, which start-up may have set higher), so growth is an upper bound.
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    start = time.perf_counter()
    metrics = retrieval_metrics(img, txt, chunk_size=1024)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({{"growth": peak - before, "before": before, "seconds": seconds, "metrics": metrics}}))
""")


def test_50k_by_50k_in_bounded_memory():
    assert FULL_MATRIX_BYTES == 10_000_000_000  # what one N x N float32 matrix would take
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(
        f"[retrieval 50k x 50k] full matrix {FULL_MATRIX_BYTES / 1e9:.1f} GB; peak RSS growth "
        f"{out['growth'] / 1e6:.0f} MB (process at {out['before'] / 1e6:.0f} MB before); {out['seconds']:.1f} s"
    )
    assert out["growth"] < LIMIT_BYTES
    assert out["growth"] < FULL_MATRIX_BYTES / 20
    m = out["metrics"]
    for d in ("image", "text"):  # a real ranking happened: better than chance (1/50k), far from perfect
        assert 10 / N < m[f"{d}_retrieval_recall@1"] <= m[f"{d}_retrieval_recall@5"] <= m[f"{d}_retrieval_recall@10"] < 0.5
        assert 1 <= m[f"{d}_retrieval_median_rank"] <= N
