"""clip-retrieval's own web front end (its wheel's ``front/build``) served by ``mmlm serve --clip_front``:
its ``config.json`` points it at the server; "search by this image" sends the server's own item URL, answered
from the stored embedding without a fetch; items without an image file (digits) get a rendered PNG ``url``
(shown by mmlm's own page too); an index folder ``x.index`` serves as ``x``. In this process with TestClient, then the real front end in
headless Chromium (Debian's ``chromium``, driven by Playwright) against a real server process."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from _inprocess import serving
from _process import start_server, stop_server
from _ranking import ATOL, brute_force, item_of
from fastapi.testclient import TestClient
from PIL import Image

from mmlm.data.digits import digits_image_text
from mmlm.errors import UsageError
from mmlm.retrieval import build_index
from mmlm.serve.app import create_app
from mmlm.serve.command import clip_front_folder, serve
from mmlm.serve.images import DIGIT_SIDE
from mmlm.serve.served import index_names, open_indexes
from mmlm.serve.settings import Settings

CHROMIUM = "/usr/bin/chromium"  # Debian's package: Playwright's own browser download is not reachable
FRONT_BODY = {  # what the front end posts (fetch with a string body: text/plain), less the query itself
    "image": None, "image_url": None, "embedding_input": None, "modality": "image", "num_images": 40,
    "num_result_ids": 3000, "use_mclip": False, "deduplicate": True, "use_safety_model": True,
    "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": "0.5",
}  # fmt: skip


@pytest.fixture(scope="module")
def digits_index(tmp_path_factory):
    """The 360 held-out digits (no image files: their pixels live in scikit-learn), in a folder ``digits.index``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        index = build_index("clip-tiny", "digits", tmp_path_factory.mktemp("digits") / "digits.index",
                            batch_size=64, accelerator="cpu")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    yield index
    index.close()


@pytest.fixture(scope="module")
def api(indexes, digits_index):
    folders = {"assets": str(indexes.assets.folder), "dups": str(indexes.dups.folder),
               "digits": str(digits_index.folder)}  # fmt: skip
    with serving(folders, clip_front=clip_front_folder()) as a:
        yield a


def knn(api, **query) -> list[dict]:
    status, answer = api.post("/knn-service", {**FRONT_BODY, "indice_name": "assets", **query},
                              content_type="text/plain;charset=UTF-8")  # fmt: skip
    assert status == 200, answer
    return answer


def test_own_item_url_searches_by_the_stored_embedding(api, indexes):
    images = indexes.assets.embeddings("image")
    rocket = item_of("rocket.jpg")
    expected, scores = brute_force(images, images[rocket], 21)
    for url in (f"http://testserver/items/assets/{rocket}/image", f"/items/assets/{rocket}/image"):
        out = knn(api, image_url=url, num_images=21, num_result_ids=21, deduplicate=False)
        assert [r["id"] for r in out] == expected.tolist()
        np.testing.assert_allclose([r["similarity"] for r in out], scores, atol=ATOL)
        assert out[0]["url"] == f"http://testserver/items/assets/{rocket}/image"
    # another index of the same model: the assets photo's stored vector searches the dups folder
    dups = indexes.dups.embeddings("image")
    out = knn(api, image_url=f"/items/assets/{rocket}/image", indice_name="dups", deduplicate=False)
    ids, scores = brute_force(dups, images[rocket], 4)  # a.jpg and b.jpg are copies: they tie, in either order
    np.testing.assert_allclose([r["similarity"] for r in out], scores, atol=ATOL)
    assert out[0]["id"] == ids[0] == 3 and sorted(r["id"] for r in out) == [0, 1, 2, 3]  # 3: the rocket's link


def test_other_image_urls_stay_refused(api):
    for url in ("http://elsewhere.example/items/assets/1/image", "http://testserver/items/assets/1/image/../../x",
                "http://testserver/static/app.js"):  # fmt: skip
        status, answer = api.post("/knn-service", {"image_url": url, "indice_name": "assets"})
        assert status == 403 and "image_url" in answer["detail"], (url, answer)
    status, answer = api.post("/knn-service", {"image_url": "/items/assets/9999/image"})
    assert status == 404 and "no item 9999" in answer["detail"]
    status, answer = api.post("/knn-service", {"image_url": "/items/nope/1/image"})
    assert status == 404 and "no index 'nope'" in answer["detail"]


def test_digits_carry_a_rendered_image_url(api, digits_index):
    out = knn(
        api, text="a handwritten seven", indice_name="digits", num_images=5, num_result_ids=10, deduplicate=False
    )  # clip-tiny's digit embeddings are all within cosine 0.94 of one another
    assert [bool(r.get("url")) for r in out] == [True] * 5 + [False] * 5  # metadata on num_images only
    held_out = digits_image_text("test", image_size=DIGIT_SIDE)
    for r in out[:5]:
        assert r["url"] == f"http://testserver/items/digits/{r['id']}/image"
        status, headers, data = api.request("GET", r["url"])
        assert status == 200 and headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(data))
        assert picture.size == (DIGIT_SIDE, DIGIT_SIDE)
        np.testing.assert_array_equal(np.asarray(picture), np.asarray(held_out.image(r["index"])))
    meta = api.json("/metadata", {"ids": [out[7]["id"]], "indice_name": "digits"})
    assert meta[0]["metadata"]["url"] == f"http://testserver/items/digits/{out[7]['id']}/image"
    # and a rendered digit searches its own index: itself first
    first = knn(api, image_url=out[0]["url"], indice_name="digits", deduplicate=False, num_result_ids=None)[0]
    assert first["id"] == out[0]["id"] and first["similarity"] == pytest.approx(1.0, abs=ATOL)


def test_front_end_files_and_config(api):
    config = api.json("/clip-front/config.json")
    assert config == {"defaultBackend": "", "defaultIndex": "assets", "urlColumn": "url"}
    status, page = api.get("/clip-front/")
    assert status == 200 and b"<clip-front></clip-front>" in page
    script = next(p.name for p in clip_front_folder().glob("main.*.js"))
    status, _, data = api.request("GET", f"/clip-front/{script}")
    assert status == 200 and b"knn-service" in data
    status, _, data = api.request("GET", "/clip-front/vendor/webcomponents-loader.js")
    assert status == 200 and data.startswith(b"//")
    status, _, _ = api.request("GET", "/clip-front")
    assert status == 200  # redirected to the folder, whose relative paths need the slash


def test_behind_a_proxy_prefix(indexes):
    """Under ``--root_path /api`` the front end's back end is ``/api``, and the item URLs the answers carry
    (``/api/items/...``, absolute or not) are still this server's own."""
    app = create_app(Settings(threads=1, clip_front=clip_front_folder()), open_indexes([str(indexes.assets.folder)]))
    with TestClient(app, root_path="/api") as client:
        assert client.get("/clip-front/config.json").json()["defaultBackend"] == "/api"
        rocket = item_of("rocket.jpg")
        for url in (f"http://testserver/api/items/assets/{rocket}/image", f"/api/items/assets/{rocket}/image"):
            out = client.post("/knn-service", json={"image_url": url, "num_images": 1}).json()
            assert out[0]["id"] == rocket and out[0]["url"] == f"http://testserver/api/items/assets/{rocket}/image"
        answer = client.post("/knn-service", json={"image_url": f"/items/assets/{rocket}/image"})
        assert answer.status_code == 403  # outside the prefix: not an address of this server


def test_front_end_is_off_by_default(indexes):
    with serving({"assets": str(indexes.assets.folder)}) as plain:
        assert plain.get("/clip-front/config.json")[0] == 404


def test_index_folders_are_named_without_their_suffix(tmp_path):
    names = [name for name, _ in index_names([str(tmp_path / "photos.index"), f"x={tmp_path / 'y.index'}",
                                              str(tmp_path / "plain"), str(tmp_path / ".index")])]  # fmt: skip
    assert names == ["photos", "x", "plain", ".index"]


def test_clip_front_usage_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("MMLM_API_KEY", raising=False)
    with pytest.raises(UsageError, match="cannot send an API key"):
        serve([tmp_path], clip_front=True, api_key="k")
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UsageError, match="clip-retrieval is not installed"):
        serve([tmp_path], clip_front=True)


# ------------------------------------------------------------------------------ the real front end, in a browser


def pictures(page) -> list[dict]:
    """The result grid inside the front end's shadow root: each picture's address and whether it decoded."""
    return page.evaluate("""() => [...document.querySelector('clip-front').shadowRoot.querySelectorAll('img.pic')]
        .map(i => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth}))""")


def wait_pictures(page, first: str | None = None) -> list[dict]:
    page.wait_for_function("""first => { const pics = [...document.querySelector('clip-front').shadowRoot
        .querySelectorAll('img.pic')]; return pics.length > 0 && pics.every(i => i.complete)
        && (first === null || pics[0].getAttribute('src') === first) }""", arg=first)  # fmt: skip
    return pictures(page)


@pytest.mark.server
@pytest.mark.browser
@pytest.mark.slow
def test_clip_retrieval_front_end_against_mmlm_serve(indexes, digits_index, tmp_path):
    from playwright.sync_api import sync_playwright

    server = start_server([f"assets={indexes.assets.folder}", str(digits_index.folder), "--clip_front"], tmp_path)
    requested: list[str] = []
    errors: list[str] = []
    knn_statuses: list[int] = []
    failed: set[str] = set()
    try:
        query = "a rocket on the launch pad"
        expected = server.json("/knn-service", {**FRONT_BODY, "text": query, "indice_name": "assets",
                                                "deduplicate": False})  # fmt: skip
        assert server.json("/indices-list") == ["assets", "digits"]  # digits.index serves as digits
        digits = server.json("/knn-service", {**FRONT_BODY, "text": "a handwritten seven", "indice_name": "digits",
                                              "deduplicate": False})  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.on("request", lambda r: requested.append(r.url))
                page.on("response", lambda r: knn_statuses.append(r.status) if "knn-service" in r.url else None)
                page.on("response", lambda r: failed.add(r.url) if r.status >= 400 else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto(server.url + "/clip-front/")
                page.wait_for_function("() => document.querySelector('clip-front').shadowRoot"
                                       ".querySelectorAll('option').length > 0")  # fmt: skip
                page.get_by_label("Hide (near) duplicate images").click()  # clip-tiny sees many photos alike
                page.fill("#searchBar", query)  # Playwright's CSS reaches into open shadow roots
                page.press("#searchBar", "Enter")
                shown = wait_pictures(page)
                assert [s["src"] for s in shown] == [r["url"] for r in expected]  # the server's order, all 21
                assert len(shown) == 21 and all(s["loaded"] for s in shown)
                page.screenshot(path=str(tmp_path / "clip-front.png"))

                clicked = shown[3]["src"]
                page.locator("figure").nth(3).hover()  # its buttons show on hover only
                page.locator("figure").nth(3).locator(".subImageSearch").click()
                shown = wait_pictures(page, first=clicked)
                assert shown[0]["src"] == clicked and all(s["loaded"] for s in shown)
                assert "imageUrl=" in page.url  # the front end's own state: an image_url search

                # the address alone: index and query from its query string, searched at once
                page.goto(server.url + "/clip-front/?index=digits&query=a+handwritten+seven")
                wait_pictures(page)
                page.get_by_label("Hide (near) duplicate images").click()  # clip-tiny's digits all look alike
                shown = wait_pictures(page, first=f"{server.url}/items/digits/{digits[0]['id']}/image")
                page.wait_for_function("() => document.querySelector('clip-front').shadowRoot"
                                       ".querySelectorAll('img.pic').length >= 40")  # fmt: skip
                shown = wait_pictures(page)
                urls = [f"{server.url}/items/digits/{r['id']}/image" for r in digits]
                assert len(shown) >= min(40, len(urls)) and [s["src"] for s in shown] == urls[: len(shown)]
                assert all(s["loaded"] and s["width"] == DIGIT_SIDE for s in shown)  # rendered PNGs, not blanks
                page.screenshot(path=str(tmp_path / "clip-front-digits.png"))

                # mmlm's own page shows the same rendered digits (its hits carry no image file URL)
                page.goto(server.url + "/")
                page.select_option("#index", "digits")
                page.fill("#query", "a handwritten seven")
                page.press("#query", "Enter")
                page.wait_for_function("() => document.querySelectorAll('#results img').length === 24 && [...document"
                                       ".querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)")  # fmt: skip
                widths = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.naturalWidth)")
                assert widths == [DIGIT_SIDE] * 24 and page.locator("#results .no-image").count() == 0
            finally:
                browser.close()
    finally:
        stop_server(server)
    assert failed <= {server.url + "/favicon.ico"}  # the browser's own guess, not the front end's
    assert [e for e in errors if not e.startswith("Failed to load resource")] == []
    assert knn_statuses and set(knn_statuses) == {200}
    assert requested and all(u.startswith(server.url + "/") for u in requested)  # same origin: no CORS needed
    assert (tmp_path / "clip-front.png").stat().st_size > 10_000
