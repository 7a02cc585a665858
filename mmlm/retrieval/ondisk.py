"""IVF indexes built in shards with bounded memory and merged into on-disk inverted lists, the way
autofaiss and clip-retrieval build and serve LAION-5B (FAISS's ``contrib.ondisk.merge_ondisk``)::

    embeddings .npy (memory-mapped, float32 or float16)
        │ a fixed random sample
        ▼
    trained.index  (the coarse quantizer (+ PQ) trained once; no vectors)
        │ a copy per shard: rows [0, s), [s, 2s), ... (any process or node: ``write_shards(plan, rank, world)``)
        ▼
    00000.index, 00001.index, ...  (each complete or absent: written under a temporary name, renamed)
        │ one merge (the base version's lists first, for ``index add``)
        ▼
    image.index (quantizer + list directory, small)  +  image.ivfdata (codes and ids of every list)

Memory while building is one block of rows plus one shard's codes plus the trained index, whatever the
number of vectors; the merge copies one list at a time through the page cache (``pread`` / ``pwrite``),
never through a map of the shards or the output. ``image.ivfdata`` is memory-mapped when the index is
opened (``index.read_faiss``): resident memory is the lists that queries touch, not their size on disk.
The shards and the trained index live in the job's work folder, so a killed build resumes from the shards
it wrote; a plan that no longer matches the vectors (another set of chunks) starts its shards over.

Several processes (``--devices``, ``--num_nodes``: Lightning's ranks, on a folder every node sees): all
embed; then rank 0 merges the chunks and trains, while every other rank waits for its plan
(``help_with_shards``) and writes shards ``rank``, ``rank + world``, ...; rank 0 writes its own, waits for
those of the ranks whose beat file is fresh, writes any whose rank is gone, and merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from mmlm.retrieval.choose import choose_index, faiss_index, is_lossy, train_size
from mmlm.retrieval.index import EMBEDDINGS, INDEXES, RERANK
from mmlm.retrieval.options import Options, parse_size

BLOCK = 65536  # rows read and added at once: the build's memory is this many float32 vectors, not N
SHARD_ROWS = 1 << 20  # vectors per shard file by default: each shard also holds a copy of the quantizer


def is_ondisk_type(spec: str, dim: int) -> bool:
    """Whether ``spec`` is IVF-based with lists that FAISS can hold on disk (all but IVFPQR's refinement)."""
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQR)


class NpyRows:
    """Rows of an .npy read with ``pread``, not through a memory map: pages a map touches stay resident in
    the process (and count in its peak RSS) while it is mapped, and a training sample spread over N rows
    would touch nearly every page of the file. ``shape`` and ``[sorted row numbers]``, as ``faiss_index``
    uses an array; rows [start, start + n) of the file."""

    def __init__(self, path: Path, start: int = 0, n: int | None = None) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            shape, fortran, self.dtype = (
                fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            )(f)
            self.offset = f.tell()
        assert not fortran and len(shape) == 2, f"{path}: not a C-ordered (rows, dim) array"
        self.path, self.start = path, start
        self.shape = (shape[0] - start if n is None else n, shape[1])
        self.row_bytes = shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, wanted: np.ndarray) -> np.ndarray:
        out = np.empty((len(wanted), self.shape[1]), np.float32)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for j, row in enumerate(np.asarray(wanted, np.int64)):
                data = os.pread(fd, self.row_bytes, self.offset + (self.start + int(row)) * self.row_bytes)
                out[j] = np.frombuffer(data, self.dtype)
        finally:
            os.close(fd)
        return out

    def block(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) as float32, in one read."""
        with open(self.path, "rb") as f:
            f.seek(self.offset + (self.start + a) * self.row_bytes)
            data = np.fromfile(f, self.dtype, (b - a) * self.shape[1])
        return data.reshape(b - a, self.shape[1]).astype(np.float32)


def rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of an .npy as float32, read, not mapped (``NpyRows``)."""
    return NpyRows(path).block(start, stop)


# ------------------------------------------------------------------------------ plan, train, shards


def plan_shards(
    shards: Path, modality: str, vectors: Path, start: int, ids: np.ndarray, spec: str | None,
    nprobe: int | None, shard_rows: int = SHARD_ROWS, trained: faiss.Index | None = None,
    max_train_memory: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train (or take ``trained``: an add's base, emptied) and write the plan of ``modality``'s shards:
    rows ``start:`` of ``vectors`` with ``ids``. A plan already there for the same rows, ids and type is
    kept with its trained index and shards (a resumed build); any other is started over."""
    shards.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    digest = hashlib.sha256(ids.tobytes())
    digest.update(rows(vectors, start, min(start + 16, start + n)).tobytes())  # the rows' first vectors
    key = {"vectors": n, "start": start, "spec": spec, "shard_rows": shard_rows, "digest": digest.hexdigest()[:16]}
    path = shards / f"{modality}.plan.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        plan = json.loads(path.read_text())
        done = sum(shard_path(shards, plan, i).is_file() for i in range(plan["shards"]))
        print(f"{done} of {plan['shards']} {modality} shards already written in {shards}", file=sys.stderr)
        return plan
    for old in shards.glob(f"{modality}.*"):
        old.unlink()
    if trained is None:  # reads the training sample only
        trained, spec = faiss_index(NpyRows(vectors, start, n), spec or "auto", nprobe,  # type: ignore[arg-type]
                                    max_train_memory)
    _write_atomic(trained, shards / f"{modality}.trained.index")
    np.save(shards / f"{modality}.ids.npy", ids)
    plan = {"key": key, "modality": modality, "spec": spec, "vectors": str(vectors), "start": start, "n": n,
            "shard_rows": shard_rows, "shards": max(1, -(-n // shard_rows))}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=2))
    os.replace(tmp, path)  # written last: a plan file means its trained index and ids are complete
    return plan


def shard_path(shards: Path, plan: dict[str, Any], number: int) -> Path:
    """A shard's file, named by its plan's digest: a process still writing a shard of an older plan (a
    killed run's, kept on disk) can never leave it under a name the current plan reads."""
    return shards / f"{plan['modality']}.{plan['key']['digest']}.{number:05d}.index"


def write_shards(shards: Path, plan: dict[str, Any], rank: int = 0, world: int = 1) -> int:
    """This process's shards of ``plan`` (numbers ``rank``, ``rank + world``, ...) that are not written
    yet, each a copy of the trained index holding its rows; returns how many it wrote. Processes on
    several nodes run it at once on a shared folder; each shard is complete or absent."""
    return sum(_write_shard(shards, plan, number) for number in range(rank, plan["shards"], world))


def _write_shard(shards: Path, plan: dict[str, Any], number: int) -> bool:
    path = shard_path(shards, plan, number)
    if path.is_file():
        return False
    modality, size = plan["modality"], plan["shard_rows"]
    ids = np.load(shards / f"{modality}.ids.npy", mmap_mode="r")
    index = faiss.read_index(str(shards / f"{modality}.trained.index"))
    first, last = number * size, min((number + 1) * size, plan["n"])
    for a in range(first, last, BLOCK):
        b = min(a + BLOCK, last)
        index.add_with_ids(rows(Path(plan["vectors"]), plan["start"] + a, plan["start"] + b), np.array(ids[a:b]))
    _write_atomic(index, path)
    return True


def _write_atomic(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes may write the same shard: same bytes
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ several processes

BEAT_S = 5.0  # a process in the shard stage touches its beat file this often
STALE_S = 60.0  # a beat older than this: its process is gone (its shards are written by rank 0)


def beat_file(shards: Path, rank: int) -> Path:
    return shards / f"rank{rank:05d}.beat"


@contextmanager
def beating(path: Path) -> Iterator[None]:
    """Touch ``path`` every ``BEAT_S`` seconds while the block runs (a thread: the process may be inside
    FAISS for minutes), so that the other processes know it is alive."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                path.touch()
            except FileNotFoundError:  # no folder (yet, or any more: the job is published)
                pass
            stop.wait(BEAT_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _alive(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < STALE_S
    except FileNotFoundError:
        return False


def help_with_shards(shards: Path, run: str, rank: int, world: int) -> int:
    """A rank other than 0, once every rank has embedded: write its share of the shards of each plan rank 0
    makes (``write_shards``) until rank 0 writes ``done-RUN``, or stops beating; how many it wrote."""
    done, started, seen, written = shards / f"done-{run}", time.monotonic(), set(), 0
    with beating(beat_file(shards, rank)):
        while not done.exists() and shards.parent.is_dir():
            try:  # now, not at the thread's next beat: rank 0 may be waiting on this rank
                beat_file(shards, rank).touch()
            except FileNotFoundError:  # no shards folder yet (or the job is published)
                pass
            if not _alive(beat_file(shards, 0)) and time.monotonic() - started > STALE_S:
                break
            for path in sorted(shards.glob("*.plan.json")):
                try:
                    plan = json.loads(path.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
                if plan["key"]["digest"] not in seen:
                    written += write_shards(shards, plan, rank, world)
                    seen.add(plan["key"]["digest"])
            time.sleep(0.2)
    return written


def finish_shards(shards: Path, plan: dict[str, Any], world: int) -> None:
    """Rank 0: its share of the shards, then each other one as its rank writes it, or here if that rank
    is not beating (gone, or never came)."""
    write_shards(shards, plan, 0, world)
    for number in range(plan["shards"]):
        while not shard_path(shards, plan, number).is_file():
            if number % world and _alive(beat_file(shards, number % world)):
                time.sleep(0.2)
                continue
            _write_shard(shards, plan, number)


# ------------------------------------------------------------------------------ merge


def merge_shards(
    shards: Path, plan: dict[str, Any], out: Path, base: Path | None = None, world: int = 1
) -> faiss.Index:
    """One index for ``out`` (``name.index``) with its lists in ``name.ivfdata`` beside it: ``base``'s lists
    (an on-disk index of the previous version, read, never written) then every shard's, in shard order.
    Shards missing (a process that failed) are written here first; with ``world`` processes, those of the
    others that are alive are waited for (``finish_shards``). Returns the merged index, open.

    The bytes are those of FAISS's ``OnDiskInvertedLists.merge_from_multiple`` (the list directory and
    ``.ivfdata``, bit for bit), without its memory: it writes through a map of the whole output and reads
    every shard through a map, so every page of both stays resident until the end (2x the lists, growing
    with N). Here the list sizes are summed first (each list's place in the output: FAISS's own
    ``set_all_lists_sizes``), then each source's lists are copied with ``pread`` / ``pwrite``, one list at a
    time: the pages go through the page cache, never into this process, whose memory is one list plus the
    directory whatever the number of shards."""
    finish_shards(shards, plan, world)
    # (index file, file of its lists, how to read its list directory without reading the lists)
    paths = [shard_path(shards, plan, i) for i in range(plan["shards"])]
    sources = [(path, path, faiss.IO_FLAG_MMAP) for path in paths]
    if base is not None:  # first, as merge_from_multiple put it: its lists are in the .ivfdata beside it
        sources.insert(0, (base, base.with_suffix(".ivfdata"), faiss.IO_FLAG_SKIP_IVF_DATA))
    merged = faiss.read_index(str(shards / f"{plan['modality']}.trained.index"))
    ivf = faiss.extract_index_ivf(merged)
    sizes = np.zeros(ivf.nlist, np.uint64)
    for index_file, _, flags in sources:  # one directory at a time: memory nlist, not nlist x shards
        sizes += _directory(index_file, flags, ivf.nlist, ivf.code_size)[0]
    data = out.with_suffix(".ivfdata")
    data.unlink(missing_ok=True)  # a merge cut short: its lists start over
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data))
    ondisk.set_all_lists_sizes(faiss.swig_ptr(sizes))  # list-contiguous: each list's codes, then its ids
    # the file at its full size, and the free slot merge_from_multiple leaves (the same .index bytes); mapped
    # by FAISS but not touched here: a map's pages count only once read or written through it
    with _no_c_stdout():  # FAISS prints "resizing FILE to N bytes" there, with C's printf
        ondisk.update_totsize(int((sizes * np.uint64(ivf.code_size + 8)).sum()))
    codes_at = np.array([ondisk.lists.at(j).offset for j in range(ivf.nlist)], np.int64)
    ids_at = codes_at + sizes.astype(np.int64) * ivf.code_size
    filled = np.zeros(ivf.nlist, np.int64)  # entries already copied into each list
    fd = os.open(data, os.O_WRONLY)
    try:
        for index_file, lists_file, flags in sources:
            n, capacity, offset = _directory(index_file, flags, ivf.nlist, ivf.code_size)
            src = os.open(lists_file, os.O_RDONLY)
            try:
                for j in np.flatnonzero(n):
                    size, cap = int(n[j]), int(capacity[j])
                    # a source list: its codes (capacity of them), then its ids
                    block = os.pread(src, cap * ivf.code_size + size * 8, int(offset[j]))
                    assert len(block) == cap * ivf.code_size + size * 8, f"{lists_file}: shorter than its lists"
                    done = int(filled[j])
                    _pwrite(fd, memoryview(block)[: size * ivf.code_size], int(codes_at[j]) + done * ivf.code_size)
                    _pwrite(fd, memoryview(block)[cap * ivf.code_size :], int(ids_at[j]) + done * 8)
                    filled[j] += size
            finally:
                os.close(src)
    finally:
        os.close(fd)
    assert (filled == sizes.astype(np.int64)).all()
    merged.ntotal = ivf.ntotal = int(sizes.sum())
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns the lists now
    # the caller writes ``out`` (after setting nprobe): it names the lists by the path written here, and
    # ``read_faiss`` finds them beside it wherever the version folder is moved
    return merged


@contextmanager
def _no_c_stdout() -> Iterator[None]:
    """What C code prints on standard output while the block runs goes nowhere (file descriptor 1 points at
    /dev/null, C's buffers flushed on both sides); mmlm's own output is on stderr meanwhile."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _directory(index_file: Path, flags: int, nlist: int, code_size: int) -> tuple[np.ndarray, ...]:
    """Each list's size, capacity and offset in its lists' file, from an index read without its lists:
    a shard's (``IO_FLAG_MMAP``: FAISS maps the file and only reads the sizes) or an on-disk index's."""
    index = faiss.read_index(str(index_file), flags | faiss.IO_FLAG_READ_ONLY)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and (lists.nlist, lists.code_size) == (nlist, code_size)
    entries = [lists.lists.at(j) for j in range(nlist)]
    return tuple(np.array([getattr(e, name) for e in entries], np.uint64) for name in ("size", "capacity", "offset"))


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:  # a write may be short (signals, huge blocks)
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def emptied(path: Path) -> faiss.Index:
    """A trained, empty copy of the index at ``path`` (on disk or not): an add's or a sync's shards start
    from it, so they keep the build's clusters and codebooks."""
    flags = faiss.IO_FLAG_SKIP_IVF_DATA if _is_ondisk_file(path) else 0
    index = faiss.read_index(str(path), flags)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index frees them (Python would too, leaving it a dangling pointer)
    index.ntotal = ivf.ntotal = 0
    return index


def _is_ondisk_file(path: Path) -> bool:
    return path.with_suffix(".ivfdata").is_file()


# ------------------------------------------------------------------------------ nprobe against a time target


QUERY_MS = 10.0  # the query-time target of the nprobe tuning (autofaiss's default: 10 ms)
RERANK_DEPTHS = (RERANK, 3 * RERANK, 10 * RERANK)  # candidates re-ranked per hit wanted, tried with each nprobe
TUNE_QUERIES = 100


def tune_nprobe(
    index: faiss.Index, vectors: Path, k: int = 10, target_ms: float = QUERY_MS, queries: int = TUNE_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The ``nprobe`` (a power of two, up to the number of lists) and re-ranking depth (``RERANK_DEPTHS``, for a
    lossy index) of the best recall@``k`` whose query, re-ranked as ``Index.search`` re-ranks, takes under
    ``target_ms``; sets the nprobe on ``index`` and returns both with that recall and time (``rerank`` goes
    into the manifest, where ``Index.search`` reads it). ``vectors``: the image embeddings (row = id). Queries: ``queries`` stored vectors
    plus noise (held out: no query is itself in the index), their true neighbours found by an exact pass
    over ``vectors`` in blocks."""
    stored = np.load(vectors, mmap_mode="r")
    n, dim = stored.shape
    rng = np.random.default_rng(seed)
    q = np.array(stored[np.sort(rng.choice(n, min(queries, n), replace=False))], dtype=np.float32)
    del stored
    q += rng.standard_normal(q.shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(dim))
    faiss.normalize_L2(q)
    truth = _exact(q, vectors, k)
    ivf = faiss.extract_index_ivf(index)
    tried: list[dict[str, Any]] = []
    for factor in RERANK_DEPTHS if is_lossy(index) else (1,):  # a PQ index is as good as its re-ranking is deep
        nprobe = 1
        while nprobe <= ivf.nlist:
            ivf.nprobe = nprobe
            ms, recall = _trial(index, q, truth, k * factor, vectors)
            if ms > target_ms:  # over the target only if a second pass says so too: one busy moment of the
                ms = min(ms, _trial(index, q, truth, k * factor, vectors)[0])  # machine must not decide it
            tried.append({"nprobe": nprobe, "rerank": factor, "recall": round(recall, 4), "ms": round(ms, 3)})
            if ms > target_ms or recall >= 0.999:
                break
            nprobe *= 2
    within = [t for t in tried if t["ms"] <= target_ms] or tried[:1]
    best = max(within, key=lambda t: (t["recall"], -t["ms"]))
    ivf.nprobe = best["nprobe"]
    return {"nprobe": best["nprobe"], "rerank": best["rerank"], f"recall@{k}": best["recall"], "query_ms": best["ms"],
            "target_ms": target_ms, "queries": len(q), "tried": tried}  # fmt: skip


def _trial(index: faiss.Index, q: np.ndarray, truth: np.ndarray, depth: int, vectors: Path) -> tuple[float, float]:
    """(median ms, mean recall@k) of the queries ``q`` one at a time, as ``Index.search`` answers them: the best
    ``depth`` candidates (``k`` = the width of ``truth``), re-ranked from the stored rows when more than ``k``."""
    k = truth.shape[1]
    seconds, recalls = [], []
    for query, true in zip(q, truth):
        start = time.perf_counter()
        _, found = index.search(query[None], depth)
        found = found[0][found[0] >= 0]
        if depth > k:  # rescored from the stored rows, read in file order
            found = np.sort(found)
            found = found[np.argsort(-(rows_at(vectors, found) @ query), kind="stable")]
        seconds.append(time.perf_counter() - start)
        recalls.append(len(set(found[:k].tolist()) & set(true.tolist())) / k)
    return float(np.median(seconds)) * 1000, float(np.mean(recalls))


def rows_at(path: Path, wanted: np.ndarray) -> np.ndarray:
    """The rows ``wanted`` (sorted) of an .npy as float32: only they are read."""
    return NpyRows(path)[wanted]


def _exact(q: np.ndarray, vectors: Path, k: int) -> np.ndarray:
    """The rows of each query's ``k`` nearest vectors, by an exact pass in blocks of ``BLOCK`` rows."""
    best_scores = np.full((len(q), k), -np.inf, np.float32)
    best_ids = np.full((len(q), k), -1, np.int64)
    n = np.load(vectors, mmap_mode="r").shape[0]
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        scores = q @ rows(vectors, a, b).T
        both_s = np.concatenate([best_scores, scores], 1)
        both_i = np.concatenate([best_ids, np.broadcast_to(np.arange(a, b), scores.shape)], 1)
        top = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
    return best_ids


# ------------------------------------------------------------------------------ one modality's FAISS index


def write_faiss(
    folder: Path, modality: str, ids: np.ndarray, options: Options, base: dict[str, Any] | None, base_files: Path | None,
    shards: Path, world: int = 1,
) -> dict[str, Any] | None:  # fmt: skip
    """``folder``'s FAISS index of ``modality``: the base version's (``base``: its manifest entry) plus the
    last ``len(ids)`` rows of its embeddings, or a new one over all of them; its manifest entry (None: no
    vectors). IVF indexes go on disk through shards in ``shards``; the others are built in memory."""
    vectors = folder / EMBEDDINGS[modality]
    n, dim = np.load(vectors, mmap_mode="r").shape
    out = folder / INDEXES[modality]
    entry: dict[str, Any] = {"file": INDEXES[modality]}
    if base is not None and base.get("ondisk"):  # append shards to the base's lists: nothing retrained
        assert base_files is not None
        plan = plan_shards(shards, modality, vectors, n - len(ids), ids, base["type"], None, options.shard_size,
                           trained=emptied(base_files / base["file"]))  # fmt: skip
        index = merge_shards(shards, plan, out, base=base_files / base["file"], world=world)
        entry = {**base, "ntotal": int(index.ntotal)}
    elif base is not None:  # an in-memory index: read whole, the new vectors added
        assert base_files is not None
        index = faiss.read_index(str(base_files / base["file"]))
        _add_rows(index, vectors, n - len(ids), ids)
        entry = {**base, "ntotal": int(index.ntotal)}
    elif n == 0:
        return None
    else:
        spec, reason = options.index_type, "given by --index_type"
        if spec == "auto":
            spec, reason = choose_index(n, dim, parse_size(options.max_index_memory))
        entry |= {"type": spec, "choice": {"reason": reason, "max_index_memory": options.max_index_memory,
                                           "max_train_memory": options.max_train_memory}}  # fmt: skip
        train_memory = parse_size(options.max_train_memory)
        if is_ondisk_type(spec, dim):
            plan = plan_shards(shards, modality, vectors, 0, ids, spec, options.nprobe, options.shard_size,
                               max_train_memory=train_memory)  # fmt: skip
            index = merge_shards(shards, plan, out, world=world)
            entry["ondisk"] = out.with_suffix(".ivfdata").name
            if modality == "image" and options.nprobe is None:
                entry["tuning"] = tune_nprobe(index, vectors, target_ms=options.query_ms)
                entry["rerank"] = entry["tuning"]["rerank"]  # Index.search's default depth for this index
        else:
            mapped = np.load(vectors, mmap_mode="r")
            index, _ = faiss_index(mapped, spec, options.nprobe, train_memory)
            del mapped
            _add_rows(index, vectors, 0, ids)
        entry["ntotal"] = int(index.ntotal)
        lists = faiss.try_extract_index_ivf(index)
        if lists is not None:  # the vectors its training took (``faiss_index``)
            entry["choice"]["train_vectors"] = train_size(n, dim, lists.nlist, train_memory)
    ivf = faiss.try_extract_index_ivf(index)
    entry["nprobe"] = int(ivf.nprobe) if ivf is not None else None
    faiss.write_index(index, str(out))  # on disk: the list directory; the lists are in the .ivfdata already
    return entry


def _add_rows(index: faiss.Index, vectors: Path, start: int, ids: np.ndarray) -> None:
    for a in range(0, len(ids), BLOCK):  # bounded memory: the vectors are float32 here, not their dtype
        b = min(a + BLOCK, len(ids))
        index.add_with_ids(rows(vectors, start + a, start + b), ids[a:b])


def refill(folder: Path, modality: str, ids: np.ndarray, base: dict[str, Any], base_files: Path) -> dict[str, Any]:
    """``folder``'s index of ``modality``: the base version's, emptied (its training kept: the same cells as
    the build's) and refilled with every row of ``folder``'s embeddings (``index sync`` renumbers the ids);
    an on-disk one through shards, beside ``folder`` and removed once merged. Its manifest entry."""
    vectors, out = folder / EMBEDDINGS[modality], folder / INDEXES[modality]
    if base.get("ondisk"):
        shards = folder.with_name(folder.name + ".shards")
        try:
            trained = emptied(base_files / base["file"])
            plan = plan_shards(shards, modality, vectors, 0, ids, base["type"], None, SHARD_ROWS, trained=trained)
            index = merge_shards(shards, plan, out)
        finally:
            shutil.rmtree(shards, ignore_errors=True)
    else:
        index = faiss.read_index(str(base_files / base["file"]))
        index.reset()
        _add_rows(index, vectors, 0, ids)
    faiss.write_index(index, str(out))
    return {**base, "ntotal": int(index.ntotal)}
