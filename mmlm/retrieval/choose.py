"""Which FAISS index a collection gets, and its training: ``auto`` by count (``auto_index_type``), under a memory
budget as autofaiss chooses (``choose_index``), any factory string checked before any embedding
(``check_index_type``), and the empty trained index (``faiss_index``) on a sample the training memory allows
(``train_size``).
"""

from __future__ import annotations

import math

import faiss
import numpy as np

AUTO_EXACT_LIMIT = 1_000_000  # index_type auto: exact search below this many vectors, IVF-PQ from here
TRAIN_PER_CLUSTER = 100  # training vectors per IVF cluster (autofaiss's choice; FAISS wants 39 to 256)
MIN_TRAIN = 10_000  # and at least this many: 39 per centroid of an 8-bit PQ codebook
MIN_PER_CLUSTER = 39  # the fewest FAISS's k-means takes per cluster without warning: a memory cap stops here


def auto_index_type(n: int, dim: int) -> str:
    """Exact below ``AUTO_EXACT_LIMIT`` vectors; past it IVF-PQ as autofaiss sizes it: about 4 sqrt(n)
    clusters (a power of two) and codes of dim / 8 bytes (1/32 of float32)."""
    if n < AUTO_EXACT_LIMIT:
        return "Flat"
    clusters = 2 ** round(math.log2(4 * math.sqrt(n)))
    m = max(d for d in range(1, dim // 8 + 1) if dim % d == 0)
    return f"IVF{clusters},PQ{m}"


HNSW_LINKS = 32  # HNSW32: 2 x 32 int32 links a vector on its base level
PQ_BYTES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # PQ code sizes tried, largest (most accurate) first


def ivf_lists(n: int) -> int:
    """Clusters of an IVF over ``n`` vectors: the power of two nearest 4 sqrt(n) (autofaiss's choice), at
    most n / 39 (FAISS wants 39 training vectors a cluster)."""
    return max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(max(1, n // 39)))))


def choose_index(n: int, dim: int, max_memory: int | None = None) -> tuple[str, str]:
    """The index type for ``n`` ``dim``-d vectors whose index may take ``max_memory`` bytes (the size of
    its data: what serving it resident would take), and why, the way autofaiss chooses: exact search
    while it fits (and below ``AUTO_EXACT_LIMIT`` vectors, past which it is slow), else HNSW while its
    vectors and links fit, else an IVF over exact vectors, else IVF-PQ with the largest codes that fit.
    Without a budget: ``auto_index_type``'s choice."""
    if max_memory is None:
        spec = auto_index_type(n, dim)
        return spec, f"{n:,} vectors, no memory budget: {'exact' if spec == 'Flat' else 'IVF-PQ'} by count"
    budget = f"{_size(max_memory)} budget"
    flat = n * dim * 4
    if n < 1000 or (flat <= max_memory and n < AUTO_EXACT_LIMIT):
        return "Flat", f"{n:,} vectors, exact search takes {_size(flat)} of the {budget}"
    hnsw = n * (dim * 4 + 2 * HNSW_LINKS * 4)
    if hnsw <= max_memory and n < 10 * AUTO_EXACT_LIMIT or n < 10_000:  # too few to train a PQ: HNSW
        return f"HNSW{HNSW_LINKS}", f"{n:,} vectors, HNSW takes {_size(hnsw)} of the {budget}"
    lists = ivf_lists(n)
    quantizer = lists * dim * 4
    ivf_flat = n * (dim * 4 + 8) + quantizer
    if ivf_flat <= max_memory:
        return f"IVF{lists},Flat", f"{n:,} vectors, IVF-Flat takes {_size(ivf_flat)} of the {budget}"
    for m in (m for m in PQ_BYTES if m < dim and dim % m == 0):
        size = n * (m + 8) + quantizer  # codes and int64 ids in the lists, and the coarse centroids
        if size <= max_memory:
            return f"IVF{lists},PQ{m}", f"{n:,} vectors, IVF-PQ{m} takes {_size(size)} of the {budget}"
    raise ValueError(f"--max_index_memory {_size(max_memory)}: {n:,} {dim}-d vectors need at least "
                     f"{_size(n * (4 + 8) + quantizer)} (IVF-PQ with 4-byte codes)")  # fmt: skip


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def check_index_type(index_type: str, dim: int, n: int | None = None) -> None:
    """A ValueError now, before any embedding, for a string FAISS's index_factory cannot read, or for
    more IVF clusters than ``n`` vectors can train."""
    if index_type == "auto":
        return
    try:
        index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].split(": ", 1)[-1]
        raise ValueError(
            f"--index_type {index_type!r}: not a FAISS index_factory string for {dim}-d vectors ({reason}); "
            "e.g. Flat, HNSW32, IVF1024,Flat, IVF4096,PQ64, or auto"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    if n is not None and ivf is not None and n < ivf.nlist:
        raise ValueError(f"--index_type {index_type}: {n} vectors cannot train {ivf.nlist} clusters; "
                         f"use IVF{2 ** int(math.log2(max(1, n // 39)))},... or Flat")  # fmt: skip


def faiss_index(
    vectors: np.ndarray, index_type: str, nprobe: int | None = None, max_train_memory: int | None = None
) -> tuple[faiss.Index, str]:
    """An empty inner-product index for ``vectors``, trained if its kind needs it on a fixed random sample
    (``train_size``), and the factory string it was made from. It takes ``add_with_ids``: IVF indexes store
    ids themselves, any other kind is wrapped in ``IndexIDMap``."""
    n, dim = vectors.shape
    spec = auto_index_type(n, dim) if index_type == "auto" else index_type
    check_index_type(spec, dim, n)
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        index = faiss.IndexIDMap(index)
    elif isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        # index_factory turns on polysemous training, which only Hamming-thresholded search uses, and
        # which takes minutes where training the codes takes seconds
        faiss.downcast_index(ivf).do_polysemous_training = False
    if not index.is_trained:
        size = train_size(n, dim, ivf.nlist if ivf is not None else 1, max_train_memory)
        sample = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
        index.train(np.asarray(vectors[sample], dtype=np.float32))
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, nprobe or default_nprobe(ivf.nlist))
    return index, spec


def train_size(n: int, dim: int, clusters: int, max_memory: int | None = None) -> int:
    """Vectors the training sample takes of ``n``: ``TRAIN_PER_CLUSTER`` per cluster, at least ``MIN_TRAIN``,
    and, under ``max_memory`` (``--max_train_memory``), no more float32 vectors than fit in it (as autofaiss
    cuts its sample to the memory available), but never under FAISS's ``MIN_PER_CLUSTER`` per cluster: a
    budget that small is refused in one line."""
    size = min(n, max(TRAIN_PER_CLUSTER * clusters, MIN_TRAIN))
    if max_memory is None:
        return size
    fits = max_memory // (dim * 4)
    least = min(n, MIN_PER_CLUSTER * clusters)
    if fits < least:
        raise ValueError(f"--max_train_memory {_size(max_memory)}: training {clusters:,} clusters takes at least "
                         f"{least:,} {dim}-d vectors ({_size(least * dim * 4)}); give more, or fewer clusters")  # fmt: skip
    return min(size, fits)


def default_nprobe(clusters: int) -> int:
    """Clusters searched per query: 64, or 1/64 of them if more (``scripts/bench.py --only query``: recall@10
    of IVF-PQ with reranking ~0.95 at 64 on clustered 512-d vectors)."""
    return min(clusters, max(64, clusters // 64))


def is_lossy(index: faiss.Index) -> bool:
    """Whether ``index`` scores compressed codes (PQ, SQ, ...) rather than the vectors themselves."""
    inner = faiss.try_extract_index_ivf(index) or faiss.downcast_index(getattr(index, "index", index))
    return not isinstance(faiss.downcast_index(inner), (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat))
