"""Who may call, where it needs a process: the API key sent as ``?api_key=`` stays out of uvicorn's real access
log. The key's forms, the open routes, CORS and ``image_url`` are tested in-process (test_contract.py)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_the_query_form_of_the_key_stays_out_of_the_access_log(keyed_server):
    key = keyed_server.api_key
    body = json.dumps({"text": "a rocket", "k": 2}).encode()
    status, _, data = keyed_server.request("POST", f"/search?api_key={key}", body, Content_Type="application/json")
    assert status == 200 and len(json.loads(data)["hits"]) == 2
    assert keyed_server.request("GET", "/indices")[0] == 401
    log = keyed_server.log.read_text()
    assert "POST /search?api_key=<redacted> HTTP/1.1" in log and key not in log
