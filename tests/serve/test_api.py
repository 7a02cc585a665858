"""`mmlm serve`'s own routes on a real server process: every search answer checked against numpy
brute force over the index's stored embeddings, with queries embedded by the model in this process."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmlm.data import image_transform
from mmlm.paths import ASSETS
from mmlm.retrieval import Client
from mmlm.retrieval.client import ApiError

pytestmark = [pytest.mark.server, pytest.mark.slow]

ATOL = 1e-5  # float32 forward passes of one query vs a batch of them


def item_of(name: str) -> int:
    """The id of a bundled photograph: its place in captions.csv."""
    with open(ASSETS / "captions.csv") as f:
        return list(dict.fromkeys(line.split(",")[0] for line in f.read().splitlines()[1:])).index(f"images/{name}")


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def by_item(index, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items ranked by their best caption: what a search on the text side must return."""
    scores = index.embeddings("text") @ (query / np.linalg.norm(query))
    best: dict[int, float] = {}
    for item, score in zip(index.text_ids.tolist(), scores.tolist()):
        best[item] = max(best.get(item, -2.0), score)
    order = sorted(best, key=lambda i: -best[i])
    return np.array(order), np.array([best[i] for i in order])


def metric(server, name: str, **labels: str) -> float:
    _, text = server.get("/metrics")
    return sum(s.value for family in text_string_to_metric_families(text.decode()) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


def test_text_query_finds_the_images_numpy_ranks_first(server, indexes, reference):
    query = "an astronaut in an orange suit"
    answer = server.json("/search", {"text": query, "k": 21, "index": "assets"})
    ids, scores = brute_force(indexes.assets.embeddings("image"), reference.text([query])[0], 21)
    assert [h["id"] for h in answer["hits"]] == ids.tolist()
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], scores, atol=ATOL)
    paths = list(reference.items)
    for hit in answer["hits"]:  # metadata: the manifest's row and every caption of the item
        assert hit["metadata"]["filepath"] == paths[hit["id"]]
        assert hit["metadata"]["captions"] == reference.items[paths[hit["id"]]]
    embedded = server.json("/embed", {"text": query})
    np.testing.assert_allclose(embedded["embedding"], reference.text([query])[0], atol=ATOL)
    assert embedded["dim"] == 32 and embedded["index"] == "assets"


def test_every_photo_finds_itself_first(server, indexes, reference):
    paths = list(reference.items)
    transform = image_transform(reference.model.cfg.vision, train=False)
    with ThreadPoolExecutor(8) as pool:  # at once: they share batches in the server
        answers = list(pool.map(lambda p: server.json("/search", {"image": b64(ASSETS / p), "k": 3}), paths))
    for item, answer in enumerate(answers):
        assert answer["hits"][0]["id"] == item
        assert answer["hits"][0]["score"] == pytest.approx(1.0, abs=ATOL)
        assert answer["hits"][1]["score"] < 1.0 - 1e-4
    with torch.no_grad():
        own = reference.model.encode_image(transform(Image.open(ASSETS / paths[4]).convert("RGB"))[None])[0].numpy()
    embedded = server.json("/embed", {"image": "data:image/jpeg;base64," + b64(ASSETS / paths[4])})  # a data URL too
    np.testing.assert_allclose(embedded["embedding"], own, atol=ATOL)


def test_image_query_on_the_caption_side_ranks_items_by_their_best_caption(server, indexes):
    stored = indexes.assets.embeddings("image")
    answer = server.json("/search", {"image": b64(ASSETS / "images" / "coffee.jpg"), "modality": "text", "k": 21})
    ids, scores = by_item(indexes.assets, stored[item_of("coffee.jpg")])
    assert [h["id"] for h in answer["hits"]] == ids.tolist()
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], scores, atol=ATOL)


def test_embedding_and_item_queries(server, indexes):
    stored = indexes.assets.embeddings("image")
    query = np.random.default_rng(0).standard_normal(32)
    answer = server.json("/search", {"embedding": (7 * query).tolist(), "k": 10})  # any length: normalised
    ids, scores = brute_force(stored, query, 10)
    assert [h["id"] for h in answer["hits"]] == ids.tolist()
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], scores, atol=ATOL)
    by_id = server.json("/search", {"item": 7, "k": 5})
    assert [h["id"] for h in by_id["hits"]] == brute_force(stored, stored[7], 5)[0].tolist()
    page = server.json("/search", {"embedding": query.tolist(), "k": 4, "offset": 3})
    assert [h["id"] for h in page["hits"]] == ids[3:7].tolist()
    everything = server.json("/search", {"embedding": query.tolist(), "k": 50})  # more than there are
    assert sorted(h["id"] for h in everything["hits"]) == list(range(21))


def test_deduplicate_drops_the_copy(server, indexes):
    image = b64(ASSETS / "images" / "astronaut.jpg")
    plain = server.json("/search", {"image": image, "index": "dups", "k": 4})
    files = {h["id"]: h["metadata"]["filepath"] for h in plain["hits"]}
    assert sorted(files.values()) == ["a.jpg", "b.jpg", "c.jpg", "link.jpg"]
    assert [h["score"] for h in plain["hits"]][:2] == pytest.approx([1.0, 1.0], abs=ATOL)  # the two copies
    unique = server.json("/search", {"image": image, "index": "dups", "k": 4, "deduplicate": True})
    kept = [h["id"] for h in unique["hits"]]
    vectors = indexes.dups.embeddings("image")
    ranked = [h["id"] for h in plain["hits"]]
    for pos, item in enumerate(ranked):  # kept unless within cosine 0.94 of a better one kept
        near = [k for k in ranked[:pos] if k in kept and vectors[k] @ vectors[item] >= 0.94]
        assert (item in kept) == (not near)
    assert [files[i] for i in kept].count("a.jpg") + [files[i] for i in kept].count("b.jpg") == 1


def test_items_and_their_image_files(server, indexes, reference):
    paths = list(reference.items)
    item = server.json("/items/assets/5")
    assert item["filepath"] == paths[5] and item["captions"] == reference.items[paths[5]]
    status, data = server.get("/items/assets/5/image")
    assert status == 200 and data == (ASSETS / paths[5]).read_bytes()
    assert server.json("/items/assets/5")["image"].endswith("/items/assets/5/image")
    link = next(i for i in range(4) if server.json(f"/items/dups/{i}")["filepath"] == "link.jpg")
    status, data = server.get(f"/items/dups/{link}/image")  # a symlink out of the data folder: not served
    assert status == 404 and indexes.outside.is_file()
    assert server.json(f"/items/dups/{link}")["image"] is not None  # listed, but the file check refuses it
    for i in range(4):
        if i != link:
            assert server.get(f"/items/dups/{i}/image")[0] == 200


def test_indices_and_clip_style_listing(server):
    listed = server.json("/indices")
    assert [(ix["name"], ix["items"], ix["texts"], ix["dim"], ix["model"]) for ix in listed] == [
        ("assets", 21, 49, 32, "clip-tiny"), ("dups", 4, 0, 32, "clip-tiny")]  # fmt: skip
    assert listed[1]["modalities"] == ["image"]
    assert server.json("/indices-list") == ["assets", "dups"]
    assert server.json("/healthz")["status"] == "ok"
    status, data = server.post("/search", {"text": "a cat", "index": "dups", "modality": "text"})
    assert status == 400 and "no text embeddings" in json.loads(data)["detail"]


def test_metrics_count_requests_and_stages(server):
    before = metric(server, "mmlm_http_requests_total", route="/embed", status="200")
    encoded = metric(server, "mmlm_stage_duration_seconds_count", stage="encode")
    for i in range(5):
        server.json("/embed", {"text": f"query number {i}"})
    assert metric(server, "mmlm_http_requests_total", route="/embed", status="200") == before + 5
    assert metric(server, "mmlm_http_request_duration_seconds_count", route="/embed") >= before + 5
    assert encoded + 1 <= metric(server, "mmlm_stage_duration_seconds_count", stage="encode") <= encoded + 5
    server.json("/search", {"image": b64(ASSETS / "images" / "brick.jpg"), "k": 1})
    for stage in ("decode", "queue", "encode", "search", "metadata"):
        assert metric(server, "mmlm_stage_duration_seconds_count", stage=stage) >= 1
    server.get("/no/such/path")
    assert metric(server, "mmlm_http_requests_total", route="unmatched", status="404") >= 1


@pytest.mark.parametrize("method", [None, "similarity"])
def test_explain_returns_the_heatmap_png(server, reference, method):
    from mmlm.explain import heatmap_png

    body = {"text": "a rocket", "item": item_of("rocket.jpg"), **({"method": method} if method else {})}
    status, _, data = server.request("POST", "/explain", json.dumps(body).encode(), Content_Type="application/json")
    assert status == 200
    picture = Image.open(io.BytesIO(data))
    path = ASSETS / "images" / "rocket.jpg"
    ours = Image.open(io.BytesIO(heatmap_png(reference.model, None, path, "a rocket", **({"method": method} if method else {}))))
    assert picture.format == "PNG" and picture.size == ours.size == Image.open(path).size
    assert np.abs(np.asarray(picture, dtype=int) - np.asarray(ours, dtype=int)).max() <= 2


def test_python_client_and_search_command(server, indexes, reference, tmp_path):
    client = Client(server.url, index="assets")
    hits = client.search("a cup of coffee", k=3)
    assert [h["id"] for h in hits] == brute_force(indexes.assets.embeddings("image"), reference.text(["a cup of coffee"])[0], 3)[0].tolist()
    assert client.search(image=ASSETS / "images" / "coffee.jpg", k=1)[0]["id"] == item_of("coffee.jpg")
    assert client.search(embedding=indexes.assets.embeddings("image")[3], k=1)[0]["id"] == 3
    assert client.image(5) == (ASSETS / list(reference.items)[5]).read_bytes()
    assert client.item(5)["captions"] == reference.items[list(reference.items)[5]]
    with pytest.raises(ApiError) as error:
        client.search("x", index="nope")
    assert error.value.status == 404 and "nope" in str(error.value.detail)

    run = subprocess.run([sys.executable, "-m", "mmlm.cli", "search", server.url, "a cup of coffee", "--k", "3"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [line.split(None, 3) for line in run.stdout.splitlines()]
    assert [int(r[2]) for r in rows] == [h["id"] for h in hits]
    assert [r[3] for r in rows] == [h["metadata"]["captions"][0] for h in hits]
    as_json = subprocess.run([sys.executable, "-m", "mmlm.cli", "search", server.url, str(ASSETS / "images" / "rocket.jpg"),
                              "--image", "--k", "2", "--output", "json"], capture_output=True, text=True, cwd=tmp_path,
                             timeout=120, check=False)  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)[0]["id"] == item_of("rocket.jpg")
    bad = subprocess.run([sys.executable, "-m", "mmlm.cli", "search", server.url, "x", "--index", "nope"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2 and "no index 'nope'" in bad.stderr and "Traceback" not in bad.stderr
