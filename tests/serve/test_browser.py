"""The web page in headless Chromium (Debian's ``chromium``, driven by Playwright): a typed query shows
the API's hits as loaded thumbnails, "where?" toggles a result between its picture and its heatmap (with a
legend), a click searches by that picture, a dropped file searches by itself and is shown as the query;
nothing is fetched from anywhere but the server. Leaves a screenshot in tmp_path."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from mmlm.paths import ASSETS
from mmlm.retrieval.client import parse_query

pytestmark = [pytest.mark.server, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"  # Debian's package: Playwright's own browser download is not reachable


@contextmanager
def browsing(url: str, errors: list[str], console: bool = False) -> Iterator[Page]:
    """A page of Chromium at ``url``, its script errors (and with ``console``, its console errors) in ``errors``."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("pageerror", lambda e: errors.append(str(e)))
            if console:
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url)
            yield page
        finally:
            browser.close()


def cards(page) -> list[dict]:
    """What the grid shows: id, score text, caption, and whether the thumbnail decoded."""
    return page.eval_on_selector_all("#results figure.card", """cards => cards.map(c => ({
        id: Number(c.dataset.id), score: c.querySelector('.score').textContent,
        caption: c.querySelector('figcaption').textContent,
        loaded: !!c.querySelector('img') && c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0}))""")


def test_page_searches_by_text_click_and_drop(server, tmp_path):
    query = "a rocket on the launch pad"
    expected = server.json("/search", {"text": query, "k": 24, "index": "assets", "modality": "image"})["hits"]
    requested: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("request", lambda r: requested.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server.url + "/")
            expect(page.locator("#index option")).to_have_count(2)
            page.fill("#query", query)
            page.press("#query", "Enter")
            expect(page.locator("#status")).to_contain_text("results for")
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete)")
            shown = cards(page)
            assert [c["id"] for c in shown] == [h["id"] for h in expected]  # the API's hits, in its order
            assert [c["score"] for c in shown] == [f"{h['score']:.3f}" for h in expected]
            assert all(c["loaded"] for c in shown)  # every thumbnail came from /items/.../image and decoded
            assert shown[0]["caption"].endswith(expected[0]["metadata"]["captions"][0])
            expect(page.locator("#query-image")).to_be_hidden()  # a text query has no picture to show

            card = page.locator("#results figure.card").first
            picture = card.locator("img").get_attribute("src")
            card.locator("button.where").click()  # its heatmap, from /explain
            expect(card).to_have_class("card heat")
            expect(card.locator(".legend")).to_be_visible()
            page.wait_for_function("() => document.querySelector('#results img').src.startsWith('blob:')"
                                   " && document.querySelector('#results img').naturalWidth > 0")  # fmt: skip
            assert card.locator("button.where").text_content() == "picture"
            page.screenshot(path=str(tmp_path / "serve.png"))
            card.locator("button.where").click()  # and back to the picture
            expect(card.locator(".legend")).to_be_hidden()
            assert card.locator("img").get_attribute("src") == picture
            assert cards(page)[0]["id"] == shown[0]["id"]  # a toggle is not a search

            clicked = shown[3]["id"]
            page.click(f"#results figure.card[data-id='{clicked}']")
            expect(page.locator("#status")).to_contain_text(f"results for image #{clicked}")
            assert cards(page)[0]["id"] == clicked and cards(page)[0]["score"] == "1.000"
            expect(page.locator("#query-image figcaption")).to_have_text(f"image #{clicked}")
            assert page.locator("#query-image img").get_attribute("src").endswith(f"/items/assets/{clicked}/image")

            page.set_input_files("#file", str(ASSETS / "images" / "coffee_spoon.jpg"))
            expect(page.locator("#status")).to_contain_text("results for coffee_spoon.jpg")
            expect(page.locator("#query-image figcaption")).to_have_text("coffee_spoon.jpg")
            assert page.locator("#query-image img").get_attribute("src").startswith("data:image/jpeg;base64,")
            page.wait_for_function("() => document.querySelector('#query-image img').naturalWidth > 0")
            first = cards(page)[0]
            assert server.json(f"/items/assets/{first['id']}")["filepath"] == "images/coffee_spoon.jpg"
            assert first["score"] == "1.000"
        finally:
            browser.close()
    assert errors == []
    network = [u for u in requested if not u.startswith(("blob:", "data:"))]  # the heatmap, the dropped file
    assert network and all(u.startswith(server.url + "/") for u in network)  # no CDN, nothing else
    assert (tmp_path / "serve.png").stat().st_size > 10_000


QUERIES = ['"2:golden retriever" + pool - fruit', "horse + stripes", "a t-shirt -red", "- fruit", "2:", ".5:'a cat'",
           "#12 - 0.5:#3 + #x", "apple -", "cat + + dog", "+"]  # fmt: skip


def parsed(query: str) -> list[dict] | str:
    try:
        return parse_query(query, lambda path: False)  # the page has no files: every term is text or an item
    except ValueError as e:
        return e.args[0].split(": ", 1)[1]  # the reason, without the query quoted in Python's way


def test_page_combines_terms_picture_and_filter(server, tmp_path):
    """The query box reads rclip's syntax exactly as ``mmlm search`` does (the page's parser against
    ``parse_query`` on the same strings); a combined query, a shown picture plus typed text, the filter box and
    the min-score box give the hits /search gives for the same body."""
    where = {"filepath": {"prefix": "images/c"}}
    photo = ASSETS / "images" / "coffee_spoon.jpg"
    data_url = "data:image/jpeg;base64," + base64.b64encode(photo.read_bytes()).decode()
    errors: list[str] = []
    with browsing(server.url + "/", errors) as page:
        expect(page.locator("#index option")).to_have_count(2)
        for query in QUERIES:
            in_page = page.evaluate("q => { try { return parseQuery(q); } catch (e) { return e.message.split(': ').slice(1).join(': '); } }", query)  # fmt: skip
            assert in_page == parsed(query), query

        page.fill("#where", json.dumps(where))
        page.fill("#query", "2:a cup of coffee - a spoon")
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_contain_text('results for "2:a cup of coffee - a spoon"')
        body = {"index": "assets", "k": 24, "where": where, "terms": parsed("2:a cup of coffee - a spoon")}
        expected = server.json("/search", body)["hits"]
        assert 0 < len(expected) < 21  # the filter kept some photos, not all
        assert [c["id"] for c in cards(page)] == [h["id"] for h in expected]
        assert all(h["metadata"]["filepath"].startswith("images/c") for h in expected)

        page.fill("#min-score", f"{expected[1]['score'] - 1e-4:.4f}")  # the best two are left
        page.press("#query", "Enter")
        expect(page.locator("#results figure.card")).to_have_count(2)
        page.fill("#min-score", "")

        page.set_input_files("#file", str(photo))  # a picture, then text added to it
        expect(page.locator("#status")).to_contain_text("results for coffee_spoon.jpg")
        page.fill("#query", "- a spoon")
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_contain_text('results for coffee_spoon.jpg + "- a spoon"')
        body["terms"] = [{"image": data_url, "weight": 1.0}, *parsed("- a spoon")]
        assert [c["id"] for c in cards(page)] == [h["id"] for h in server.json("/search", body)["hits"]]
        page.click("#clear-image")
        expect(page.locator("#query-image")).to_be_hidden()

        page.fill("#where", "{year")
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_contain_text("filter: not JSON")
        page.fill("#where", '{"colour": 1}')
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_contain_text("colour")  # the server's 422, shown
    assert errors == []


def test_page_works_with_the_onnx_runtime(onnx_server, tmp_path):
    """Text, click and drop through ONNX Runtime; "where?" (``/explain``, which needs the torch runtime) says so."""
    server = onnx_server
    errors: list[str] = []
    with browsing(server.url + "/", errors, console=True) as page:
        expect(page.locator("#index option")).to_have_count(2)
        query = "a rocket on the launch pad"
        expected = server.json("/search", {"text": query, "k": 24, "index": "assets", "modality": "image"})["hits"]
        page.fill("#query", query)
        page.press("#query", "Enter")
        expect(page.locator("#status")).to_contain_text("results for")
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete)")
        shown = cards(page)
        assert [c["id"] for c in shown] == [h["id"] for h in expected] and all(c["loaded"] for c in shown)

        page.locator("#results figure.card").first.locator("button.where").click()
        expect(page.locator("#status")).to_contain_text("--runtime torch")

        clicked = shown[3]["id"]
        page.click(f"#results figure.card[data-id='{clicked}']")
        expect(page.locator("#status")).to_contain_text(f"results for image #{clicked}")
        assert cards(page)[0]["id"] == clicked and cards(page)[0]["score"] == "1.000"

        page.set_input_files("#file", str(ASSETS / "images" / "coffee_spoon.jpg"))
        expect(page.locator("#status")).to_contain_text("results for coffee_spoon.jpg")
        first = cards(page)[0]
        assert server.json(f"/items/assets/{first['id']}")["filepath"] == "images/coffee_spoon.jpg"
        assert first["score"] == "1.000"
    # the refused /explain is the page's one failed request (the browser logs it); nothing else went wrong
    assert [e for e in errors if "status of 400" not in e] == [] and len(errors) == 1, errors


def test_page_asks_for_the_key_and_then_works(keyed_server, tmp_path):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.goto(keyed_server.url + "/")
            expect(page.locator("#key-box")).to_be_visible()  # /indices answered 401
            expect(page.locator("#status")).to_contain_text("API key")
            page.fill("#key", keyed_server.api_key)
            page.press("#key", "Enter")
            page.dispatch_event("#key", "change")
            expect(page.locator("#index option")).to_have_count(1)
            page.fill("#query", "a cup of coffee")
            page.press("#query", "Enter")
            expect(page.locator("#status")).to_contain_text("results for")
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            assert len(cards(page)) == 21  # the whole index (k = 24 > 21): thumbnails fetched with the key

            page.goto(keyed_server.url + f"/?api_key={keyed_server.api_key}")  # or the key in the address
            expect(page.locator("#index option")).to_have_count(1)
            assert "api_key" not in page.url  # taken out of the address bar once read
        finally:
            browser.close()
    log = keyed_server.log.read_text()
    assert keyed_server.api_key not in log and json.dumps(keyed_server.api_key) not in log
    assert Path(tmp_path).is_dir()
