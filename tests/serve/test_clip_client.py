"""clip-retrieval's own ``ClipClient`` (its wheel installed with ``--no-deps``, ``clip_client.py`` loaded
by file in a process that cannot import mmlm) and the requests its web front end makes, against
``mmlm serve``; answers checked against numpy brute force over the index's stored embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmlm.paths import ASSETS

pytestmark = [pytest.mark.server, pytest.mark.slow]

ATOL = {"torch": 1e-5, "onnx": 1e-4}  # scores against the torch model's: ONNX Runtime and Pillow preprocessing

CLIENT = """
import importlib.util, json
import requests

params = json.loads(PARAMS)
spec = importlib.util.spec_from_file_location("clip_client", params["module"])
clip_client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(clip_client)  # the module alone: the package's __init__ imports torch, faiss, ...
url, query = params["url"], params["query"]
out = {"module": clip_client.__file__}

exact = clip_client.ClipClient(url + "/knn-service", indice_name="assets", num_images=21, deduplicate=False,
                               use_safety_model=False, use_violence_detector=False)
out["text"] = exact.query(text=query["text"])
out["image"] = exact.query(image=query["image"])
out["embedding"] = exact.query(embedding_input=query["embedding"])
captions = clip_client.ClipClient(url + "/knn-service", indice_name="assets", num_images=5,
                                  modality=clip_client.Modality.TEXT, deduplicate=False)
out["image_on_captions"] = captions.query(image=query["image"])
defaults = clip_client.ClipClient(url + "/knn-service", indice_name="dups")  # deduplicate, safety, aesthetic on
out["defaults"] = defaults.query(image=query["copy"])
out["all_dups"] = clip_client.ClipClient(url + "/knn-service", indice_name="dups", deduplicate=False).query(image=query["copy"])

# the web front end: fetch() with a string body, i.e. Content-Type text/plain, and num_result_ids > num_images
plain = {"Content-Type": "text/plain;charset=UTF-8"}
out["indices"] = requests.get(url + "/indices-list").json()
out["front"] = requests.post(url + "/knn-service", headers=plain, data=json.dumps({
    "text": query["text"], "image": None, "image_url": None, "embedding_input": None, "modality": "image",
    "num_images": 3, "indice_name": "assets", "num_result_ids": 8, "use_mclip": False, "deduplicate": False,
    "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": ""})).json()
out["metadata"] = requests.post(url + "/metadata", headers=plain,
                                data=json.dumps({"ids": [4, 0], "indice_name": "assets"})).json()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def clip_client_py() -> Path:
    """clip_retrieval/clip_client.py of the clip-retrieval wheel the test command installs with --no-deps
    (the package's own __init__ imports heavy dependencies the client does not need: it is never imported)."""
    from importlib.metadata import distribution

    path = Path(distribution("clip-retrieval").locate_file("clip_retrieval/clip_client.py"))
    assert path.is_file(), path
    return path


def ranked(vectors: np.ndarray, query: np.ndarray) -> tuple[list[int], np.ndarray]:
    scores = vectors @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")
    return order.tolist(), scores[order]


@pytest.fixture(params=["torch", "onnx"])
def runtime_server(request):
    """The server with each runtime (``--runtime onnx``: ``onnx_server``) and its score tolerance against the
    torch model: the client must not tell them apart."""
    return request.getfixturevalue("server" if request.param == "torch" else "onnx_server"), ATOL[request.param]


def test_clip_retrieval_client_queries_mmlm_serve(runtime_server, indexes, reference, clip_client_py, run_client,
                                                  tmp_path):  # fmt: skip
    server, atol = runtime_server
    images = indexes.assets.embeddings("image")
    query = {"text": "a rocket on its launch pad", "image": str(ASSETS / "images" / "rocket.jpg"),
             "embedding": np.random.default_rng(1).standard_normal(32).tolist(),
             "copy": str(ASSETS / "images" / "astronaut.jpg")}  # fmt: skip
    params = json.dumps({"module": str(clip_client_py), "url": server.url, "query": query})
    out = run_client(f"PARAMS = {params!r}\n" + CLIENT, cwd=tmp_path)
    assert out["module"] == str(clip_client_py)
    paths = list(reference.items)

    for key, vector in (("text", reference.text([query["text"]])[0]), ("embedding", np.array(query["embedding"]))):
        ids, scores = ranked(images, vector)
        assert [r["id"] for r in out[key]] == ids
        np.testing.assert_allclose([r["similarity"] for r in out[key]], scores, atol=atol)
    rocket = paths.index("images/rocket.jpg")
    assert out["image"][0]["id"] == rocket and out["image"][0]["similarity"] == pytest.approx(1.0, abs=atol)
    assert [r["id"] for r in out["image"]] == ranked(images, images[rocket])[0]
    for result in out["text"]:  # clip-retrieval's schema: metadata columns, caption, url, id, similarity
        path = paths[result["id"]]
        assert result["caption"] == reference.items[path][0] and result["filepath"] == path
        assert result["url"] == f"{server.url}/items/assets/{result['id']}/image"
        assert set(result) == {"id", "similarity", "caption", "url", "filepath", "title"}

    best: dict[int, float] = {}
    texts = indexes.assets.embeddings("text") @ images[rocket]
    for item, score in zip(indexes.assets.text_ids.tolist(), texts.tolist()):
        best[item] = max(best.get(item, -2.0), score)
    assert [r["id"] for r in out["image_on_captions"]] == sorted(best, key=lambda i: -best[i])[:5]

    dups = indexes.dups.embeddings("image")
    order = [r["id"] for r in out["all_dups"]]  # the two copies tie: the server's order, checked against numpy
    assert sorted(order[:2]) == [0, 1] and order[2:] == ranked(dups, dups[0])[0][2:]
    kept = [r["id"] for r in out["defaults"]]
    for pos, item in enumerate(order):  # deduplicate: kept unless within cosine 0.94 of a better kept one
        assert (item in kept) == (not [k for k in order[:pos] if k in kept and dups[k] @ dups[item] >= 0.94])
    assert len(kept) < 4 and kept[0] in (0, 1)

    assert out["indices"] == ["assets", "dups"]
    front_ids, _ = ranked(images, reference.text([query["text"]])[0])
    assert [r["id"] for r in out["front"]] == front_ids[:8]  # num_result_ids results ...
    assert [("caption" in r) for r in out["front"]] == [True] * 3 + [False] * 5  # ... metadata on num_images
    assert [m["id"] for m in out["metadata"]] == [4, 0]
    assert out["metadata"][0]["metadata"]["caption"] == reference.items[paths[4]][0]

