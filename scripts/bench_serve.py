"""The ``serve_runtime`` workload of ``scripts/bench.py``: ``mmlm serve`` with torch against ONNX Runtime.

    python scripts/bench.py --only '[serve_runtime]'           # ViT-B/32-size CLIP, 100k x 512 index: ~10 min
    python scripts/bench.py --quick --only '[serve_runtime]'   # clip-tiny, 4k vectors: a smoke run

Four servers, one after the other, over the same index (synthetic unit vectors written as a real index, as the
``query`` workload writes them; random weights): ``--runtime torch`` float32 and ``--int8``, ``--runtime onnx``
with the float32 and the int8 export (``mmlm convert --to onnx [--int8]``). For each:

- cold start: from ``Popen`` of ``python -m mmlm.cli serve`` to the first answered text query (imports, index
  and model loading, warm-up, uvicorn), median of ``STARTS`` starts;
- resident memory (VmRSS) right after that first query, and again after a first image query (the ONNX runtime
  builds its image session then: a server that answers text only never holds the image tower);
- text query latency at 1 client (p50), split into the server's own encode and search stages (means, from its
  ``/metrics``), and queries/s at ``clients`` concurrent clients (k = 10).

Rows put ONNX (mmlm column) against torch (reference column) at the same precision; ratio > 1: ONNX faster or
smaller. The issue's goals (cold start < 2 s and < 1/4 of torch's, memory < 1/3, p50 <= torch int8's) are
printed with the four-way table on stderr, with the CPU and whether it has VNNI (int8 dot products).
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_harness import Bench, Row, log, ms
from bench_retrieval import TIERS, mixture, texts, vector_index

from mmlm import factory
from mmlm.export import export
from mmlm.paths import ASSETS
from mmlm.retrieval.client import load
from mmlm.retrieval.options import Job
from mmlm.serve.settings import default_threads

STARTS = 2  # cold starts per server (each torch one costs ~10 s)
CONFIGS = (("torch", "fp32"), ("torch", "int8"), ("onnx", "fp32"), ("onnx", "int8"))
GOALS = "onnx cold start < 2 s and < 1/4 of torch's; RSS < 1/3 of torch's; p50 <= torch int8's"


@dataclass
class Served:
    """What one server measured."""

    cold: list[float]  # seconds from process start to the first answered text query, per start
    rss: float  # MiB resident after the first query
    rss_image: float  # MiB resident after the first image query, which came after it
    p50: float  # seconds, one client
    stages: dict[str, float]  # the server's mean seconds per query in each stage (encode, search), one client
    qps: float  # queries per second, many clients
    scores: np.ndarray  # top-10 scores of the check queries, to compare the runtimes


def cpu() -> str:
    """The CPU's model name and whether it has VNNI (what int8 matrix products run on)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    vnni = "yes" if flags and {"avx512_vnni", "avx_vnni"} & set(flags.group(1).split()) else "no"
    return f"{name.group(1) if name else platform.processor() or platform.machine()}, {os.cpu_count()} cores, VNNI {vnni}"


def post(url: str, body: bytes) -> bytes | None:
    """The answer of one POST, or None while the server is not listening yet."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, ConnectionError):
        return None


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s*(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def stage_seconds(url: str) -> dict[str, float]:
    """Sum and count of each stage the server's ``/metrics`` reports (``mmlm_stage_duration_seconds``)."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    found = re.findall(r'mmlm_stage_duration_seconds_(sum|count)\{stage="(\w+)"\} (\S+)', text)
    return {f"{stage}_{kind}": float(value) for kind, stage, value in found}


def cold_start(args: list[str], log_file: Path) -> tuple[subprocess.Popen, str, float, float]:
    """(process, url, seconds to the first answered text query, MiB resident then) of a new server."""
    query = b'{"text": "a photo of a dog on the beach", "k": 10}'
    start = time.perf_counter()
    with open(log_file, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "mmlm.cli", "serve", *args, "--port", "0"], stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    while time.perf_counter() - start < 600:
        found = re.search(r"running on (http://[\d.]+:\d+)", log_file.read_text(errors="replace"))
        if found and post(found.group(1) + "/search", query) is not None:
            seconds = time.perf_counter() - start
            return process, found.group(1), seconds, rss_mib(process.pid)
        if process.poll() is not None:
            raise RuntimeError(f"mmlm serve exited with {process.returncode}:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.01)
    process.kill()
    raise RuntimeError(f"mmlm serve did not answer in 10 minutes:\n{log_file.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure(b: Bench, args: list[str], log_file: Path, starts: int) -> Served:
    s = TIERS[b.sizes.tiny]
    cold = []
    for n in range(starts):
        process, url, seconds, rss = cold_start(args, log_file)
        cold.append(seconds)
        if n < starts - 1:
            stop(process)
    try:
        image = base64.b64encode((ASSETS / "images" / "rocket.jpg").read_bytes()).decode()
        if post(url + "/search", json.dumps({"image": image, "k": 10}).encode()) is None:
            raise RuntimeError("the image query failed")
        rss_image = rss_mib(process.pid)
        check = load(url, [{"text": q, "k": 10} for q in texts(8, 5)], 1)
        before = stage_seconds(url)
        one = load(url, [{"text": q, "k": 10} for q in texts(s.queries, 3)], 1)
        after = stage_seconds(url)
        many = load(url, [{"text": q, "k": 10} for q in texts(s.requests, 4)], s.clients)
        if check.errors or one.errors or many.errors:
            raise RuntimeError(f"failed requests: {(check.errors + one.errors + many.errors)[:3]}")
    finally:
        stop(process)
    scores = np.array([[h["score"] for h in a["hits"]] for a in check.answers])
    stages = {name: (after[f"{name}_sum"] - before[f"{name}_sum"]) / max(1, after[f"{name}_count"] - before[f"{name}_count"])
              for name in ("encode", "search")}  # fmt: skip
    return Served(cold, rss, rss_image, float(np.median(one.latencies)), stages, len(many.latencies) / many.wall,
                  scores)  # fmt: skip


def serve_runtime(b: Bench) -> list[Row]:
    s = TIERS[b.sizes.tiny]
    root = b.tmp / "serve_runtime"
    root.mkdir()
    loaded = factory.load(s.model, seed=0)  # what `mmlm serve` loads from the index's spec and seed
    net, tokenizer = loaded.model, loaded.require_tokenizer()
    job = Job("build", s.model, loaded.weights_hash, "synthetic", "test", "filepath", None, None, None, 0, 64)
    vectors, _ = mixture(s.vectors, net.cfg.embed_dim, 0)
    folder = root / "photos"
    seconds = vector_index(folder, vectors, job, net, "Flat")
    log(f"serve_runtime: index of {len(vectors):,} x {vectors.shape[1]} written in {seconds:.0f} s")
    del vectors
    exported = {}
    for precision in ("fp32", "int8"):
        start = time.perf_counter()
        exported[precision] = export(net, root / f"photos-{precision}.onnx", "onnx", tokenizer=tokenizer,
                                     int8=precision == "int8", source=s.model)  # fmt: skip
        log(f"serve_runtime: {precision} ONNX export in {time.perf_counter() - start:.0f} s")
    del net, loaded
    threads = default_threads()
    starts = 1 if b.sizes.tiny else STARTS
    results: dict[tuple[str, str], Served] = {}
    for runtime, precision in CONFIGS:
        args = [str(folder), "--threads", str(threads), "--runtime", runtime]
        if runtime == "onnx":
            args += ["--onnx", str(exported[precision])]
        args += ["--int8", "true"] if precision == "int8" else []
        log(f"serve_runtime: {runtime} {precision} ...")
        results[(runtime, precision)] = measure(b, args, root / f"server-{runtime}-{precision}.log", starts)
        r = results[(runtime, precision)]
        log(f"serve_runtime: {runtime} {precision}: cold start {', '.join(f'{c:.2f}' for c in r.cold)} s, "
            f"RSS {r.rss:,.0f} MiB ({r.rss_image:,.0f} after an image), p50 {ms(r.p50)} (encode "
            f"{ms(r.stages['encode'])}, search {ms(r.stages['search'])}), {r.qps:,.1f} q/s at {s.clients} clients")  # fmt: skip
    report(results, s.clients)
    return rows(results, s.clients, s.model)


def report(results: dict[tuple[str, str], Served], clients: int) -> None:
    """The four servers side by side, and the goals, on stderr."""
    log(f"serve_runtime: CPU {cpu()}")
    log(f"{'server':<12} {'cold start':>10} {'RSS MiB':>8} {'+image':>8} {'p50':>9} {'encode':>9} {'search':>9} "
        f"{f'q/s @{clients}':>9}")  # fmt: skip
    for (runtime, precision), r in results.items():
        log(f"{runtime + ' ' + precision:<12} {np.median(r.cold):>9.2f}s {r.rss:>8,.0f} {r.rss_image:>8,.0f} "
            f"{ms(r.p50):>9} {ms(r.stages['encode']):>9} {ms(r.stages['search']):>9} {r.qps:>9.1f}")  # fmt: skip
    onnx, torch, torch8 = results[("onnx", "fp32")], results[("torch", "fp32")], results[("torch", "int8")]
    log(f"goals ({GOALS}): onnx fp32 cold start {np.median(onnx.cold):.2f} s = 1/{np.median(torch.cold) / np.median(onnx.cold):.1f} "
        f"of torch's; RSS 1/{torch.rss / onnx.rss:.1f}; p50 {ms(onnx.p50)} vs torch int8 {ms(torch8.p50)}")  # fmt: skip


def rows(results: dict[tuple[str, str], Served], clients: int, model: str) -> list[Row]:
    out = []
    for precision in ("fp32", "int8"):
        onnx, torch = results[("onnx", precision)], results[("torch", precision)]
        diff = float(np.abs(onnx.scores - torch.scores).max())
        agree = "diff = max |top-10 score gap| of 8 text queries" + (
            " (int8: each runtime quantizes its own way)" if precision == "int8" else "")  # fmt: skip
        label, ref = f"serve {precision}, onnx vs torch", f"mmlm serve --runtime torch{' --int8' if precision == 'int8' else ''}"
        out += [
            Row(f"{label}: cold start", float(np.median(onnx.cold)), float(np.median(torch.cold)), ref, diff,
                f"process start to the first answered text query ({model}); starts: onnx "
                f"{', '.join(f'{c:.2f}' for c in onnx.cold)} s, torch {', '.join(f'{c:.2f}' for c in torch.cold)} s; {agree}"),
            Row(f"{label}: RSS after 1st query", onnx.rss, torch.rss, ref, diff, "VmRSS of the server process", "MiB"),
            Row(f"{label}: RSS after an image query too", onnx.rss_image, torch.rss_image, ref, diff,
                "VmRSS once an image was searched (ONNX builds its image session then)", "MiB"),
            Row(f"{label}: text query p50, 1 client", onnx.p50, torch.p50, ref, diff,
                f"k = 10, HTTP included; encode {ms(onnx.stages['encode'])} vs {ms(torch.stages['encode'])}, "
                f"search {ms(onnx.stages['search'])} vs {ms(torch.stages['search'])} (server means)"),
            Row(f"{label}: {clients} clients, per query", 1 / onnx.qps, 1 / torch.qps, ref, diff,
                f"onnx {onnx.qps:,.1f} q/s, torch {torch.qps:,.1f} q/s; per query: 1 / throughput"),
        ]  # fmt: skip
    onnx, torch8 = results[("onnx", "fp32")], results[("torch", "int8")]
    out.append(Row("serve: onnx fp32 p50 vs torch int8 p50, 1 client", onnx.p50, torch8.p50,
                   "mmlm serve --runtime torch --int8", float("nan"), "the issue's goal: ratio >= 1"))  # fmt: skip
    return out
