"""``Index.select`` (where on the manifest's columns) and ``Index.search(ids=..., min_score=...)``: the selection
goes into FAISS, so k matching items come back whenever k match; checked against numpy brute force over the
matching rows, for a Flat and an IVF index, on both sides (images; captions, whose FAISS ids repeat per item)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmlm.retrieval import Index, build_index

ITEMS = 48  # 12 per year: a where on one year matches exactly 12
YEARS = (2000, 2001, 2002, 2003)


def filtered_collection(folder: Path) -> Path:
    """48 distinct noise images in ``a/`` and ``b/``, a CSV manifest with a ``year`` column (text, as CSV is)
    and one or two captions per image."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(ITEMS):
        rel = f"{'ab'[i % 2]}/{i:02d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / rel)
        year = YEARS[i % 4]
        rows.append({"filepath": rel, "title": f"picture {i} of noise", "year": year})
        if i % 3 == 0:
            rows.append({"filepath": rel, "title": f"another view number {i}", "year": year})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "title", "year"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def build(manifest: Path, out: Path, index_type: str) -> Index:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_index("clip-tiny", str(manifest), out, batch_size=48, accelerator="cpu", index_type=index_type,
                           nprobe=4)  # fmt: skip  # nprobe = every list of IVF4: exact, comparable to brute force
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Index]:
    root = tmp_path_factory.mktemp("filters")
    manifest = filtered_collection(root / "data")
    out = {kind: build(manifest, root / kind, kind) for kind in ("Flat", "IVF4,Flat")}
    yield out
    for index in out.values():
        index.close()


def brute_force(
    index: Index, query: np.ndarray, modality: str, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of ``ids`` by cosine (an item's best caption on the text side), from the stored embeddings."""
    query = query / np.linalg.norm(query)
    if modality == "image":
        scores = np.asarray(index.embeddings("image"), dtype=np.float32)[ids] @ query
    else:
        per_text = np.asarray(index.embeddings("text"), dtype=np.float32) @ query
        scores = np.array([per_text[index.text_ids == i].max() for i in ids])
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


def test_select_where_grammar(built):
    index = built["Flat"]
    years = np.array(YEARS)[np.arange(ITEMS) % 4]
    assert index.select(None).tolist() == list(range(ITEMS))
    assert index.select({"year": 2001}).tolist() == np.flatnonzero(years == 2001).tolist()  # a number meets CSV text
    assert index.select({"year": "2001"}).tolist() == np.flatnonzero(years == 2001).tolist()
    assert (
        index.select({"year": {"gte": 2001, "lt": 2003}}).tolist()
        == np.flatnonzero((years >= 2001) & (years < 2003)).tolist()
    )
    assert (
        index.select({"year": {"in": [2000, "2003"]}}).tolist()
        == np.flatnonzero((years == 2000) | (years == 2003)).tolist()
    )
    assert index.select({"filepath": {"prefix": "b/"}}).tolist() == list(range(1, ITEMS, 2))
    assert index.select({"filepath": {"prefix": "b/"}, "year": 2001}).tolist() == np.flatnonzero(years == 2001).tolist()
    assert index.select({"filepath": {"prefix": "a/"}, "year": 2001}).tolist() == []
    assert index.select({"filepath": {"prefix": "%"}}).tolist() == []  # a LIKE wildcard means itself
    assert index.select({"year": 1999}).tolist() == []


@pytest.mark.parametrize(("where", "message"), [
    ({"colour": 1}, "no column 'colour'"),
    ({"year": {"between": [1, 2]}}, "unknown operator 'between'"),
    ({"year": {"in": []}}, "'in' takes a non-empty list"),
    ({"year": {"gte": [1]}}, "give a text or a finite number"),
    ({"year": {"gte": float("nan")}}, "give a text or a finite number"),
    ({"filepath": {"prefix": 3}}, "'prefix' takes a non-empty text"),
    ({"year": {}}, "an empty condition"),
    ({'year" = 1 OR "1': 1}, "no column"),
    ({"year": {"in": list(range(1001))}}, "the limit is 1000"),
])  # fmt: skip
def test_select_refuses_bad_where(built, where, message):
    with pytest.raises(ValueError, match=message):
        built["Flat"].select(where)


@pytest.fixture(params=["exact", "faiss"])
def path(request, monkeypatch):
    """Both ways a filtered search goes: a narrow selection scored from the stored rows, or a wide one
    (EXACT_SELECTION lowered to 0) through FAISS's ID selector."""
    if request.param == "faiss":
        monkeypatch.setattr("mmlm.retrieval.index.EXACT_SELECTION", 0)
    return request.param


@pytest.fixture
def one_probe(built):
    """The IVF index probing 1 of its 4 lists, as a big IVF probes few of many: a filter's matches are
    mostly in lists it does not probe."""
    import faiss

    ivf = faiss.extract_index_ivf(built["IVF4,Flat"].faiss("image"))
    ivf_text = faiss.extract_index_ivf(built["IVF4,Flat"].faiss("text"))
    ivf.nprobe = ivf_text.nprobe = 1
    yield built["IVF4,Flat"]
    ivf.nprobe = ivf_text.nprobe = 4


@pytest.mark.parametrize("kind", ["Flat", "IVF4,Flat", "IVF4,Flat nprobe=1"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_filtered_search_returns_k_matching_items(request, built, path, kind, modality):
    index = request.getfixturevalue("one_probe") if kind.endswith("nprobe=1") else built[kind]
    assert index.manifest["indexes"][modality]["type"] == kind.split()[0]
    selected = index.select({"year": 2002})
    assert len(selected) == 12
    queries = np.asarray(index.embeddings("image")[[0, 5, 46]], dtype=np.float32)  # none of them from 2002
    ids, scores = index.search(queries, 10, modality, ids=selected)
    for query, row_ids, row_scores in zip(queries, ids, scores):
        expected_ids, expected_scores = brute_force(index, query, modality, selected, 10)
        assert row_ids.tolist() == expected_ids.tolist()
        np.testing.assert_allclose(row_scores, expected_scores, atol=1e-5)
    # unfiltered, the top 10 hold items of other years: a filter after the top k would have returned fewer
    plain, _ = index.search(queries, 10, modality)
    assert any(np.isin(row, selected).sum() < 10 for row in plain)


def test_fewer_matches_than_k_pad_and_min_score_drops_exactly_the_hits_below(built):
    index = built["Flat"]
    query = np.asarray(index.embeddings("image")[7], dtype=np.float32)
    few = index.select({"year": 2003, "filepath": {"prefix": "b/1"}})  # 11, 15 and 19
    ids, scores = index.search(query, 10, ids=few)
    assert ids[0, : len(few)].tolist() == brute_force(index, query, "image", few, 10)[0].tolist()
    assert (ids[0, len(few) :] == -1).all() and np.isneginf(scores[0, len(few) :]).all()
    assert index.search(query, 5, ids=np.array([], dtype=np.int64))[0].tolist() == [[-1] * 5]

    all_ids, all_scores = index.search(query, 20)
    threshold = float(all_scores[0, 6] + all_scores[0, 7]) / 2  # between the 7th and 8th hit
    kept_ids, kept_scores = index.search(query, 20, min_score=threshold)
    assert kept_ids[0, :7].tolist() == all_ids[0, :7].tolist() and (kept_ids[0, 7:] == -1).all()
    assert (kept_scores[0, :7] >= threshold).all()


@pytest.mark.parametrize("kind", ["Flat", "IVF8,Flat", "HNSW8", "IVF8,PQ4"])
def test_search_parameters_keep_the_selection_and_the_index_settings(kind):
    """Every kind an index may be built as: hits only from the selection, and an IVF's nprobe / HNSW's
    efSearch kept (parameters replace them, and FAISS's default nprobe is 1)."""
    import faiss

    from mmlm.retrieval.choose import faiss_index
    from mmlm.retrieval.index import search_parameters

    vectors = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    faiss.normalize_L2(vectors)
    index, _ = faiss_index(vectors, kind, nprobe=8)
    index.add_with_ids(vectors, np.arange(len(vectors)))
    selected = np.arange(3, len(vectors), 5)
    params = search_parameters(index, faiss.IDSelectorBatch(selected))
    if "IVF" in kind:
        assert params.nprobe == 8
    if "HNSW" in kind:
        assert params.efSearch == faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch
    _, ids = index.search(vectors[:4], 10, params=params)
    assert np.isin(ids, selected).all()
    if kind == "IVF8,Flat":  # every list probed: exact over the selection
        exact = np.argsort(-(vectors[selected] @ vectors[:4].T), axis=0, kind="stable")[:10].T
        assert ids.tolist() == selected[exact].tolist()
