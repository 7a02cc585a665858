"""Fixtures of the index tests: one compute thread, and an index of the bundled photographs built once."""

from __future__ import annotations

import faiss
import pytest
import torch

from mmlm.retrieval import Index, build_index


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny model gains nothing from two, and on a busy 2-core machine two
    threads that wait for each other make each matmul ~100x slower."""
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[1])


@pytest.fixture(scope="session")
def assets_index(tmp_path_factory) -> Index:
    """clip-tiny (seed 0) over the 21 bundled photographs and their 49 captions; tests only read it."""
    return build_index("clip-tiny", "assets", tmp_path_factory.mktemp("ix") / "assets", batch_size=8,
                       accelerator="cpu")  # fmt: skip
