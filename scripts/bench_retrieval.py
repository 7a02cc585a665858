"""Retrieval workloads of ``scripts/bench.py``: building an index, and answering queries through ``mmlm serve``.

    python scripts/bench.py --only '[index_build, query]'           # ViT-B/32-size CLIP, a few minutes each
    python scripts/bench.py --quick --only '[index_build, query]'   # clip-tiny: a smoke run
    python scripts/bench.py --only '[sync]'                         # sync after a 1% change vs a full build

===========  ===========================================================  ===========================================
name         mmlm                                                         reference
===========  ===========================================================  ===========================================
sync         ``sync_index`` (``mmlm index sync``) after 1% of a folder     ``build_index`` of the same folder as it
             changed: 0.5% rewritten, 0.25% renamed, 0.25% deleted,        is then (the only other way to bring the
             0.25% new; end to end, model load included                    index up to date), end to end
index_build  ``build_index`` (``mmlm index build``) over a folder of         the same model's ``encode_image`` +
             JPEGs: decode, DataLoader worker, Lightning predict,          ``faiss.IndexFlatIP.add`` on the same
             chunks, FAISS, SQLite; per image, end to end and marginal     decoded batches, per image
query        text queries through a real ``mmlm serve`` on 127.0.0.1:      the same model + ``Index.search`` +
             one client; many concurrent clients (micro-batched);          metadata in this process: one query at a
             fp32 and int8, exact and IVF-PQ index                         time; in batches of the client count
search       (rows of ``query``) ``Index.search``, one query, k = 10       FAISS's own ``search`` on the same vectors
===========  ===========================================================  ===========================================

Every time is seconds per image or per query (ratio > 1: mmlm faster). Marginal build time is the extra time
of a build of N over one of N/2 per extra image: fixed costs (loading the model, starting Lightning) cancel.
The served index holds synthetic unit vectors (a mixture on the sphere, as embeddings of a real collection
cluster: ``n / 100`` centres, cosine ~0.7 to a centre) and a file name per item, written by the code ``mmlm
index build`` finishes with; the model is the preset with random weights (speed does not depend on them).
Both sides of ``query`` run with the server's torch / FAISS settings (``compute_settings``, cores - 1
threads); the server computes in float32 whatever ``--dtype`` says, and int8 rows run on the CPU only.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from bench_harness import Bench, Row, compare, log, ms, skipped
from PIL import Image

from mmlm import factory
from mmlm.compress import quantize_int8
from mmlm.data.tokenizers import Tokenizer
from mmlm.paths import ASSETS
from mmlm.retrieval import Client, Index, build_index, sync_index
from mmlm.retrieval.choose import is_lossy
from mmlm.retrieval.client import Load, load
from mmlm.retrieval.options import Job, Options
from mmlm.retrieval.write import write_index
from mmlm.serve.settings import default_threads
from mmlm.serve.threads import compute_settings


@dataclass(frozen=True)
class RetrievalSizes:
    """Shapes of the retrieval workloads in one tier."""

    model: str  # CLIP preset, random weights
    images: int  # JPEGs of the index build
    batch: int  # images per forward pass of both build sides
    workers: int  # DataLoader workers of the build
    vectors: int  # items of the exact index served
    ivf_vectors: int  # items of the IVF-PQ index served
    ivf: str  # its FAISS type
    queries: int  # one-at-a-time queries: directly and with one client
    clients: int  # concurrent clients
    requests: int  # queries of each concurrent run
    sync_model: str = "clip-tiny"  # of the sync workload: its images are tiny, so is the model
    sync_images: int = 10_000  # PNGs of 32 px in the folder synced (1% of them changed)


TIERS = {
    True: RetrievalSizes("clip-tiny", 64, 8, 0, 4_000, 20_000, "IVF64,PQ8", 24, 8, 96, sync_images=1_000),
    False: RetrievalSizes("clip-vit-b-32", 96, 32, 1, 100_000, 1_000_000, "IVF1024,PQ64", 200, 64, 640,
                          sync_images=10_000),  # the size the sync target (under 5% of a build) names
}
REFERENCE = "encode_image + faiss.IndexFlatIP.add"
PRECISION = {torch.float32: "32-true", torch.bfloat16: "bf16-true", torch.float16: "16-true"}
WORDS = ["a", "photo", "of", "the", "small", "red", "old", "new", "dog", "cat", "car", "house", "tree", "river", "city",
         "night", "street", "sky", "beach", "mountain", "person", "child", "bird", "flower", "boat", "train",
         "market", "window", "light", "table", "book", "cup", "road", "snow", "field"]  # fmt: skip


# ------------------------------------------------------------------------------ index build


def jpeg_folder(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of 320 px (random crops of the bundled photographs) to decode and resize."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted((ASSETS / "images").glob("*.jpg"))]
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        im.crop((x, y, x + side, y + side)).resize((320, 320)).save(folder / f"{i:05d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


def index_build(b: Bench) -> list[Row]:
    """``build_index`` of N JPEGs against ``encode_image`` + ``IndexFlatIP.add`` on the decoded batches."""
    s = TIERS[b.sizes.tiny]
    root = b.tmp / "index_build"
    files = jpeg_folder(root / "all", s.images)
    half = root / "half"
    half.mkdir()
    for p in files[: s.images // 2]:
        shutil.copy(p, half / p.name)
    loaded = factory.load(s.model, seed=0)  # the weights and transform build_index takes from the same spec and seed
    model, transform = b.infer(loaded.model), loaded.transform
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in files]).to(b.device, b.dtype)
    batches = pixels.split(s.batch)
    accelerator = "gpu" if b.device.type == "cuda" else "cpu"
    options = {"batch_size": s.batch, "num_workers": s.workers, "accelerator": accelerator,
               "precision": PRECISION[b.dtype], "index_type": "Flat"}  # fmt: skip
    builds = itertools.count()

    def build(data: Path) -> Callable[[], None]:
        def run() -> None:
            out = root / f"ix{next(builds)}"
            with build_index(s.model, str(data), out, **options):  # type: ignore[union-attr]
                pass
            shutil.rmtree(out)

        return run

    def reference() -> faiss.IndexFlatIP:
        index = faiss.IndexFlatIP(model.cfg.embed_dim)
        with torch.inference_mode():
            for x in batches:
                index.add(model.encode_image(x).float().cpu().numpy())
        return index

    built = build_index(s.model, str(root / "all"), root / "check", **options)
    diff = float(np.abs(built.embeddings("image") - reference().reconstruct_n(0, s.images)).max())
    # the calls above were the warm-up: a build of a ViT-B/32 takes long enough to skip another
    t = compare({"mmlm": build(root / "all"), "half": build(half), "ref": reference}, 0, b.sizes.repeats, b.sync)
    n, extra = s.images, s.images - s.images // 2
    reference_s = t["ref"] / n
    where = f"{s.model}, {n} JPEGs of 320 px, batch {s.batch}, {s.workers} DataLoader workers"
    rows = [Row("index build, end to end (per image)", t["mmlm"] / n, reference_s, REFERENCE, diff,
                f"{where}; {t['mmlm']:.1f} s incl. model load, Lightning, decode, FAISS, SQLite; "
                f"{n / t['mmlm']:.1f} vs {n / t['ref']:.1f} img/s")]  # fmt: skip
    name = "index build, marginal (per image)"
    if t["mmlm"] <= t["half"]:  # a tiny model on a busy machine: the noise is larger than the work
        return rows + [skipped(name, REFERENCE, f"a build of {n} took no longer than one of {n // 2}: too noisy")]
    marginal = (t["mmlm"] - t["half"]) / extra
    return rows + [Row(name, marginal, reference_s, REFERENCE, diff,
                       f"(build of {n} - build of {n // 2}) / {extra}: {1 / marginal:.1f} img/s, "
                       f"{reference_s / marginal:.0%} of encode_image alone")]  # fmt: skip


# ------------------------------------------------------------------------------ sync


def noise_png(path: Path, seed: int) -> None:
    """A 32 px PNG of noise from its own seed: every image distinct, cheap to write and decode."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def change_one_percent(folder: Path, n: int) -> dict[str, int]:
    """Of ``n`` files, 0.5% rewritten, 0.25% renamed, 0.25% deleted, and 0.25% new files (spread over the folder)."""
    step = 100  # one file of each hundred touched: in turn rewritten, rewritten, renamed, deleted (+ one new)
    counts = {"changed": 0, "renamed": 0, "removed": 0, "added": 0}
    for j, i in enumerate(range(0, n, step)):
        path = folder / f"{i:06d}.png"
        if j % 4 < 2:
            noise_png(path, 10_000_000 + i)
            counts["changed"] += 1
        elif j % 4 == 2:
            os.rename(path, folder / f"renamed-{i:06d}.png")
            counts["renamed"] += 1
        else:
            path.unlink()
            noise_png(folder / f"new-{i:06d}.png", 20_000_000 + i)
            counts["removed"] += 1
            counts["added"] += 1
    return counts


def sync(b: Bench) -> list[Row]:
    """``sync_index`` after 1% of a folder changed, against ``build_index`` of the folder as it is then."""
    s = TIERS[b.sizes.tiny]
    root = b.tmp / "sync"
    original = root / "original"
    original.mkdir(parents=True)
    for i in range(s.sync_images):
        noise_png(original / f"{i:06d}.png", i)
    accelerator = "gpu" if b.device.type == "cuda" else "cpu"
    device = "cuda" if b.device.type == "cuda" else "cpu"
    options = {"batch_size": 256, "accelerator": accelerator, "precision": PRECISION[b.dtype]}
    build_index(s.sync_model, str(original), root / "base", **options).close()  # type: ignore[union-attr]
    times: dict[str, list[float]] = {"sync": [], "build": []}
    diff, report = 0.0, {}
    for r in range(max(2, b.sizes.repeats // 2) + 1):  # the first round warms up (file cache, imports)
        work = root / f"run{r}"
        shutil.copytree(original, work / "images", copy_function=shutil.copy2)  # mtimes kept: the index's own
        shutil.copytree(root / "base", work / "ix")
        for manifest in (work / "ix").glob("v*/manifest.json"):  # the index names the copy of the folder
            manifest.write_text(manifest.read_text().replace(str(original), str(work / "images")))
        changed = change_one_percent(work / "images", s.sync_images)
        seconds, (synced, report) = clock(lambda: sync_index(work / "ix", batch_size=256, device=device))
        build_s, rebuilt = clock(lambda: build_index(s.sync_model, str(work / "images"), work / "rebuilt", **options))
        with synced, rebuilt:  # type: ignore[union-attr]
            assert {k: report["counts"][k] for k in changed} == changed, (report["counts"], changed)
            paths = {m["filepath"]: i for i, m in enumerate(rebuilt.metadata(np.arange(len(rebuilt))))}
            order = [paths[m["filepath"]] for m in synced.metadata(np.arange(len(synced)))]
            diff = max(diff, float(np.abs(synced.embeddings()[:] - rebuilt.embeddings()[order]).max()))
        shutil.rmtree(work)
        if r > 0:
            times["sync"].append(seconds)
            times["build"].append(build_s)
    sync_s, build_s = float(np.median(times["sync"])), float(np.median(times["build"]))
    counts = report["counts"]
    note = (f"{s.sync_model}, {s.sync_images:,} PNGs of 32 px, {counts['embedded']} embedded, "
            f"{counts['unchanged']:,} unchanged; sync {sync_s:.2f} s = {sync_s / build_s:.1%} of a build "
            f"({build_s:.1f} s); median of {len(times['sync'])}")  # fmt: skip
    return [Row("index sync after a 1% change", sync_s, build_s, "build_index of the changed folder", diff, note)]


# ------------------------------------------------------------------------------ query


def mixture(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``n / 100`` random unit centres, and 100 fresh queries from the same mixture."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim), np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n + 100, dim), np.float32)
    for start in range(0, n + 100, 65536):
        m = min(65536, n + 100 - start)
        x = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, dim), np.float32) / np.sqrt(dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out[:n], out[n:]


def vector_index(folder: Path, vectors: np.ndarray, job: Job, net: torch.nn.Module, index_type: str) -> float:
    """An index folder of ``vectors`` (one file name per item) that ``mmlm serve`` opens as any other; seconds."""
    items = [{"meta": {"filepath": f"{i:07d}.jpg"}, "captions": [], "skips": []} for i in range(len(vectors))]
    merged = {"image": vectors, "text": np.zeros((0, vectors.shape[1]), np.float32),
              "text_owner": np.zeros(0, np.int64), "items": items}  # fmt: skip
    start = time.perf_counter()
    write_index(folder, merged, {}, job, Options(index_type=index_type), None, "caption", net, 0.0)
    return time.perf_counter() - start


def texts(n: int, seed: int) -> list[str]:
    """``n`` different texts of 6-10 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(6, 11)))) + f" {i}" for i in range(n)]


def start_server(folder: Path, threads: int, int8: bool, device: torch.device) -> tuple[subprocess.Popen, str]:
    """``mmlm serve FOLDER --port 0`` as a subprocess; its URL once ``/healthz`` answers."""
    log_file = folder.parent / f"server-{folder.name}-int8-{int8}.log"
    args = ["serve", str(folder), "--port", "0", "--threads", str(threads), "--int8", str(int8).lower(),
            "--device", str(device)]  # fmt: skip
    with open(log_file, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "mmlm.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                   cwd=folder.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mmlm serve exited with {process.returncode}:\n{log_file.read_text()[-3000:]}")
        found = re.search(r"running on (http://[\d.]+:\d+)", log_file.read_text(errors="replace"))
        if found:
            Client(found.group(1)).health()
            return process, found.group(1)
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"mmlm serve did not start in 10 minutes:\n{log_file.read_text()[-3000:]}")


class Direct:
    """What the server does for text queries, called in this process: tokenize, encode, search, metadata."""

    def __init__(self, index: Index, model: torch.nn.Module, tokenizer: Tokenizer, device: torch.device) -> None:
        self.index, self.model, self.tokenizer, self.device = index, model, tokenizer, device

    @torch.inference_mode()
    def __call__(self, queries: list[str]) -> np.ndarray:
        tokens = self.tokenizer(queries)
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        vectors = self.model.encode_text(ids, mask).float().cpu().numpy()
        found, scores = self.index.search(vectors, 10)
        self.index.metadata(found)
        return scores


def clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds one call of ``fn`` took, and what it returned."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ask(url: str, queries: list[str], clients: int) -> Load:
    """``queries`` sent to the server by ``clients`` concurrent clients; every one must be answered."""
    got = load(url, [{"text": q, "k": 10} for q in queries], clients)
    if got.errors:
        raise RuntimeError(f"{len(got.errors)} failed requests, e.g. {got.errors[:3]}")
    return got


def spread(seconds: list[float]) -> str:
    p50, p99 = np.percentile(seconds, [50, 99])
    return f"p50 {ms(p50)}, p99 {ms(p99)}"


def served_rows(b: Bench, folder: Path, direct: Direct, label: str, int8: bool, threads: int) -> list[Row]:
    """One client, then ``clients`` concurrent ones, against ``direct`` on the same texts, in interleaved rounds."""
    s = TIERS[b.sizes.tiny]
    rounds = b.sizes.repeats
    process, url = start_server(folder, threads, int8, b.device)
    try:
        ask(url, texts(10, 1), 1)  # warm the connection path
        for q in texts(5, 2):
            direct([q])
        one, many = texts(s.queries, 3), texts(s.requests, 4)
        times: dict[str, list[float]] = {"server": [], "direct": [], "server_many": []}
        wall = {"server": 0.0, "direct": 0.0}
        diffs = {"one": 0.0, "many": 0.0}
        for r in range(rounds):
            part = one[r::rounds]
            got = ask(url, part, 1)
            times["server"] += got.latencies
            for q, answer in zip(part, got.answers):
                seconds, scores = clock(lambda q=q: direct([q])[0])
                times["direct"].append(seconds)
                diffs["one"] = max(diffs["one"], float(np.abs([h["score"] for h in answer["hits"]] - scores).max()))
            part = many[r::rounds]
            got = ask(url, part, s.clients)
            times["server_many"] += got.latencies
            wall["server"] += got.wall
            seconds, expected = clock(lambda part=part: np.concatenate(
                [direct(part[i : i + s.clients]) for i in range(0, len(part), s.clients)]))  # fmt: skip
            wall["direct"] += seconds
            served = np.array([[h["score"] for h in a["hits"]] for a in got.answers])
            diffs["many"] = max(diffs["many"], float(np.abs(served - expected).max()))
    finally:
        process.terminate()
        process.wait(30)
    n = len(many)
    server_one, direct_one = float(np.median(times["server"])), float(np.median(times["direct"]))
    batch_note = "int8 quantizes activations per batch: other batches, other scores; " if int8 else ""
    return [
        Row(f"query, 1 client, {label}", server_one, direct_one, "model + Index.search in-process", diffs["one"],
            f"server {spread(times['server'])}, {1 / np.mean(times['server']):.1f} q/s; direct "
            f"{spread(times['direct'])}, {1 / np.mean(times['direct']):.1f} q/s; diff = max |score gap|"),
        Row(f"query, {s.clients} clients, {label}", wall["server"] / n, wall["direct"] / n,
            f"model + Index.search in batches of {s.clients}", diffs["many"],
            f"server {spread(times['server_many'])}, {n / wall['server']:.1f} q/s; direct batched "
            f"{n / wall['direct']:.1f} q/s; {batch_note}per query: 1 / throughput"),
    ]  # fmt: skip


def search_rows(index: Index, vectors: np.ndarray, queries: np.ndarray, label: str, seconds: float) -> list[Row]:
    """``Index.search`` one query at a time against FAISS's own search of the same index; recall for a lossy one."""
    own = index.faiss("image")
    t: dict[str, list[float]] = {"mmlm": [], "ref": []}
    for q in queries:
        t["mmlm"].append(clock(lambda q=q: index.search(q[None], 10))[0])
        t["ref"].append(clock(lambda q=q: own.search(q[None], 10))[0])
    ids, scores = index.search(queries, 10)
    _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)  # brute force, no copy
    diff = float(np.abs(scores - np.einsum("qd,qkd->qk", queries, vectors[ids])).max())
    lossy = is_lossy(own)
    mmlm_s, ref_s = float(np.median(t["mmlm"])), float(np.median(t["ref"]))
    if not lossy:
        return [Row(f"search only, {label}", mmlm_s, ref_s, "FAISS search of the same index", diff,
                    f"one query of {len(queries)}, k=10; diff = max |score - exact cosine|")]  # fmt: skip
    raw = own.search(queries, 10)[1]

    def recall(found: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(t)) / 10 for a, t in zip(found.tolist(), truth.tolist())]))

    size = (index.files / index.manifest["indexes"]["image"]["file"]).stat().st_size
    exact_size = len(vectors) * (vectors.shape[1] * 4 + 8)  # an exact IndexIDMap: float32 vectors and int64 ids
    nprobe = index.manifest["indexes"]["image"]["nprobe"]
    note = (f"recall@10 vs exact: re-ranked {recall(ids):.3f} / FAISS's PQ order {recall(raw):.3f}; nprobe {nprobe}; "
            f"built in {seconds:.0f} s; "
            f"size 1/{exact_size / size:.0f} of exact ({size / 2**20:,.1f} vs {exact_size / 2**20:,.1f} MiB); "
            "diff = max |score - exact cosine|")  # fmt: skip
    return [Row(f"search only, {label}", mmlm_s, ref_s, "FAISS search, same index, no re-ranking", diff, note)]


def query(b: Bench) -> list[Row]:
    """Text queries through ``mmlm serve`` (1 and many clients; fp32, int8; exact and IVF-PQ) against the same
    model and index called directly, plus ``Index.search`` alone against FAISS."""
    s = TIERS[b.sizes.tiny]
    root = b.tmp / "query"
    root.mkdir()
    loaded = factory.load(s.model, seed=0)  # `mmlm serve` loads the same weights and tokenizer from the spec and seed
    net, tokenizer = loaded.model, loaded.require_tokenizer()
    job = Job("build", s.model, loaded.weights_hash, "synthetic", "test", "filepath", None, None, None, 0, 64)
    encoders = {"fp32": net.to(b.device)}
    if b.device.type == "cpu":
        encoders["int8"] = quantize_int8(net)
    if b.dtype != torch.float32:
        log(f"query: the server computes in float32; --dtype {str(b.dtype).removeprefix('torch.')} is not used here")
    dim, threads = net.cfg.embed_dim, default_threads()
    saved = torch.get_num_threads(), faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
    compute_settings(threads)  # as the server's model thread computes
    rows: list[Row] = []
    try:
        for seed, (index_type, n) in enumerate([("Flat", s.vectors), (s.ivf, s.ivf_vectors)]):
            kind = "exact" if index_type == "Flat" else index_type
            folder = root / ("exact" if index_type == "Flat" else "ivf")  # a name `mmlm serve` takes
            vectors, queries = mixture(n, dim, seed)
            seconds = vector_index(folder, vectors, job, net, index_type)
            index = Index.open(folder)
            log(f"query: {kind} index of {n:,} x {dim} written in {seconds:.0f} s")
            rows += search_rows(index, vectors, queries, f"{kind}, {n:,} x {dim}", seconds)
            del vectors
            # the IVF index: the fastest encoder only, so that the index's share of the time shows
            for precision in ("fp32", "int8") if kind == "exact" else list(encoders)[-1:]:
                label = f"{precision}, {kind} {n:,}"
                if precision not in encoders:
                    reason = f"int8 Linear layers run on the CPU, not {b.device}"
                    log(f"query: {label} skipped: {reason}")
                    rows += [skipped(f"query, 1 client, {label}", "model + Index.search in-process", reason),
                             skipped(f"query, {s.clients} clients, {label}", "model + Index.search in batches",
                                     reason)]  # fmt: skip
                    continue
                log(f"query: {label} ...")
                direct = Direct(index, encoders[precision], tokenizer, b.device)
                rows += served_rows(b, folder, direct, label, precision == "int8", threads)
    finally:
        torch.set_num_threads(saved[0])
        faiss.omp_set_num_threads(saved[1])
        faiss.cvar.distance_compute_blas_threshold = saved[2]
        shutil.rmtree(root, ignore_errors=True)
    return rows
