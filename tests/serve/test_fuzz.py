"""Hostile and broken requests over the wire to real servers: the hand-written cases of ``_hostile.py`` with
the exact 4xx each must get (sent as written: raw paths, a chunked body cut short), then schemathesis
generating requests from ``/openapi.json``; with and without the API key. Never a 5xx, and the servers still
answer ``/healthz`` afterwards. test_contract.py sends the same cases in-process."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _hostile import JSON, OPEN_ONLY, cases
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.server, pytest.mark.slow]


def five_hundreds(server) -> float:
    _, text = server.get("/metrics", X_API_Key=server.api_key or "")
    return sum(s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples
               if s.name == "mmlm_http_requests_total" and s.labels["status"].startswith("5"))  # fmt: skip


def chunked_post(server, path: str, parts: list[bytes]) -> tuple[int, bytes]:
    """POST ``parts`` as chunks without a Content-Length, and without the final chunk: the server must
    refuse the body once it has read past its limit, not wait for the end."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
        for part in parts:
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def check(server, name, method, path, body, headers, status) -> None:
    got, answer_headers, data = server.request(method, path, body, **headers)
    assert got == status, (name, got, data[:300])
    assert answer_headers.get("content-type", "").startswith("application/json"), (name, answer_headers)
    detail = json.loads(data)["detail"]
    assert detail and isinstance(detail, (str, list)), (name, data[:300])


def test_hand_written_cases_get_their_4xx(server, keyed_server, indexes):
    link = next(i for i in range(4) if indexes.dups.metadata([i])[0]["filepath"] == "link.jpg")
    for name, method, path, body, headers, status in cases() + OPEN_ONLY:
        check(server, name, method, path.format(link=link), body, headers, status)
    for name, method, path, body, headers, status in cases():  # the same with the key: the same answers
        check(keyed_server, name, method, path, body, {**headers, "X-API-Key": keyed_server.api_key}, status)
    for name, method, path, body, headers, status in cases():  # without it: 401 before anything is read
        public = path.startswith("/static/")  # the page's files hold no data
        check(keyed_server, name, method, path, body, headers, status if public else 401)
    wrong = {"Authorization": "Bearer not-the-key"}
    check(keyed_server, "wrong key", "POST", "/search", json.dumps({"text": "a"}).encode(), {**JSON, **wrong}, 401)
    for url in (f"{server.url}/healthz", f"{server.url}/items/../healthz", f"{server.url}/items/%2e%2e/healthz",
                f"{server.url}@evil.example/items/1", "http://127.0.0.1:9/items/1"):  # fmt: skip
        check(keyed_server, f"image_url outside the allowed prefix: {url}", "POST",
              f"/knn-service?api_key={keyed_server.api_key}", json.dumps({"image_url": url}).encode(), {}, 403)
    for url in (f"{server.url}/items/a b", f"{server.url}/items/1\r\nX-Injected: 1", f"{server.url}/items/\t1"):
        # inside the allowed prefix, but http.client refuses to send it (InvalidURL): the client's mistake, a 400
        check(keyed_server, f"image_url with a control character: {url!r}", "POST",
              f"/knn-service?api_key={keyed_server.api_key}", json.dumps({"image_url": url}).encode(), {}, 400)
    status, data = chunked_post(server, "/search", [b'{"text": "'] + [b"a" * 2**20] * 10)
    assert status == 413 and "bytes" in json.loads(data)["detail"]  # no Content-Length: counted as it comes
    for s in (server, keyed_server):
        assert s.get("/healthz")[0] == 200 and five_hundreds(s) == 0


def schemathesis(schema: Path, url: str, cwd: Path, headers: list[str]) -> subprocess.CompletedProcess:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    args = [st, "run", str(schema), "--url", url, "--checks", "not_a_server_error", "--max-examples", "25",
            "--seed", "1", "--phases", "examples,coverage,fuzzing", "--workers", "1", "--request-timeout", "60",
            "--no-shrink", "--suppress-health-check", "all", "--warnings", "off", *headers]  # fmt: skip
    return subprocess.run(args, check=False, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("who", ["open server", "with the key", "without the key"])
def test_schemathesis_finds_no_server_error(server, keyed_server, who, tmp_path):
    target = server if who == "open server" else keyed_server
    schema = tmp_path / "openapi.json"
    status, data = target.get("/openapi.json", X_API_Key=keyed_server.api_key)
    assert status == 200
    schema.write_bytes(data)
    run = schemathesis(schema, target.url, tmp_path, ["--header", f"X-API-Key: {keyed_server.api_key}"] if who == "with the key" else [])
    assert run.returncode == 0 and "No issues found" in run.stdout, run.stdout[-4000:]
    assert target.get("/healthz")[0] == 200 and five_hundreds(target) == 0
