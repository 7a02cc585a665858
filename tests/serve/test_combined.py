"""Combined queries (weighted ``terms``), ``where`` filters and ``min_score`` through ``POST /search`` in this
process, checked against vectors built by hand from ``/embed`` and numpy brute force; ``parse_query`` (rclip's
query syntax of ``mmlm search``)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from _inprocess import serving
from _ranking import ATOL, b64, brute_force, by_item, item_of

from mmlm.paths import ASSETS
from mmlm.retrieval import build_index
from mmlm.retrieval.client import parse_query

YEAR = "2020"  # 12 of the 21 photographs have it, the other 9 "2021"


@pytest.fixture(scope="module")
def years(tmp_path_factory):
    """The bundled photographs and captions with a ``year`` column: 12 items of 2020, 9 of 2021."""
    root = tmp_path_factory.mktemp("years")
    shutil.copytree(ASSETS / "images", root / "images")
    with open(ASSETS / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    order = list(dict.fromkeys(r["filepath"] for r in rows))
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "title", "year"])
        writer.writeheader()
        writer.writerows({**r, "year": YEAR if order.index(r["filepath"]) % 7 < 4 else "2021"} for r in rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        index = build_index("clip-tiny", str(root / "manifest.csv"), root / "index", batch_size=32, accelerator="cpu")
    finally:
        torch.set_num_threads(threads)
    index.close()
    return root / "index"


@pytest.fixture(scope="module")
def api(indexes, years):
    with serving({"assets": str(indexes.assets.folder), "years": str(years)}) as a:
        yield a


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_combined_query_is_the_normalised_weighted_sum_of_its_terms(api, indexes):
    stored = np.asarray(indexes.assets.embeddings("image"), dtype=np.float32)
    coffee = b64(ASSETS / "images" / "coffee.jpg")
    terms = [{"text": "an astronaut in an orange suit", "weight": 2}, {"image": coffee},
             {"item": 3, "weight": 0.5}, {"text": "a rocket", "weight": -1}, {"embedding": (stored[5] * 3).tolist(),
             "weight": 0.25}]  # fmt: skip
    embed = lambda body: unit(api.json("/embed", {"index": "assets", **body})["embedding"])  # noqa: E731
    parts = [embed({"text": terms[0]["text"]}), embed({"image": coffee}), unit(stored[3]), embed({"text": "a rocket"}),
             unit(stored[5])]  # fmt: skip
    by_hand = unit(sum(t.get("weight", 1) * p for t, p in zip(terms, parts))).astype(np.float32)

    combined = api.json("/search", {"terms": terms, "k": 21, "index": "assets"})["hits"]
    plain = api.json("/search", {"embedding": by_hand.tolist(), "k": 21, "index": "assets"})["hits"]
    ids, scores = brute_force(stored, by_hand, 21)
    assert [h["id"] for h in combined] == [h["id"] for h in plain] == ids.tolist()
    np.testing.assert_allclose([h["score"] for h in combined], scores, atol=ATOL)
    np.testing.assert_allclose([h["score"] for h in combined], [h["score"] for h in plain], atol=ATOL)

    text_side = api.json("/search", {"terms": terms, "k": 21, "index": "assets", "modality": "text"})["hits"]
    ids, scores = by_item(indexes.assets, by_hand)
    assert [h["id"] for h in text_side] == ids[:21].tolist()
    np.testing.assert_allclose([h["score"] for h in text_side], scores[:21], atol=ATOL)


def test_more_like_this_item_is_one_item_term(api, indexes):
    rocket = item_of("rocket.jpg")
    hits = api.json("/search", {"terms": [{"item": rocket}], "k": 5, "index": "assets"})["hits"]
    ids, scores = brute_force(
        np.asarray(indexes.assets.embeddings("image")), indexes.assets.embeddings("image")[rocket], 5
    )
    assert [h["id"] for h in hits] == ids.tolist() and hits[0]["id"] == rocket
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=ATOL)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_where_returns_k_matching_hits_equal_to_brute_force_over_the_matching_rows(api, years, modality):
    from mmlm.retrieval import Index

    with Index.open(years) as index:
        rows = index.metadata(np.arange(len(index)))
        matching = np.array([r["id"] for r in rows if r["year"] == YEAR])
        assert len(matching) == 12
        query = "a red rocket on the launch pad"
        vector = np.array(api.json("/embed", {"index": "years", "text": query})["embedding"])
        if modality == "image":
            ids, scores = brute_force(np.asarray(index.embeddings("image"))[matching], vector, 10)
            ids = matching[ids]
        else:
            ids, scores = by_item(index, vector)
            keep = np.isin(ids, matching)
            ids, scores = ids[keep][:10], scores[keep][:10]
    body = {"text": query, "k": 10, "index": "years", "modality": modality, "where": {"year": {"in": [int(YEAR)]}}}
    hits = api.json("/search", body)["hits"]
    assert len(hits) == 10 and all(h["metadata"]["year"] == YEAR for h in hits)
    assert [h["id"] for h in hits] == ids.tolist()
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=ATOL)
    # paging goes on inside the selection: the last 2 of the 12
    rest = api.json("/search", {**body, "offset": 10})["hits"]
    assert len(rest) == 2 and not {h["id"] for h in rest} & {h["id"] for h in hits}


def test_min_score_drops_exactly_the_hits_below_it_and_combines_with_where_and_terms(api):
    body = {"terms": [{"text": "a cup of coffee", "weight": 2}, {"text": "a rocket", "weight": -1}], "k": 21,
            "index": "years"}  # fmt: skip
    everything = api.json("/search", body)["hits"]
    threshold = (everything[5]["score"] + everything[6]["score"]) / 2
    kept = api.json("/search", {**body, "min_score": threshold})["hits"]
    assert [h["id"] for h in kept] == [h["id"] for h in everything[:6]]
    filtered = api.json("/search", {**body, "min_score": threshold, "where": {"year": YEAR}})["hits"]
    assert [h["id"] for h in filtered] == [h["id"] for h in everything[:6] if h["metadata"]["year"] == YEAR]


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"terms": []}, 422, "give 1 to 16 terms"),
    ({"terms": [{"text": "a cat"}] * 17}, 422, "give 1 to 16 terms, not 17"),
    ({"terms": [{"text": "a cat", "weight": 0}, {"item": 1, "weight": 0}]}, 422, "every weight is 0"),
    ({"terms": [{"text": "a cat"}, {"text": "a cat", "weight": -1}]}, 422, "cancel out"),
    ({"terms": [{"text": "a cat", "item": 2}]}, 422, "terms[0]: give exactly one of text, image, embedding, item"),
    ({"terms": [{"text": "a cat"}, {"text": " "}]}, 422, "terms[1]: text: empty"),
    ({"terms": [{"item": 99}]}, 404, "terms[0]: index 'years' has no item 99"),
    ({"terms": [{"embedding": [1.0, 2.0]}]}, 422, "terms[0]: embedding of length 2"),
    ({"terms": [{"text": "a cat"}], "text": "a dog"}, 422, "give terms or one of text"),
    ({"text": "a cat", "where": {"colour": "red"}}, 422, "no column 'colour'"),
    ({"text": "a cat", "where": {"year": {"between": [1, 2]}}}, 422, "unknown operator 'between'"),
    ({"text": "a cat", "where": {"filepath": {"prefix": ""}}}, 422, "'prefix' takes a non-empty text"),
    ({"text": "a cat", "where": {"year": {"in": "2020"}}}, 422, "'in' takes a non-empty list"),
])  # fmt: skip
def test_bad_terms_and_filters_are_refused_naming_the_problem(api, body, status, message):
    code, answer = api.post("/search", {"index": "years", **body})
    assert code == status and message in answer["detail"], (code, answer)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"index": "years", "terms": [{"text": "a cat", "weight": NaN}]}', "terms[0]: weight nan: give a finite number"),
    (b'{"index": "years", "text": "a cat", "min_score": Infinity}', "min_score inf: give a finite number"),
])  # fmt: skip
def test_nan_weights_and_thresholds_are_refused(api, body, message):
    code, answer = api.post("/search", body)
    assert code == 422 and answer["detail"] == message, answer


def test_unknown_term_fields_are_refused(api):
    code, answer = api.post("/search", {"index": "years", "terms": [{"text": "a cat", "colour": 1}]})
    assert code == 422 and answer["detail"][0]["loc"] == ["body", "terms", 0, "colour"], answer


def test_empty_selection_answers_no_hits(api):
    assert api.json("/search", {"text": "a cat", "index": "years", "where": {"year": 1999}})["hits"] == []


def test_parse_query_reads_rclips_syntax():
    files = {"./pool.jpg", "./swimming pool.jpg", "/photos/cat.png"}.__contains__
    assert parse_query('"2:golden retriever" + ./pool.jpg - fruit', files) == [
        {"text": "golden retriever", "weight": 2.0}, {"image": "./pool.jpg", "weight": 1.0},
        {"text": "fruit", "weight": -1.0}]  # fmt: skip
    assert parse_query("horse + stripes", files) == [
        {"text": "horse", "weight": 1.0},
        {"text": "stripes", "weight": 1.0},
    ]
    assert parse_query('"./swimming pool.jpg" + night', files)[0] == {"image": "./swimming pool.jpg", "weight": 1.0}
    assert parse_query("0.5:/photos/cat.png - 2.:snow", files) == [{"image": "/photos/cat.png", "weight": 0.5},
                                                                 {"text": "snow", "weight": -2.0}]  # fmt: skip
    assert parse_query('.5:"a cat"', files) == [{"text": "a cat", "weight": 0.5}]
    assert parse_query("a t-shirt -red", files) == [{"text": "a t-shirt -red", "weight": 1.0}]  # no lone sign
    assert parse_query("- fruit", files) == [{"text": "fruit", "weight": -1.0}]
    assert parse_query("./missing.jpg", files) == [{"text": "./missing.jpg", "weight": 1.0}]  # no such file: text
    assert parse_query("2:", files) == [{"text": "2:", "weight": 1.0}]  # a weight needs a term: text, as in rclip
    assert parse_query("#12 - 0.5:#3 + #x", files) == [{"item": 12, "weight": 1.0}, {"item": 3, "weight": -0.5},
                                                       {"text": "#x", "weight": 1.0}]  # fmt: skip
    for bad in ("apple -", "cat + + dog", "+", ""):
        with pytest.raises(ValueError, match="an empty term"):
            parse_query(bad, files)


def test_search_command_sends_terms_where_and_min_score(api, monkeypatch, tmp_path, capsys):
    """``mmlm search``'s body, answered by the app in this process (the client's HTTP call routed to it)."""
    from mmlm.retrieval.client import Client
    from mmlm.retrieval.serve import search

    def call(self, method: str, path: str, body: dict | None = None, raw: bool = False):
        response = api.client.request(method, "/" + path, json={k: v for k, v in (body or {}).items() if v is not None})
        assert response.status_code == 200, response.text
        return response.json()

    monkeypatch.setattr(Client, "_call", call)
    shutil.copy(ASSETS / "images" / "coffee.jpg", tmp_path / "cup.jpg")
    monkeypatch.chdir(tmp_path)
    hits = search("http://127.0.0.1:9", "2:a cup of coffee + ./cup.jpg - a rocket", k=5, index="years",
                  where='{"year": {"gte": 2020, "lt": 2021}}', min_score=-1.0, output="json")  # fmt: skip
    terms = [{"text": "a cup of coffee", "weight": 2}, {"image": b64(tmp_path / "cup.jpg")},
             {"text": "a rocket", "weight": -1}]  # fmt: skip
    expected = api.json("/search", {"terms": terms, "k": 5, "index": "years", "where": {"year": YEAR}})["hits"]
    assert [h["id"] for h in hits] == [h["id"] for h in expected] and len(hits) == 5
    assert all(h["metadata"]["year"] == YEAR for h in hits)
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == [h["id"] for h in hits]
    with pytest.raises(ValueError, match="--where '{year': not JSON"):
        search("http://127.0.0.1:9", "a cat", where="{year")
