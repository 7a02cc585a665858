"""A bounded load test on loopback: 200 concurrent clients send 5,000 mixed queries within a fixed time;
no request may fail, every embedding query must rank as numpy does, and the queries must have been
micro-batched. Prints p50 / p99 latency and queries per second."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mmlm.paths import ASSETS
from mmlm.retrieval.client import load

pytestmark = [pytest.mark.server, pytest.mark.slow]

CLIENTS = 200
REQUESTS = 5000
TIME_LIMIT = 150.0  # seconds for all of them, on a busy 2-core machine


def queries(stored: np.ndarray) -> list[dict]:
    """A mix: texts (70%), embeddings (20%), stored items (8%), uploaded photographs (2%)."""
    rng = np.random.default_rng(0)
    words = ["a", "the", "red", "small", "photo", "of", "an", "astronaut", "rocket", "coffee", "cup", "cat", "clock",
             "grass", "galaxy", "camera", "brick"]  # fmt: skip
    photos = [base64.b64encode(p.read_bytes()).decode() for p in sorted((ASSETS / "images").glob("*.jpg"))[:4]]
    out = []
    for i in range(REQUESTS):
        kind = i % 50
        if kind < 35:
            out.append({"text": " ".join(rng.choice(words, 6)) + f" {i}", "k": 10})
        elif kind < 45:
            out.append({"embedding": rng.standard_normal(stored.shape[1]).tolist(), "k": 10})
        elif kind < 49:
            out.append({"item": int(rng.integers(len(stored))), "k": 10})
        else:
            out.append({"image": photos[i % len(photos)], "k": 10})
    return out


def batch_sizes(server) -> tuple[float, float]:
    _, text = server.get("/metrics")
    samples = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples
               if s.name in ("mmlm_batch_size_sum", "mmlm_batch_size_count")}  # fmt: skip
    return samples["mmlm_batch_size_sum"], samples["mmlm_batch_size_count"]


def test_200_clients_5000_queries(server, indexes, tmp_path):
    stored = np.asarray(indexes.assets.embeddings("image"))
    bodies = queries(stored)
    summed, batches = batch_sizes(server)
    latencies, errors, answers, wall = load(server.url, bodies, CLIENTS, TIME_LIMIT)
    assert errors == [], errors[:5]
    assert len(latencies) == REQUESTS

    for body, answer in zip(bodies, answers):  # every embedding query ranked as numpy ranks it
        if "embedding" in body:
            scores = stored @ (np.asarray(body["embedding"]) / np.linalg.norm(body["embedding"]))
            assert [h["id"] for h in answer["hits"]] == np.argsort(-scores, kind="stable")[:10].tolist()

    summed, batches = np.subtract(batch_sizes(server), (summed, batches))
    assert summed == REQUESTS  # each query went through the batcher once ...
    assert summed / batches > 2  # ... and under load they shared batches

    ms = np.percentile(latencies, [50, 99]) * 1000
    report = {"clients": CLIENTS, "requests": REQUESTS, "seconds": round(wall, 2), "qps": round(REQUESTS / wall, 1),
              "p50_ms": round(float(ms[0]), 1), "p99_ms": round(float(ms[1]), 1),
              "mean_batch": round(float(summed / batches), 1)}  # fmt: skip
    (tmp_path / "load.json").write_text(json.dumps(report))
    print(f"\nload test: {json.dumps(report)}")
