"""Who may call the API: the API key in each of its three forms, the routes it leaves open, CORS for
the one allowed origin, and ``image_url`` fetched only from the allowed prefix."""

from __future__ import annotations

import base64
import json

import pytest

from mmlm.paths import ASSETS

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.mark.slow
def test_api_key_in_each_form(keyed_server):
    key = keyed_server.api_key
    body = json.dumps({"text": "a rocket", "k": 2}).encode()
    ways = {"X-API-Key": {"X-API-Key": key}, "Bearer": {"Authorization": f"Bearer {key}"}}
    answers = [keyed_server.request("POST", "/search", body, **{"Content-Type": "application/json", **h}) for h in ways.values()]
    answers.append(keyed_server.request("POST", f"/search?api_key={key}", body, **{"Content-Type": "application/json"}))
    assert [a[0] for a in answers] == [200, 200, 200]
    assert len({a[2] for a in answers}) == 1  # the same hits whichever way the key came
    for path in ("/search", "/indices", "/indices-list", "/metrics", "/docs", "/openapi.json", "/items/assets/1/image"):
        status, headers, _ = keyed_server.request("GET", path)
        assert status == 401 and headers["www-authenticate"] == "Bearer", path
    status, _, data = keyed_server.request("GET", "/healthz")
    assert status == 200 and json.loads(data)["status"] == "ok"
    for path in ("/", "/static/app.js", "/static/style.css"):  # the page itself holds no data
        assert keyed_server.request("GET", path)[0] == 200
    assert keyed_server.request("GET", "/items/assets/1/image", X_API_Key="wrong")[0] == 401
    log = keyed_server.log.read_text()
    assert "api_key=<redacted>" in log and key not in log  # the query form stays out of the access log


@pytest.mark.parametrize("origin, allowed", [("http://allowed.example", True), ("http://evil.example", False)])
def test_cors_answers_only_the_allowed_origin(keyed_server, origin, allowed):
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key,content-type"}  # fmt: skip
    status, headers, _ = keyed_server.request("OPTIONS", "/search", **preflight)  # browsers send no key here
    assert (status, headers.get("access-control-allow-origin")) == ((200, origin) if allowed else (400, None))
    status, headers, _ = keyed_server.request("GET", "/indices", Origin=origin, X_API_Key=keyed_server.api_key)
    assert status == 200 and headers.get("access-control-allow-origin") == (origin if allowed else None)


def test_open_server_sends_no_cors_headers(server):
    status, headers, _ = server.request("GET", "/indices", Origin="http://allowed.example")
    assert status == 200 and "access-control-allow-origin" not in headers


def test_image_url_fetched_only_from_the_allowed_prefix(server, keyed_server):
    rocket = server.json("/search", {"image": base64.b64encode((ASSETS / "images" / "rocket.jpg").read_bytes()).decode(),
                                     "k": 1})["hits"][0]  # fmt: skip
    body = {"image_url": rocket["image"], "indice_name": "assets", "num_images": 3, "modality": "image"}
    status, data = keyed_server.post(f"/knn-service?api_key={keyed_server.api_key}", body, content_type=None)
    assert status == 200
    results = json.loads(data)
    assert results[0]["id"] == rocket["id"] and results[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    status, data = server.post("/knn-service", body, content_type=None)  # the same address, where image_url is off
    assert status == 403 and "image_url is off" in json.loads(data)["detail"]
