"""The reference merge of on-disk lists, FAISS's own (``OnDiskInvertedLists.merge_from_multiple``): what
``mmlm.retrieval.ondisk.merge_shards`` did before it copied the lists itself, and must still write bit for
bit. A module of its own (not a test file) so that a test's subprocess imports it without torch."""

from __future__ import annotations

from pathlib import Path

import faiss

from mmlm.retrieval.index import read_faiss
from mmlm.retrieval.ondisk import shard_path


def merge_from_multiple(shards: Path, plan: dict, out: Path, base: Path | None = None) -> faiss.Index:
    """The reference: the merge as FAISS writes it (``OnDiskInvertedLists.merge_from_multiple``, through a map
    of every shard and of the output; what ``merge_shards`` did before it copied the lists itself)."""
    inputs = [faiss.read_index(str(shard_path(shards, plan, i)), faiss.IO_FLAG_MMAP) for i in range(plan["shards"])]
    if base is not None:
        inputs.insert(0, read_faiss(base, ondisk=True))
    merged = faiss.read_index(str(shards / f"{plan['modality']}.trained.index"))
    ivf = faiss.extract_index_ivf(merged)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(out.with_suffix(".ivfdata")))
    pointers = faiss.InvertedListsPtrVector()
    for index in inputs:
        pointers.push_back(faiss.extract_index_ivf(index).invlists)
    merged.ntotal = ivf.ntotal = ondisk.merge_from_multiple(pointers.data(), pointers.size(), False, False)
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()
    return merged
