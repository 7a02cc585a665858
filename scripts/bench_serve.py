#!/usr/bin/env python
"""``mmlm serve``: text-query latency and throughput over HTTP, against the model + FAISS called directly.
One run, this machine; prints a Markdown table.

    python scripts/bench_serve.py                                  # ViT-B/32 text tower, 100k x 512 index
    python scripts/bench_serve.py --model clip-tiny --n 10000      # a smoke run

The index: ``n`` items with synthetic unit vectors of the model's embedding size (512 for ViT-B/32)
and one caption each, written by the code ``mmlm index build`` finishes with, exact search (FAISS
``Flat``, as ``auto`` picks below 1M). The model: the preset with random weights (speed does not
depend on the weights). Every query is a different text of 6-10 words.

=================  ====================================================================================
direct             one query at a time in this process: tokenize, ``encode_text``, ``Index.search``
                   (k = 10), ``Index.metadata``: what a server must add as little as possible to
direct batched     the same on ``batch`` queries at once: the most a batching server could reach
server, 1 client   ``POST /search`` over loopback, one client waiting for each answer (``mmlm serve``,
                   started as a subprocess with the same threads)
server, C clients  ``clients`` concurrent clients on kept-alive connections, ``requests`` queries
=================  ====================================================================================

Each in float32 and with ``--int8`` (queries through an int8 copy of the model). Overhead: the server's
one-client median over the direct median, minus one. Both sides run with the same torch / FAISS
settings (``compute_settings``; ``--threads``, default: what ``mmlm serve`` picks, cores - 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

import mmlm
from mmlm.compress import quantize_int8
from mmlm.eval.results import load_model, model_tokenizer
from mmlm.retrieval import Index
from mmlm.retrieval.build import Job, Options, weights_hash, write_index
from mmlm.retrieval.server import compute_settings, default_threads

WORDS = ["a", "photo", "of", "the", "small", "red", "old", "new", "dog", "cat", "car", "house", "tree", "river", "city",
         "night", "street", "sky", "beach", "mountain", "person", "child", "bird", "flower", "boat", "train",
         "market", "window", "light", "table", "book", "cup", "road", "snow", "field"]  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(6, 11)))) + f" {i}" for i in range(n)]


def make_index(folder: Path, model: str, n: int, index_type: str) -> Index:
    """``n`` items of unit vectors and one caption each, in an index folder ``mmlm serve`` opens as any other."""
    net = load_model(model)
    rng = np.random.default_rng(0)
    dim = net.cfg.embed_dim
    vectors = rng.standard_normal((n, dim), np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    merged = {"image": vectors, "text": vectors, "text_owner": np.arange(n),
              "items": [{"meta": {"filepath": f"{i:06d}.jpg"}, "captions": [f"caption {i}"], "skips": []}
                        for i in range(n)]}  # fmt: skip
    job = Job("build", model, weights_hash(net), "synthetic", "test", "filepath", "caption", None, None, 0, 64)
    write_index(folder, merged, {}, job, Options(index_type=index_type), None, "caption", net, 0.0)
    return Index.open(folder)


def percentiles(ms: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(ms, [50, 99])
    return {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2)}


def direct(index: Index, net: torch.nn.Module, queries: list[str], batch: int, label: str) -> list[dict[str, Any]]:
    tokenizer = model_tokenizer(net)

    def answer(group: list[str]) -> None:
        with torch.inference_mode():
            tokens = tokenizer(group)
            vectors = net.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()
        ids, _ = index.search(vectors, 10)
        for row in ids:
            index.metadata(row)

    for q in queries[:5]:
        answer([q])
    one = []
    for q in queries:
        start = time.perf_counter()
        answer([q])
        one.append((time.perf_counter() - start) * 1e3)
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        answer(queries[i : i + batch])
    seconds = time.perf_counter() - start
    return [{"setting": f"{label}: direct", **percentiles(one), "qps": round(1e3 / float(np.mean(one)), 1)},
            {"setting": f"{label}: direct, batches of {batch}", "p50_ms": None, "p99_ms": None,
             "qps": round(len(queries) / seconds, 1)}]  # fmt: skip


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> tuple[int, bytes]:
    writer.write(b"POST /search HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def clients(url: str, queries: list[str], n_clients: int) -> tuple[list[float], float]:
    """``queries`` sent by ``n_clients`` concurrent clients (plain HTTP/1.1, kept-alive connections)."""
    host, port = url.removeprefix("http://").split(":")
    bodies = iter([json.dumps({"text": q, "k": 10}).encode() for q in queries])
    latencies: list[float] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for body in bodies:
            start = time.perf_counter()
            status, data = await post(reader, writer, body)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
            latencies.append((time.perf_counter() - start) * 1e3)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n_clients)))
    return latencies, time.perf_counter() - start


def serve(folder: Path, threads: int, int8: bool, log_file: Path) -> tuple[subprocess.Popen, str]:
    args = ["serve", str(folder), "--port", "0", "--threads", str(threads), "--int8", str(int8).lower()]
    with open(log_file, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "mmlm.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                   cwd=folder.parent)  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = re.search(r"running on (http://[\d.]+:\d+)", log_file.read_text(errors="replace"))
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"mmlm serve exited:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("mmlm serve did not start in 10 minutes")


def run(
    model: str = "clip-vit-b-32",
    n: int = 100_000,
    index_type: str = "Flat",
    precisions: list[str] = ["float32", "int8"],  # noqa: B006 (read by jsonargparse, never mutated)
    queries: int = 200,
    batch: int = 32,
    clients_list: list[int] = [8, 64],  # noqa: B006
    requests: int = 1000,
    threads: int | None = None,
    json_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Build the index, time the direct calls and the server, print a Markdown table (progress on stderr).

    Args:
        model: the CLIP preset whose text tower encodes the queries (random weights).
        n: items in the index.
        index_type: its FAISS type (``Flat``: what ``mmlm index build`` picks below 1M vectors).
        precisions: ``float32`` and / or ``int8`` (the query encoder of ``mmlm serve --int8``).
        queries: one-at-a-time queries, directly and with one client.
        batch: queries per batch of the direct batched run.
        clients_list: concurrent clients of each concurrent run.
        requests: queries of each concurrent run.
        threads: torch and FAISS threads on both sides (default: ``mmlm serve``'s, cores - 1).
        json_path: also write the rows and the environment here.
    """
    threads = threads or default_threads()
    compute_settings(threads)  # the direct side runs as the server's model thread does
    env = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": threads,
           "model": model, "index": f"{n:,} x {{dim}} {index_type}", "load_avg_1min": round(os.getloadavg()[0], 2),
           "torch": torch.__version__, "faiss": faiss.__version__, "mmlm": mmlm.__version__}  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mmlm-bench-serve-") as tmp:
        log(f"index: {n:,} items ...")
        index = make_index(Path(tmp) / "index", model, n, index_type)
        env["index"] = env["index"].format(dim=index.dim)
        net = load_model(model)
        for precision in precisions:
            log(f"{precision}: direct ...")
            encoder = quantize_int8(net) if precision == "int8" else net
            rows += direct(index, encoder, texts(queries, 1), batch, precision)
            log(f"{precision}: server ...")
            process, url = serve(index.folder, threads, precision == "int8", Path(tmp) / f"server-{precision}.log")
            try:
                asyncio.run(clients(url, texts(10, 2), 1))  # warm the connection path
                latencies, _ = asyncio.run(clients(url, texts(queries, 3), 1))
                rows.append({"setting": f"{precision}: server, 1 client", **percentiles(latencies),
                             "qps": round(1e3 / float(np.mean(latencies)), 1)})  # fmt: skip
                for c in clients_list:
                    latencies, seconds = asyncio.run(clients(url, texts(requests, 10 + c), c))
                    rows.append({"setting": f"{precision}: server, {c} clients", **percentiles(latencies),
                                 "qps": round(len(latencies) / seconds, 1)})  # fmt: skip
            finally:
                process.terminate()
                process.wait(30)
    for precision in precisions:
        setting = {r["setting"]: r for r in rows}
        overhead = setting[f"{precision}: server, 1 client"]["p50_ms"] / setting[f"{precision}: direct"]["p50_ms"] - 1
        env[f"overhead_p50_{precision}"] = f"{overhead:+.1%}"
    env["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print("<!-- " + ", ".join(f"{k} {v}" for k, v in env.items()) + " -->\n")
    print("| setting | p50 ms | p99 ms | queries/s |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['p50_ms'] if r['p50_ms'] is not None else ''} | "
              f"{r['p99_ms'] if r['p99_ms'] is not None else ''} | {r['qps']} |")  # fmt: skip
    for precision in precisions:
        print(f"\nserver overhead at p50, one client, {precision}: {env[f'overhead_p50_{precision}']}")
    if json_path is not None:
        Path(json_path).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return rows


def main(args: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_serve.py")
    parser.add_function_arguments(run, skip={"json_path"}, as_group=False)
    parser.add_argument("--json", type=Path | None, default=None, help="also write the results to this JSON file")
    cfg = parser.parse_args(args).as_dict()
    cfg["json_path"] = cfg.pop("json")
    run(**cfg)


if __name__ == "__main__":
    main()
