"""Memory and speed of on-disk IVF-PQ indexes built in shards (``mmlm.retrieval.ondisk``) at 1M, 2M and 4M
synthetic clustered 512-d vectors; a projection to 10^8 and 10^9 from the measurements.

Every build and every server runs in its own process, so that its peak resident memory (VmHWM, which is
``ru_maxrss`` of a process that did not inherit its parent's) is its own. The vectors are generated block by block into one float16 .npy (never all in RAM), the way
``mmlm index build --dtype float16`` stores embeddings; each size indexes its first N rows. Measured:

- build: training on a fixed sample, shards of ``--shard_size`` vectors added in blocks of 65,536, the merge
  into ``image.ivfdata``: seconds, peak RSS (VmHWM, which counts the pages of memory-mapped files
  the process touched: page cache the kernel can drop) and peak *anonymous* RSS (sampled every 20 ms from
  /proc/self/status: the memory the build needs); then, in the same process, the tuning ``mmlm index build``
  runs next (``tune_nprobe`` against ``--query_ms``, on the first N rows as the index's own embeddings): the
  nprobe, re-ranking depth, recall@10 and query time it records in the manifest, and the peak RSS with it
  (its searches read the lists through their map);
- build in memory (``--baseline``): what ``mmlm index build`` did before, every vector in RAM as float32;
- serving: open (lists mapped), 200 held-out queries one at a time, 100 candidates re-ranked with the
  stored float16 rows (``--candidates``; ``Index.search`` proposes 10 k): recall@10 against an exact
  search, query p50 / p95, peak RSS (which counts the pages of the stored rows re-ranking read through the
  map: page cache) and peak anonymous RSS. ``--only_serve`` serves the indexes already built again.

The load averages (``os.getloadavg``) before each build go into the results: on a shared machine they say
how much the times are inflated.

    python scripts/bench_ondisk.py --root /tmp/bench_ondisk                  # 1M, 2M, 4M: ~30 min, 2 cores
    python scripts/bench_ondisk.py --root /tmp/b --sizes 20000,40000 --dim 64 --index IVF64,PQ16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 65536
QUERIES = 200


def generate(path: Path, n: int, dim: int, centres: int, seed: int = 0) -> None:
    """``n`` unit vectors around ``centres`` random unit centres, float16, written block by block (a map
    opened per block, so that written pages do not pile up in this process), and ``QUERIES`` fresh queries."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        x = c[rng.integers(0, centres, m)] + rng.standard_normal((m, dim), np.float32) / np.sqrt(dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    tmp = path.with_name(path.name + ".tmp")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim)).flush()
    for start in range(0, n, BLOCK):
        out = np.load(tmp, mmap_mode="r+")
        out[start : start + BLOCK] = draw(min(BLOCK, n - start))
        out.flush()
        del out
    np.save(path.with_name("queries.npy"), draw(QUERIES).astype(np.float32))
    os.replace(tmp, path)  # complete or absent: a rerun generates it again


class PeakAnon:
    """The peak of RssAnon (anonymous resident memory), sampled in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def maxrss() -> int:
    """Peak resident memory of this process: VmHWM, not ``ru_maxrss``, which a child started by
    ``subprocess`` inherits from its parent's peak (Linux keeps it across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------ the children


def first_rows(vectors: Path, n: int) -> Path:
    """An .npy of the first ``n`` rows of ``vectors`` (itself when it has ``n``), copied in blocks (never all
    in RAM): the index's own embeddings, which the tuning samples its queries from and searches exactly."""
    mapped = np.load(vectors, mmap_mode="r")
    if mapped.shape[0] == n:
        return vectors
    out = vectors.with_name(f"first_{n}.npy")
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(mapped.dtype),
                                                     "fortran_order": False, "shape": (n, mapped.shape[1])})  # fmt: skip
            for start in range(0, n, BLOCK):
                f.write(np.ascontiguousarray(mapped[start : min(start + BLOCK, n)]).tobytes())
        os.replace(tmp, out)
    return out


def child_build(a: argparse.Namespace) -> dict:
    import faiss

    from mmlm.retrieval.ondisk import merge_shards, plan_shards, tune_nprobe, write_shards

    anon = PeakAnon()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    start = time.perf_counter()
    plan = plan_shards(out / "shards", "image", Path(a.vectors), 0, np.arange(a.n, dtype=np.int64), a.index, a.nprobe,
                       shard_rows=a.shard_size)  # fmt: skip
    times["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    write_shards(out / "shards", plan)
    times["shards_s"] = time.perf_counter() - start
    start = time.perf_counter()
    index = merge_shards(out / "shards", plan, out / "image.index")
    faiss.write_index(index, str(out / "image.index"))
    times["merge_s"] = time.perf_counter() - start
    built = {"maxrss": maxrss(), "peak_anon": max(anon.peak, anon.now())}  # the build, up to its merge
    shards = sum(p.stat().st_size for p in (out / "shards").iterdir())
    for p in (out / "shards").iterdir():
        p.unlink()
    (out / "shards").rmdir()
    start = time.perf_counter()  # as write_faiss tunes a build without --nprobe: the merged index, still open
    tuning = tune_nprobe(index, Path(a.rows), target_ms=a.query_ms)
    times["tune_s"] = time.perf_counter() - start
    del index
    return {**{k: round(v, 1) for k, v in times.items()}, "shards": plan["shards"], "shard_bytes": shards, **built,
            "maxrss_tuned": maxrss(), "peak_anon_tuned": anon.stop(), "tuning": tuning,
            "index_bytes": (out / "image.index").stat().st_size,
            "ivfdata_bytes": (out / "image.ivfdata").stat().st_size}  # fmt: skip


def child_memory(a: argparse.Namespace) -> dict:
    """The build as it was before: every vector in RAM as float32, one index in memory, written whole."""
    import faiss

    from mmlm.retrieval.choose import faiss_index

    anon = PeakAnon()
    start = time.perf_counter()
    vectors = np.load(a.vectors, mmap_mode="r")[: a.n].astype(np.float32)  # the merged chunks, as write.merge held them
    index, _ = faiss_index(vectors, a.index, a.nprobe)
    for s in range(0, a.n, BLOCK):
        index.add_with_ids(vectors[s : s + BLOCK], np.arange(s, min(s + BLOCK, a.n), dtype=np.int64))
    faiss.write_index(index, str(Path(a.out) / "memory.index"))
    seconds = time.perf_counter() - start
    (Path(a.out) / "memory.index").unlink()
    return {"seconds": round(seconds, 1), "maxrss": maxrss(), "peak_anon": anon.stop()}


def child_truth(a: argparse.Namespace) -> dict:
    """The exact top 10 of each query among the first N rows, in blocks."""
    q = np.load(Path(a.vectors).with_name("queries.npy"))
    best_s = np.full((len(q), 10), -np.inf, np.float32)
    best_i = np.full((len(q), 10), -1, np.int64)
    mapped = np.load(a.vectors, mmap_mode="r")
    for s in range(0, a.n, BLOCK):
        e = min(s + BLOCK, a.n)
        scores = q @ np.asarray(mapped[s:e], np.float32).T
        both_s = np.concatenate([best_s, scores], 1)
        both_i = np.concatenate([best_i, np.broadcast_to(np.arange(s, e), scores.shape)], 1)
        top = np.argpartition(-both_s, 9, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
    np.save(Path(a.out) / "truth.npy", best_i)
    return {}


def child_serve(a: argparse.Namespace) -> dict:
    """Open the index as ``Index.open`` does (lists mapped) and answer the queries one at a time, re-ranked."""
    import faiss

    from mmlm.retrieval.index import read_faiss

    anon = PeakAnon()
    start = time.perf_counter()
    index = read_faiss(Path(a.out) / "image.index", ondisk=True)
    stored = np.load(a.vectors, mmap_mode="r")
    open_s = time.perf_counter() - start
    opened_rss = maxrss()
    q = np.load(Path(a.vectors).with_name("queries.npy"))
    truth = np.load(Path(a.out) / "truth.npy")
    rows = {}
    for nprobe in a.probes:
        faiss.extract_index_ivf(index).nprobe = nprobe
        seconds, recall = [], []
        for query, true in zip(q, truth):
            t = time.perf_counter()
            _, found = index.search(query[None], a.candidates)
            found = np.sort(found[0][found[0] >= 0])
            scores = np.asarray(stored[found], np.float32) @ query  # the candidates' rows only
            top = found[np.argsort(-scores, kind="stable")[:10]]
            seconds.append(time.perf_counter() - t)
            recall.append(len(set(top.tolist()) & set(true.tolist())) / 10)
        rows[nprobe] = {"recall@10": round(float(np.mean(recall)), 3),
                        "p50_ms": round(float(np.median(seconds)) * 1000, 2),
                        "p95_ms": round(float(np.percentile(seconds, 95)) * 1000, 2)}  # fmt: skip
    return {"open_s": round(open_s, 3), "rss_after_open": opened_rss, "maxrss": maxrss(), "peak_anon": anon.stop(),
            "probes": rows}  # fmt: skip


CHILDREN = {"build": child_build, "memory": child_memory, "truth": child_truth, "serve": child_serve}


def run_child(kind: str, a: argparse.Namespace, n: int, out: Path) -> dict:
    args = [sys.executable, __file__, "--child", kind, "--n", str(n), "--out", str(out), "--vectors", str(a.vectors),
            "--index", a.index, "--nprobe", str(a.nprobe), "--shard_size", str(a.shard_size),
            "--probes", ",".join(map(str, a.probes)), "--threads", str(a.threads), "--candidates", str(a.candidates),
            "--query_ms", str(a.query_ms), "--rows", str(first_rows(a.vectors, n))]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"{kind} {n}: {run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("/tmp/bench_ondisk"))
    p.add_argument("--sizes", default="1000000,2000000,4000000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--centres", type=int, default=10_000)
    p.add_argument("--index", default="IVF1024,PQ64")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--probes", default="16,32,64")
    p.add_argument("--shard_size", type=int, default=1 << 20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline", default="1000000", help="sizes also built in memory as before (comma-separated)")
    p.add_argument("--candidates", type=int, default=100, help="proposed by the PQ, re-ranked (Index.search: 10 k)")
    p.add_argument("--query_ms", type=float, default=10.0, help="the tuning's query-time target (the build's default)")
    p.add_argument("--only_serve", action="store_true", help="serve the indexes a previous run built in --root")
    p.add_argument("--child", choices=list(CHILDREN))
    p.add_argument("--n", type=int)
    p.add_argument("--out", type=Path)
    p.add_argument("--vectors", type=Path)
    p.add_argument("--rows", type=Path, help="the first N rows of --vectors (a build child tunes on them)")
    a = p.parse_args()
    a.probes = [int(x) for x in str(a.probes).split(",")]
    if a.child:
        import faiss

        faiss.omp_set_num_threads(a.threads)
        print(json.dumps(CHILDREN[a.child](a)))
        return

    sizes = [int(x) for x in a.sizes.split(",")]
    baseline = {int(x) for x in a.baseline.split(",") if x}
    a.root.mkdir(parents=True, exist_ok=True)
    a.vectors = a.root / f"vectors_{max(sizes)}x{a.dim}.f16.npy"
    if not a.vectors.is_file():
        start = time.perf_counter()
        generate(a.vectors, max(sizes), a.dim, a.centres)
        print(f"generated {max(sizes):,} x {a.dim} float16 in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    results = {"index": a.index, "dim": a.dim, "candidates": a.candidates, "shard_size": a.shard_size,
               "threads": a.threads, "query_ms": a.query_ms, "sizes": {}}  # fmt: skip
    if a.only_serve:
        results = json.loads((a.root / "results.json").read_text())
        for n in sizes:
            r = results["sizes"][str(n)]
            r["serve"] = run_child("serve", a, n, a.root / f"ix_{n}")
            print(f"{n:,}: serve, {a.candidates} candidates {r['serve']}", file=sys.stderr)
        results["candidates"] = a.candidates
        (a.root / f"results_{a.candidates}.json").write_text(json.dumps(results, indent=2))
        print(table(results, a.dim))
        return
    for n in sizes:
        out = a.root / f"ix_{n}"
        load = os.getloadavg()
        r = {"build": run_child("build", a, n, out), "load": [round(x, 2) for x in load]}
        print(f"{n:,}: build {r['build']}", file=sys.stderr)
        if n in baseline:
            r["memory"] = run_child("memory", a, n, out)
            print(f"{n:,}: in memory {r['memory']}", file=sys.stderr)
        run_child("truth", a, n, out)
        r["serve"] = run_child("serve", a, n, out)
        print(f"{n:,}: serve {r['serve']}", file=sys.stderr)
        results["sizes"][n] = r
    (a.root / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results, a.dim))


def table(results: dict, dim: int) -> str:
    """The measurements as a markdown table, and the projection to 10^8 and 10^9 vectors."""
    lines = ["| N | build s (train/shards/merge) | build peak RSS GiB | build peak anon GiB | in-memory build RSS GiB "
             "| lists on disk GiB | serve RSS GiB (after open / peak / peak anon) | recall@10 re-ranked (nprobe) "
             "| query p50 ms | tuned: nprobe, re-rank x k, recall@10, ms (tune s) | build + tuning peak RSS GiB "
             "| load 1/5/15 min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n, r in results["sizes"].items():
        b, s = r["build"], r["serve"]
        mem = gib(r["memory"]["maxrss"]) if "memory" in r else "-"
        probes = s["probes"]
        recall = ", ".join(f"{v['recall@10']:.3f} ({k})" for k, v in probes.items())
        p50 = ", ".join(f"{v['p50_ms']:.1f}" for v in probes.values())
        t = b.get("tuning")
        tuned = (f"{t['nprobe']}, {t['rerank']}, {t['recall@10']:.3f}, {t['query_ms']:.1f} ({b['tune_s']:.0f})"
                 if t else "-")  # fmt: skip
        tuned_rss = gib(b["maxrss_tuned"]) if "maxrss_tuned" in b else "-"
        load = "/".join(f"{x:.1f}" for x in r["load"]) if "load" in r else "-"
        lines.append(f"| {int(n):,} | {b['train_s'] + b['shards_s'] + b['merge_s']:.0f} ({b['train_s']:.0f}/"
                     f"{b['shards_s']:.0f}/{b['merge_s']:.0f}) | {gib(b['maxrss'])} | {gib(b['peak_anon'])} | {mem} | "
                     f"{gib(b['ivfdata_bytes'])} | {gib(s['rss_after_open'])} / {gib(s['maxrss'])} / {gib(s['peak_anon'])} | "
                     f"{recall} | {p50} | {tuned} | {tuned_rss} | {load} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
