"""A real ``mmlm serve`` process on loopback (``start_server``, ``stop_server``) and a small HTTP client for it,
in a module of its own so that test files import it by a name no other folder's conftest has."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STARTUP = 180  # seconds a server may take to come up on a busy 2-core machine


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None = None
    cors_origin: str | None = None

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request sent as written: no header added, the path not normalised."""
        host, port = self.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            connection.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def get(self, path: str, **headers: str) -> tuple[int, bytes]:
        status, _, data = self.request("GET", path, **headers)
        return status, data

    def post(self, path: str, body: bytes | str | dict, content_type: str | None = "application/json",
             **headers: str) -> tuple[int, bytes]:  # fmt: skip
        """POST ``body`` (a dict as JSON) with ``content_type``; None sends no Content-Type, as ClipClient does."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
        if content_type is not None:
            headers["Content-Type"] = content_type
        status, _, out = self.request("POST", path, data, **headers)
        return status, out

    def json(self, path: str, body: dict | None = None, **headers: str):
        status, data = self.get(path, **headers) if body is None else self.post(path, body, **headers)
        assert status == 200, (status, data[:500])
        return json.loads(data)


def start_server(args: list[str], cwd: Path, **env: str) -> Server:
    """``python -m mmlm.cli serve ARGS --port 0``: waits for the port it prints and for ``/healthz``."""
    log = cwd / "server.log"
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "mmlm.cli", "serve", *args, "--port", "0"],
                                   cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            server = Server(found.group(1), process, log)
            if server.get("/healthz")[0] == 200:
                return server
        if process.poll() is not None:
            raise AssertionError(f"mmlm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"mmlm serve did not come up in {STARTUP} s:\n{log.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


