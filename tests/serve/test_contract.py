"""The API's contract in this process (FastAPI's TestClient, no server process): every route, answers checked
against numpy brute force over the indexes' stored embeddings and the model run here, and every hostile request
of ``_hostile.py`` with its 4xx, with and without the API key. The quick tier's view of ``mmlm serve``."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from _hostile import JSON, OPEN_ONLY, cases
from _inprocess import serving
from _ranking import ATOL, b64, brute_force, by_item, item_of
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mmlm.data import image_transform
from mmlm.paths import ASSETS
from mmlm.serve.security import RedactApiKey

API_KEY = "s3cret-key"
ALLOWED_ORIGIN = "http://allowed.example"


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no access log on the test's stderr
        pass


@pytest.fixture(scope="module")
def photos():
    """A loopback HTTP server of the bundled assets: where ``image_url`` may fetch from (no network)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(ASSETS)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def api(indexes):
    with serving({"assets": str(indexes.assets.folder), "dups": str(indexes.dups.folder)}) as a:
        yield a


@pytest.fixture(scope="module")
def keyed(indexes, photos):
    with serving({"assets": str(indexes.assets.folder)}, api_key=API_KEY, cors_origins=(ALLOWED_ORIGIN,),
                 image_url_allow=(f"{photos}/images/",)) as a:  # fmt: skip
        yield a


def metric(api, name: str, **labels: str) -> float:
    _, text = api.get("/metrics", X_API_Key=api.api_key or "")
    return sum(s.value for family in text_string_to_metric_families(text.decode()) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


# ------------------------------------------------------------------------------ mmlm's routes


def test_text_query_and_embedding_match_numpy(api, indexes, reference):
    query = "an astronaut in an orange suit"
    answer = api.json("/search", {"text": query, "k": 21, "index": "assets"})
    ids, scores = brute_force(indexes.assets.embeddings("image"), reference.text([query])[0], 21)
    assert answer["index"] == "assets" and answer["modality"] == "image"
    assert [h["id"] for h in answer["hits"]] == ids.tolist()
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], scores, atol=ATOL)
    paths = list(reference.items)
    for hit in answer["hits"]:  # metadata: the manifest's row and every caption; the image on this server
        assert hit["metadata"]["filepath"] == paths[hit["id"]]
        assert hit["metadata"]["captions"] == reference.items[paths[hit["id"]]]
        assert hit["image"] == f"http://testserver/items/assets/{hit['id']}/image"
    embedded = api.json("/embed", {"text": query})
    np.testing.assert_allclose(embedded["embedding"], reference.text([query])[0], atol=ATOL)
    assert embedded["dim"] == 32 and embedded["index"] == "assets"


def test_every_photo_finds_itself_first(api, reference):
    paths = list(reference.items)
    with ThreadPoolExecutor(8) as pool:  # at once: they share batches in the worker
        answers = list(pool.map(lambda p: api.json("/search", {"image": b64(ASSETS / p), "k": 3}), paths))
    for item, answer in enumerate(answers):
        assert answer["hits"][0]["id"] == item
        assert answer["hits"][0]["score"] == pytest.approx(1.0, abs=ATOL)
        assert answer["hits"][1]["score"] < 1.0 - 1e-4
    transform = image_transform(reference.model.cfg.vision, train=False)
    with torch.no_grad():
        own = reference.model.encode_image(transform(Image.open(ASSETS / paths[4]).convert("RGB"))[None])[0].numpy()
    embedded = api.json("/embed", {"image": "data:image/jpeg;base64," + b64(ASSETS / paths[4])})  # a data URL too
    np.testing.assert_allclose(embedded["embedding"], own, atol=ATOL)


def test_image_query_on_the_caption_side_ranks_items_by_their_best_caption(api, indexes):
    stored = indexes.assets.embeddings("image")
    answer = api.json("/search", {"image": b64(ASSETS / "images" / "coffee.jpg"), "modality": "text", "k": 21})
    ids, scores = by_item(indexes.assets, stored[item_of("coffee.jpg")])
    assert answer["modality"] == "text" and [h["id"] for h in answer["hits"]] == ids.tolist()
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], scores, atol=ATOL)


def test_embedding_and_item_queries_and_paging(api, indexes):
    stored = indexes.assets.embeddings("image")
    query = np.random.default_rng(0).standard_normal(32)
    answer = api.json("/search", {"embedding": (7 * query).tolist(), "k": 10})  # any length: normalised
    ids, scores = brute_force(stored, query, 10)
    assert [h["id"] for h in answer["hits"]] == ids.tolist()
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], scores, atol=ATOL)
    by_id = api.json("/search", {"item": 7, "k": 5})
    assert [h["id"] for h in by_id["hits"]] == brute_force(stored, stored[7], 5)[0].tolist()
    page = api.json("/search", {"embedding": query.tolist(), "k": 4, "offset": 3})
    assert [h["id"] for h in page["hits"]] == ids[3:7].tolist()
    everything = api.json("/search", {"embedding": query.tolist(), "k": 50})  # more than there are
    assert sorted(h["id"] for h in everything["hits"]) == list(range(21))


def test_deduplicate_drops_the_copy(api, indexes):
    image = b64(ASSETS / "images" / "astronaut.jpg")
    plain = api.json("/search", {"image": image, "index": "dups", "k": 4})
    files = {h["id"]: h["metadata"]["filepath"] for h in plain["hits"]}
    assert sorted(files.values()) == ["a.jpg", "b.jpg", "c.jpg", "link.jpg"]
    assert [h["score"] for h in plain["hits"]][:2] == pytest.approx([1.0, 1.0], abs=ATOL)  # the two copies
    unique = api.json("/search", {"image": image, "index": "dups", "k": 4, "deduplicate": True})
    kept = [h["id"] for h in unique["hits"]]
    vectors = indexes.dups.embeddings("image")
    ranked = [h["id"] for h in plain["hits"]]
    for pos, item in enumerate(ranked):  # kept unless within cosine 0.94 of a better one kept
        assert (item in kept) == (not [k for k in ranked[:pos] if k in kept and vectors[k] @ vectors[item] >= 0.94])
    assert [files[i] for i in kept].count("a.jpg") + [files[i] for i in kept].count("b.jpg") == 1


def test_items_and_their_image_files(api, indexes, reference):
    paths = list(reference.items)
    item = api.json("/items/assets/5")
    assert item["filepath"] == paths[5] and item["captions"] == reference.items[paths[5]]
    assert item["image"] == "http://testserver/items/assets/5/image"
    status, headers, data = api.request("GET", "/items/assets/5/image")
    assert status == 200 and data == (ASSETS / paths[5]).read_bytes()
    assert headers["x-content-type-options"] == "nosniff" and headers["content-type"] == "image/jpeg"
    link = next(i for i in range(4) if api.json(f"/items/dups/{i}")["filepath"] == "link.jpg")
    status, data = api.get(f"/items/dups/{link}/image")  # a symlink out of the data folder: not served
    assert status == 404 and "no image file" in json.loads(data)["detail"] and indexes.outside.is_file()
    assert api.json(f"/items/dups/{link}")["image"] is not None  # listed, but the file check refuses it
    assert [api.get(f"/items/dups/{i}/image")[0] for i in range(4) if i != link] == [200, 200, 200]


def test_indices_listing_and_health(api, indexes):
    listed = api.json("/indices")
    assert [(ix["name"], ix["items"], ix["texts"], ix["dim"], ix["model"], ix["images"]) for ix in listed] == [
        ("assets", 21, 49, 32, "clip-tiny", True), ("dups", 4, 0, 32, "clip-tiny", True)]  # fmt: skip
    assert listed[0]["modalities"] == ["image", "text"] and listed[1]["modalities"] == ["image"]
    assert listed[0]["weights_hash"] == indexes.assets.manifest["model"]["weights_hash"]
    assert api.json("/indices-list") == ["assets", "dups"]
    assert api.json("/healthz") == {"status": "ok", "indexes": 2}
    status, answer = api.post("/search", {"text": "a cat", "index": "dups", "modality": "text"})
    assert status == 400 and answer["detail"] == "index 'dups' has no text embeddings to search"


def test_page_schema_and_docs(api):
    status, headers, page = api.request("GET", "/")
    assert status == 200 and b"<html" in page.lower() and "script-src 'self'" in headers["content-security-policy"]
    for path in ("/static/app.js", "/static/style.css", "/docs"):
        assert api.get(path)[0] == 200, path
    schema = api.json("/openapi.json")
    assert {"/search", "/embed", "/indices", "/items/{index}/{id}", "/items/{index}/{id}/image", "/explain", "/caption",
            "/knn-service", "/indices-list", "/metadata", "/healthz", "/metrics"} == set(schema["paths"])  # fmt: skip


def test_metrics_count_requests_stages_and_bound_methods(api):
    before = metric(api, "mmlm_http_requests_total", route="/embed", status="200")
    encoded = metric(api, "mmlm_stage_duration_seconds_count", stage="encode")
    for i in range(5):
        api.json("/embed", {"text": f"query number {i}"})
    assert metric(api, "mmlm_http_requests_total", route="/embed", status="200") == before + 5
    assert encoded + 1 <= metric(api, "mmlm_stage_duration_seconds_count", stage="encode") <= encoded + 5
    api.json("/search", {"image": b64(ASSETS / "images" / "brick.jpg"), "k": 1})
    for stage in ("decode", "queue", "encode", "search", "metadata"):
        assert metric(api, "mmlm_stage_duration_seconds_count", stage=stage) >= 1
    assert api.get("/no/such/path")[0] == 404
    assert metric(api, "mmlm_http_requests_total", route="unmatched", status="404") >= 1
    for method in ("BREW", "PROPFIND", "X-MADE-UP-1"):  # a series per made-up method would be unbounded
        assert api.request(method, "/search")[0] == 405
    _, text = api.get("/metrics")
    methods = {s.labels["method"] for f in text_string_to_metric_families(text.decode()) for s in f.samples
               if s.name == "mmlm_http_requests_total"}  # fmt: skip
    assert methods <= {"GET", "POST", "other"} and "other" in methods
    assert metric(api, "mmlm_http_requests_total", route="/search", method="other", status="405") == 3


@pytest.mark.parametrize("method", [None, "similarity"])
def test_explain_returns_the_heatmap_png(api, reference, method):
    from mmlm.explain import heatmap_png

    chosen = {"method": method} if method else {}
    path = ASSETS / "images" / "rocket.jpg"
    ours = Image.open(io.BytesIO(heatmap_png(reference.model, None, path, "a rocket", **chosen)))
    for source in ({"item": item_of("rocket.jpg")}, {"image": b64(path)}):  # a stored item or an upload
        body = json.dumps({"text": "a rocket", **source, **chosen}).encode()
        status, headers, data = api.request("POST", "/explain", body, Content_Type="application/json")
        assert status == 200 and headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(data))
        assert picture.format == "PNG" and picture.size == ours.size == Image.open(path).size
        assert np.abs(np.asarray(picture, dtype=int) - np.asarray(ours, dtype=int)).max() <= 2
    status, answer = api.post("/explain", {"text": "a rocket", "item": 1, "image": b64(path)})
    assert status == 422 and answer["detail"] == "give exactly one of image, item"


# ------------------------------------------------------------------------------ clip-retrieval's routes


def test_knn_service_and_metadata_as_clip_retrieval_sends_them(api, indexes, reference):
    images = indexes.assets.embeddings("image")
    text = "a rocket on its launch pad"
    paths = list(reference.items)
    plain = {"Content-Type": "text/plain;charset=UTF-8"}  # its front end's fetch() with a string body
    body = {"text": text, "image": None, "image_url": None, "embedding_input": None, "modality": "image",
            "num_images": 3, "indice_name": "assets", "num_result_ids": 8, "use_mclip": False, "deduplicate": False,
            "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": ""}  # fmt: skip
    status, results = api.post("/knn-service", json.dumps(body).encode(), content_type=None, **plain)
    ids, scores = brute_force(images, reference.text([text])[0], 8)
    assert status == 200 and [r["id"] for r in results] == ids.tolist()  # num_result_ids results ...
    np.testing.assert_allclose([r["similarity"] for r in results], scores, atol=ATOL)
    assert [("caption" in r) for r in results] == [True] * 3 + [False] * 5  # ... metadata on num_images
    for r in results[:3]:  # clip-retrieval's schema: metadata columns, caption, url, id, similarity
        assert set(r) == {"id", "similarity", "caption", "url", "filepath", "title"}
        assert r["caption"] == reference.items[paths[r["id"]]][0] and r["filepath"] == paths[r["id"]]
        assert r["url"] == f"http://testserver/items/assets/{r['id']}/image"
    rocket = item_of("rocket.jpg")
    status, by_image = api.post("/knn-service", {"image": b64(ASSETS / "images" / "rocket.jpg"), "num_images": 21},
                                content_type=None)  # fmt: skip
    assert status == 200 and [r["id"] for r in by_image] == brute_force(images, images[rocket], 21)[0].tolist()
    vector = np.random.default_rng(1).standard_normal(32)
    by_vector = api.json("/knn-service", {"embedding_input": vector.tolist(), "num_images": 5})
    assert [r["id"] for r in by_vector] == brute_force(images, vector, 5)[0].tolist()
    rocket_b64 = b64(ASSETS / "images" / "rocket.jpg")
    captions = api.json("/knn-service", {"image": rocket_b64, "modality": "text", "num_images": 5})
    assert [r["id"] for r in captions] == by_item(indexes.assets, images[rocket])[0][:5].tolist()
    status, rows = api.post("/metadata", json.dumps({"ids": [4, 0, 999], "indice_name": "assets"}).encode(),
                            content_type=None, **plain)  # fmt: skip
    assert status == 200 and [m["id"] for m in rows] == [4, 0, 999]
    assert rows[0]["metadata"]["caption"] == reference.items[paths[4]][0] and rows[2]["metadata"] == {}
    astronaut = b64(ASSETS / "images" / "astronaut.jpg")
    deduped = api.json("/knn-service", {"image": astronaut, "indice_name": "dups", "deduplicate": True,
                                        "num_images": 4})  # fmt: skip
    searched = api.json("/search", {"image": astronaut, "index": "dups", "deduplicate": True, "k": 4})["hits"]
    assert [r["id"] for r in deduped] == [h["id"] for h in searched] and len(deduped) < 4  # a copy dropped


# ------------------------------------------------------------------------------ who may call


def test_api_key_in_each_form_and_the_open_paths(keyed):
    body = json.dumps({"text": "a rocket", "k": 2}).encode()
    ways = [{"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}]
    answers = [keyed.request("POST", "/search", body, **{**JSON, **h}) for h in ways]
    answers.append(keyed.request("POST", f"/search?api_key={API_KEY}", body, **JSON))
    assert [a[0] for a in answers] == [200, 200, 200]
    assert len({a[2] for a in answers}) == 1  # the same hits whichever way the key came
    for path in ("/search", "/indices", "/indices-list", "/metrics", "/docs", "/openapi.json", "/items/assets/1/image"):
        status, headers, data = keyed.request("GET", path)
        assert status == 401 and headers["www-authenticate"] == "Bearer", path
        assert "needs an API key" in json.loads(data)["detail"]
    assert keyed.json("/healthz")["status"] == "ok"
    for path in ("/", "/static/app.js", "/static/style.css"):  # the page itself holds no data
        assert keyed.get(path)[0] == 200
    assert keyed.get("/items/assets/1/image", X_API_Key="wrong")[0] == 401
    assert keyed.get("/items/assets/1/image", Authorization="Bearer wrong")[0] == 401


def test_access_log_redacts_the_key():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "POST", f"/search?x=1&api_key={API_KEY}&k=2", "1.1", 200), None)  # fmt: skip
    assert RedactApiKey().filter(record) and record.getMessage().count("api_key=<redacted>&k=2") == 1
    assert API_KEY not in record.getMessage()


@pytest.mark.parametrize("origin, allowed", [(ALLOWED_ORIGIN, True), ("http://evil.example", False)])
def test_cors_answers_only_the_allowed_origin(keyed, api, origin, allowed):
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key,content-type"}  # fmt: skip
    status, headers, _ = keyed.request("OPTIONS", "/search", **preflight)  # browsers send no key here
    assert (status, headers.get("access-control-allow-origin")) == ((200, origin) if allowed else (400, None))
    status, headers, _ = keyed.request("GET", "/indices", Origin=origin, X_API_Key=API_KEY)
    assert status == 200 and headers.get("access-control-allow-origin") == (origin if allowed else None)
    status, headers, _ = api.request("GET", "/indices", Origin=origin)  # no CORS on a server without origins
    assert status == 200 and "access-control-allow-origin" not in headers


def test_image_url_fetched_only_from_the_allowed_prefix(keyed, api, photos):
    body = {"image_url": f"{photos}/images/rocket.jpg", "indice_name": "assets", "num_images": 3}
    results = keyed.json(f"/knn-service?api_key={API_KEY}", body)
    assert results[0]["id"] == item_of("rocket.jpg") and results[0]["similarity"] == pytest.approx(1.0, abs=ATOL)
    status, answer = api.post("/knn-service", body)  # the same address where image_url is off
    assert status == 403 and answer["detail"].startswith("image_url is off on this server")
    for url in (f"{photos}/captions.csv", f"{photos}/images/../captions.csv", f"{photos}/images/%2e%2e/captions.csv",
                f"{photos}@evil.example/images/1", "http://127.0.0.1:9/images/1", "file:///etc/passwd"):  # fmt: skip
        status, answer = keyed.post(f"/knn-service?api_key={API_KEY}", {"image_url": url})
        assert status == 403 and f"may only name addresses under {photos}/images/" in answer["detail"], url
    for url in (f"{photos}/images/a b", f"{photos}/images/1\r\nX-Injected: 1", f"{photos}/images/missing.jpg"):
        status, answer = keyed.post(f"/knn-service?api_key={API_KEY}", {"image_url": url})  # inside, unfetchable
        assert status == 400 and answer["detail"].startswith("image_url: could not fetch it"), url


# ------------------------------------------------------------------------------ hostile requests


def check(api, name, method, path, body, headers, status) -> None:
    got, answer_headers, data = api.request(method, path, body, **headers)
    assert got == status, (name, got, data[:300])
    assert answer_headers.get("content-type", "").startswith("application/json"), (name, answer_headers)
    detail = json.loads(data)["detail"]
    assert detail and isinstance(detail, (str, list)), (name, data[:300])


def test_hostile_requests_get_their_4xx(api, keyed, indexes):
    link = next(i for i in range(4) if indexes.dups.metadata([i])[0]["filepath"] == "link.jpg")
    for name, method, path, body, headers, status in cases() + OPEN_ONLY:
        check(api, name, method, path.format(link=link), body, headers, status)
    for name, method, path, body, headers, status in cases():  # with the key: the same answers
        check(keyed, name, method, path, body, {**headers, "X-API-Key": API_KEY}, status)
    for name, method, path, body, headers, status in cases():  # without it: 401 before anything is read
        public = keyed.client.base_url.join(path).path.startswith("/static/")  # the page's files (httpx drops ..)
        check(keyed, name, method, path, body, headers, status if public else 401)
    check(keyed, "wrong key", "POST", "/search", b'{"text": "a"}', {**JSON, "Authorization": "Bearer nope"}, 401)
    assert metric(api, "mmlm_http_requests_total", status="500") == 0 and api.json("/healthz")["status"] == "ok"


@pytest.mark.parametrize(("body", "detail"), [
    ({"text": "a", "k": 0}, "Input should be greater than or equal to 1"),
    ({"text": "a", "k": 10_000, "offset": 1}, "k=10000, offset=1: need k >= 1 and k + offset <= 10000"),
    ({"text": "a", "index": "nope"}, "no index 'nope'; this server has assets, dups"),
    ({"image": "!!not base64!!"}, "image: not valid base64"),
    ({"image": b64(ASSETS / "captions.csv")},
     "image: not a file in a format this server reads (JPEG, PNG, WEBP, GIF, BMP)"),
    ({"text": "a", "embedding": [0.1] * 32}, "give exactly one of text, image, embedding, item (got text, embedding)"),
    ({}, "give exactly one of text, image, embedding, item (got none)"),
    ({"embedding": [0.1] * 31}, "embedding of length 31; index 'assets' holds 32-d vectors"),
    ({"embedding": [0.0] * 32}, "embedding: a zero vector has no direction to search"),
    ({"item": 21}, "index 'assets' has no item 21 (ids 0 to 20)"),
    ({"text": "a" * 1001}, "text of 1,001 characters; the limit is 1,000"),
])  # fmt: skip
def test_refusals_say_what_is_wrong(api, body, detail):
    status, answer = api.post("/search", body)
    assert 400 <= status < 500
    assert detail in (answer["detail"] if isinstance(answer["detail"], str) else answer["detail"][0]["msg"])


def test_limits_from_settings(indexes):
    """Settings bound the body, the pixels and k: a 40x40 image passes a 1,600-pixel limit, 41x40 does not."""

    def png(w: int, h: int) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), "red").save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    with serving({"assets": str(indexes.assets.folder)}, max_pixels=1600, max_k=5, max_body=4096, max_text=10) as small:
        assert small.post("/search", {"image": png(40, 40), "k": 5})[0] == 200
        status, answer = small.post("/search", {"image": png(41, 40), "k": 1})
        assert status == 413 and answer["detail"] == "image of 41x40 = 1,640 pixels; the limit is 1,600"
        assert small.post("/search", {"text": "a", "k": 6})[0] == 422
        assert small.post("/search", {"text": "a" * 11})[0] == 422
        status, answer = small.post("/search", {"embedding": [0.1] * 1000})
        assert status == 413 and answer["detail"] == "request body over 4,096 bytes"
        chunks = (b'{"text": "' + b"a" * 1000 for _ in range(10))  # no Content-Length: counted as it streams in
        response = small.client.post("/search", content=chunks, headers=JSON)
        assert response.status_code == 413 and response.json()["detail"] == "request body over 4,096 bytes"
