#!/usr/bin/env python
"""``mmlm index``: embedding throughput, search latency, IVF-PQ recall and memory, and text -> image
search with the tiny CLIP the main job trains. One run, this machine; prints a Markdown table.

    python scripts/bench_index.py                                   # everything, CPU sizes
    python scripts/bench_index.py --only '[exact, ivfpq]' --n_ivf 300000
    python scripts/bench_index.py --model clip-tiny --n_images 64   # a smoke run

Parts (``--only`` takes these names):

========  ==========================================================================================
embed     ``mmlm index build`` over a folder of JPEGs (decode, resize, DataLoader workers, chunks,
          FAISS, SQLite) against the model's own ``encode_image`` on ready tensors, same batch size.
          Marginal throughput: the extra images of a build of N over one of N/2, by the extra time
          (fixed costs such as loading the model cancel out). Both sides run ``repeats`` times in
          turn and the fastest run counts, so that a busy shared CPU skews them alike.
exact     one-query latency of ``Index.search`` on ``n_exact`` x 512 synthetic unit vectors, exact
          inner product (FAISS ``Flat``).
ivfpq     the same on ``n_ivf`` vectors with IVF-PQ (``ivf_type``): build time, one-query latency,
          recall@10 against exact search (with ``Index.search``'s reranking from the memory-mapped
          embeddings, and FAISS's own ranking), and the index's size against the exact index's.
digits    ``configs/align/clip-digits-tiny.yaml`` trained for ``digit_steps``, an index of the 360
          held-out digits, and the queries "a photo of the number N." (N spelt out and as a numeral):
          the share whose first hit is an image of digit N (goal >= 90%).
========  ==========================================================================================

Synthetic vectors are a mixture on the unit sphere, as embeddings of a real collection cluster:
``n / 100`` random unit centres, each vector ``normalize(centre + noise * g / sqrt(512))`` with g
standard normal (noise 1.0: cosine ~0.7 to its centre, ~0.5 to its nearest neighbours). Queries are
fresh draws from the same mixture.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

import mmlm
from mmlm.data import image_transform
from mmlm.eval.results import load_model
from mmlm.paths import ASSETS
from mmlm.retrieval import Index
from mmlm.retrieval.build import Job, Options, build, write_index

DIM = 512
PARTS = ("embed", "exact", "ivfpq", "digits")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def times_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


# ------------------------------------------------------------------------------ embedding throughput


def jpeg_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs (random crops of the bundled photographs, 320 px) to decode and resize."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted((ASSETS / "images").glob("*.jpg"))]
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        im.crop((x, y, x + side, y + side)).resize((320, 320)).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def embed(args: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    n, batch = args["n_images"], args["batch_size"]
    folder = jpeg_folder(tmp / "jpegs", n)
    half = tmp / "half"
    half.mkdir()
    for p in sorted(folder.glob("*.jpg"))[: n // 2]:
        shutil.copy(p, half / p.name)
    model = load_model(args["model"], seed=0)
    transform = image_transform(model.cfg.vision, train=False)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))[:batch]])
    own_ms, seconds = [], {"half": [], "full": []}
    with torch.inference_mode():
        model.encode_image(images)  # warm-up
    for repeat in range(args["repeats"]):  # both sides in turn, so that both see the same neighbours on a shared CPU
        with torch.inference_mode():
            own_ms += times_ms(lambda: model.encode_image(images), repeats=max(2, n // batch // 2))
        for name, data in (("half", half), ("full", folder)):
            start = time.perf_counter()
            build(args["model"], str(data), tmp / f"ix-{name}-{repeat}", batch_size=batch,
                  num_workers=args["num_workers"], accelerator="cpu")  # fmt: skip
            seconds[name].append(time.perf_counter() - start)
    own = batch / min(own_ms) * 1e3  # the fastest run of each: the one least disturbed by other processes
    full, half_s = min(seconds["full"]), min(seconds["half"])
    marginal = (n - n // 2) / (full - half_s)
    note = f"{args['model']}, batch {batch}, {args['num_workers']} workers, {n} JPEGs of 320 px"
    return [
        {"part": "embed", "metric": "encode_image alone (ready tensors)", "value": f"{own:.1f} img/s", "note": note},
        {"part": "embed", "metric": "index build, marginal", "value": f"{marginal:.1f} img/s",
         "note": f"{marginal / own:.0%} of encode_image"},
        {"part": "embed", "metric": "index build, end to end", "value": f"{n / full:.1f} img/s",
         "note": f"{full:.1f} s for {n} (model load, Lightning, merge included)"},
    ]  # fmt: skip


# ------------------------------------------------------------------------------ search


def mixture(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        x = centres[rng.integers(0, len(centres), m)] + noise / np.sqrt(DIM) * rng.standard_normal((m, DIM), np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def synthetic(n: int, queries: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), DIM), np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return mixture(n, centres, noise, rng), mixture(queries, centres, noise, rng)


def vector_index(folder: Path, vectors: np.ndarray, index_type: str, nprobe: int | None) -> tuple[Index, float]:
    """An index folder of bare vectors, written by the code ``mmlm index build`` merges with; build seconds."""
    merged = {"image": vectors, "text": np.zeros((0, DIM), np.float32), "text_owner": np.zeros(0, np.int64),
              "items": [{"meta": {}, "captions": [], "skips": []}] * len(vectors)}  # fmt: skip
    job = Job("build", "synthetic", "-", "synthetic", "-", "-", None, None, None, 0, 0)
    start = time.perf_counter()
    write_index(folder, merged, {}, job, Options(index_type=index_type, nprobe=nprobe), None, "caption",
                torch.nn.Identity(), 0.0)  # fmt: skip
    return Index.open(folder), time.perf_counter() - start


def recall_at_10(index: Index, queries: np.ndarray, truth: np.ndarray, rerank: int) -> float:
    ids, _ = index.search(queries, 10, rerank=rerank)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())]))


def search_part(name: str, n: int, index_type: str, args: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    log(f"{name}: {n:,} x {DIM} vectors ...")
    vectors, queries = synthetic(n, args["queries"], args["noise"])
    index, seconds = vector_index(tmp / name, vectors, index_type, args["nprobe"])
    entry = index.manifest["indexes"]["image"]
    latency = statistics.median(times_ms(lambda q=q: index.search(q[None], 10), repeats=1)[0] for q in queries)
    rows = [{"part": name, "metric": f"one query, k=10 ({entry['type']}, {n:,} x {DIM})", "value": f"{latency:.2f} ms",
             "note": f"built in {seconds:.0f} s, nprobe {entry['nprobe']}" if entry["nprobe"] else
             f"built in {seconds:.0f} s"}]  # fmt: skip
    if name == "ivfpq":
        exact = faiss.IndexFlatIP(DIM)
        exact.add(vectors)
        _, truth = exact.search(queries, 10)
        size = (index.folder / entry["file"]).stat().st_size
        exact_size = n * (DIM * 4 + 8)  # an exact IndexIDMap: float32 vectors and int64 ids
        rows += [
            {"part": name, "metric": "recall@10 vs exact, reranked (Index.search)",
             "value": f"{recall_at_10(index, queries, truth, rerank=10):.3f}",
             "note": "100 candidates rescored from the memory-mapped embeddings"},
            {"part": name, "metric": "recall@10 vs exact, FAISS's PQ ranking",
             "value": f"{recall_at_10(index, queries, truth, rerank=1):.3f}", "note": "rerank=1"},
            {"part": name, "metric": "index size / exact index size", "value": f"1/{exact_size / size:.0f}",
             "note": f"{size / 2**20:.0f} MiB vs {exact_size / 2**20:.0f} MiB"},
        ]  # fmt: skip
    shutil.rmtree(index.folder)
    return rows


# ------------------------------------------------------------------------------ the trained tiny CLIP


def digits(args: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    from mmlm.cli import lightning_cli
    from mmlm.data.digits import DIGIT_CLASSNAMES
    from mmlm.eval.results import model_tokenizer

    steps = str(args["digit_steps"])
    quiet = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip
    start = time.perf_counter()
    run = lightning_cli(["--config", str(ROOT / "configs/align/clip-digits-tiny.yaml"), *quiet,
                         "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.max_steps", steps,
                         "--trainer.val_check_interval", steps], run=False)  # fmt: skip
    run.trainer.fit(run.model, run.datamodule)
    trained = time.perf_counter() - start
    checkpoint = tmp / "last.ckpt"
    run.trainer.save_checkpoint(checkpoint)
    index = Index.build(str(checkpoint), "digits", tmp / "digits", split="test", accelerator="cpu")
    model = load_model(str(checkpoint))
    queries = [f"a photo of the number {n}." for n in [*DIGIT_CLASSNAMES, *map(str, range(10))]]
    tokens = model_tokenizer(model)(queries)
    with torch.no_grad():
        ids, _ = index.search(model.encode_text(tokens["input_ids"], tokens["attention_mask"]), 10)
    labels = np.array([[row["label"] for row in index.metadata(r)] for r in ids])
    wanted = np.arange(20)[:, None] % 10
    return [
        {"part": "digits", "metric": "text -> image: right digit first",
         "value": f"{np.mean(labels[:, 0] == wanted[:, 0]):.0%}",
         "note": f"20 queries over 360 held-out digits; trained {steps} steps in {trained:.0f} s"},
        {"part": "digits", "metric": "text -> image: precision@10", "value": f"{np.mean(labels == wanted):.0%}",
         "note": "share of the first 10 hits showing the digit asked for"},
    ]  # fmt: skip


# ------------------------------------------------------------------------------ the run


def run(
    only: list[str] | None = None,
    model: str = "clip-vit-b-32",
    n_images: int = 256,
    batch_size: int = 32,
    num_workers: int = 1,
    repeats: int = 2,
    n_exact: int = 100_000,
    n_ivf: int = 1_000_000,
    ivf_type: str = "IVF1024,PQ64",
    nprobe: int | None = None,
    queries: int = 100,
    noise: float = 1.0,
    digit_steps: int = 600,
    threads: int | None = None,
    json_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Run the parts, print a Markdown table (progress on stderr).

    Args:
        only: the parts to run (default: all).
        model: the CLIP of the embed part (random weights).
        n_images: JPEGs embedded by the embed part.
        batch_size: of both sides of the embed part.
        num_workers: DataLoader workers of the index build.
        repeats: builds of each size (and rounds of encode_image) in the embed part; the fastest counts.
        n_exact: vectors of the exact index.
        n_ivf: vectors of the IVF-PQ index.
        ivf_type: its FAISS factory string.
        nprobe: IVF clusters searched per query (default: the index's, ``default_nprobe``).
        queries: queries timed and scored for recall.
        noise: spread of the synthetic vectors around their centres.
        digit_steps: training steps of the tiny CLIP.
        threads: torch and FAISS threads (default: theirs).
        json_path: also write the rows and the environment here.
    """
    names = list(only or PARTS)
    if set(names) - set(PARTS):
        raise ValueError(f"unknown part(s) {sorted(set(names) - set(PARTS))}; known: {', '.join(PARTS)}")
    if threads:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    args = dict(locals())
    env = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
           "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__, "faiss": faiss.__version__,
           "mmlm": mmlm.__version__}  # fmt: skip
    parts = {"embed": embed, "digits": digits,
             "exact": lambda a, t: search_part("exact", a["n_exact"], "Flat", a, t),
             "ivfpq": lambda a, t: search_part("ivfpq", a["n_ivf"], a["ivf_type"], a, t)}  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mmlm-bench-index-") as tmp:
        for name in names:
            log(f"{name} ...")
            start = time.perf_counter()
            rows += parts[name](args, Path(tmp) / name)
            log(f"{name} done in {time.perf_counter() - start:.0f} s")
    env["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print("<!-- " + ", ".join(f"{k} {v}" for k, v in env.items()) + " -->\n")
    print("| part | measure | value | notes |\n|---|---|---:|---|")
    for r in rows:
        print(f"| {r['part']} | {r['metric']} | {r['value']} | {r['note']} |")
    if json_path is not None:
        Path(json_path).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return rows


def main(args: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench_index.py")
    parser.add_function_arguments(run, skip={"json_path"}, as_group=False)
    parser.add_argument("--json", type=Path | None, default=None, help="also write the results to this JSON file")
    cfg = parser.parse_args(args).as_dict()
    cfg["json_path"] = cfg.pop("json")
    run(**cfg)


if __name__ == "__main__":
    main()
