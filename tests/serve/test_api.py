"""`mmlm serve` as a process, for what needs one: the Python client and the `mmlm search` command talk to it
over HTTP. The routes' contract is tested in-process (test_contract.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _ranking import brute_force, item_of

from mmlm.paths import ASSETS
from mmlm.retrieval import Client
from mmlm.retrieval.client import ApiError

pytestmark = [pytest.mark.server, pytest.mark.slow]


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
