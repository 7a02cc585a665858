"""The hostile and broken requests the API must refuse, each with the exact 4xx it must get: one list, sent
in-process (test_contract.py) and over the wire to real servers (test_fuzz.py)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

from PIL import Image

from mmlm.paths import ASSETS

JSON = {"Content-Type": "application/json"}


def png(width: int, height: int, rows: bytes = b"\0") -> bytes:
    """A PNG whose header says ``width`` x ``height`` (grey, 8 bit), with ``rows`` as its pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, format: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cases() -> list[tuple[str, str, str, bytes | None, dict, int]]:
    """(name, method, path, body, headers, status): what each hostile request must be answered."""
    photo = Image.open(ASSETS / "images" / "rocket.jpg").convert("RGB")
    whole = encoded(photo, "PNG")
    bomb = png(30_000, 30_000, b"\0" * 30_001)  # 900 megapixels in a 100-byte file: one row of data
    big = encoded(Image.new("L", (8000, 6250)), "PNG")  # 50 megapixels, a real file
    def search(**body) -> bytes:
        return json.dumps({"k": 3, **body}).encode()

    vector = [0.1] * 32
    out = [
        ("bad base64", "POST", "/search", search(image="!!not base64!!"), JSON, 400),
        ("non-ascii base64", "POST", "/search", search(image="ünïcode"), JSON, 400),
        ("truncated PNG", "POST", "/search", search(image=b64(whole[: len(whole) // 2])), JSON, 400),
        ("50-megapixel image", "POST", "/search", search(image=b64(big)), JSON, 413),
        ("decompression bomb", "POST", "/search", search(image=b64(bomb)), JSON, 413),
        ("TIFF (not a served format)", "POST", "/search", search(image=b64(encoded(photo, "TIFF"))), JSON, 415),
        ("not an image", "POST", "/search", search(image=b64(b"%PDF-1.4 " * 100)), JSON, 415),
        ("empty image", "POST", "/search", search(image=""), JSON, 415),
        ("1 MB text", "POST", "/search", search(text="a" * 2**20), JSON, 422),
        ("empty text", "POST", "/search", search(text="   "), JSON, 422),
        ("11 MB body", "POST", "/search", search(text="a" * 11 * 2**20), JSON, 413),
        ("NaN embedding", "POST", "/search", b'{"embedding": [NaN' + b", 0.1" * 31 + b"]}", JSON, 422),
        ("inf embedding", "POST", "/search", b'{"embedding": [Infinity' + b", 0.1" * 31 + b"]}", JSON, 422),
        ("-inf embedding", "POST", "/search", b'{"embedding": [-Infinity' + b", 0.1" * 31 + b"]}", JSON, 422),
        ("short embedding", "POST", "/search", search(embedding=vector[:31]), JSON, 422),
        ("long embedding", "POST", "/search", search(embedding=vector + [0.1]), JSON, 422),
        ("zero embedding", "POST", "/search", search(embedding=[0.0] * 32), JSON, 422),
        ("text in embedding", "POST", "/search", search(embedding=["a"] * 32), JSON, 422),
        ("nested embedding", "POST", "/search", search(embedding=[vector]), JSON, 422),
        ("k = 0", "POST", "/search", search(text="a", k=0), JSON, 422),
        ("k = -1", "POST", "/search", search(text="a", k=-1), JSON, 422),
        ("k = 10^9", "POST", "/search", search(text="a", k=10**9), JSON, 422),
        ("k = 10^30", "POST", "/search", search(text="a", k=10**30), JSON, 422),
        ("k = 1.5", "POST", "/search", search(text="a", k=1.5), JSON, 422),
        ("offset past the limit", "POST", "/search", search(text="a", offset=10_000), JSON, 422),
        ("negative offset", "POST", "/search", search(text="a", offset=-1), JSON, 422),
        ("item out of range", "POST", "/search", search(item=21), JSON, 404),
        ("item past int64", "POST", "/search", search(item=2**64), JSON, 422),
        ("two queries", "POST", "/search", search(text="a", embedding=vector), JSON, 422),
        ("no query", "POST", "/search", search(), JSON, 422),
        ("unknown field", "POST", "/search", search(text="a", sql="drop table"), JSON, 422),
        ("unknown modality", "POST", "/search", search(text="a", modality="audio"), JSON, 422),
        ("unknown index", "POST", "/search", search(text="a", index="nope"), JSON, 404),
        ("../ as index", "POST", "/search", search(text="a", index="../../etc"), JSON, 404),
        ("text/plain", "POST", "/search", search(text="a"), {"Content-Type": "text/plain"}, 415),
        ("form", "POST", "/search", b"text=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("multipart", "POST", "/search", b"--x\r\n\r\na\r\n--x--", {"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ("XML", "POST", "/embed", b"<text>a</text>", {"Content-Type": "application/xml"}, 415),
        ("invalid JSON", "POST", "/search", b'{"text": ', JSON, 422),
        ("JSON list", "POST", "/search", b"[1, 2]", JSON, 422),
        ("deep JSON", "POST", "/search", b"[" * 100_000 + b"]" * 100_000, JSON, 400),
        ("invalid UTF-8", "POST", "/search", b'{"text": "\xff\xfe"}', JSON, 400),
        ("empty body", "POST", "/search", b"", JSON, 422),
        ("embed two inputs", "POST", "/embed", json.dumps({"text": "a", "image": b64(whole)}).encode(), JSON, 422),
        ("embed unknown index", "POST", "/embed", json.dumps({"text": "a", "index": "nope"}).encode(), JSON, 404),
        ("item ../", "GET", "/items/assets/../../etc/passwd", None, {}, 404),
        ("item id ..%2F", "GET", "/items/assets/..%2F..%2Fetc%2Fpasswd/image", None, {}, 404),
        ("index ..%2F", "GET", "/items/..%2F..%2Fetc/1/image", None, {}, 404),
        ("item path after id", "GET", "/items/assets/1/..%2F..%2Fserver.py", None, {}, 404),
        ("negative item", "GET", "/items/assets/-1", None, {}, 422),
        ("item past int64", "GET", f"/items/assets/{2**64}/image", None, {}, 422),
        ("item out of range", "GET", "/items/assets/21/image", None, {}, 404),
        ("unknown index items", "GET", "/items/nope/1", None, {}, 404),
        ("static ../", "GET", "/static/../server.py", None, {}, 404),
        ("static ..%2F", "GET", "/static/..%2Fserver.py", None, {}, 404),
        ("knn unknown index", "POST", "/knn-service", json.dumps({"text": "a", "indice_name": "nope"}).encode(), {}, 404),
        ("knn num_images 0", "POST", "/knn-service", json.dumps({"text": "a", "num_images": 0}).encode(), {}, 422),
        ("knn num_result_ids 10^9", "POST", "/knn-service",
         json.dumps({"text": "a", "num_result_ids": 10**9}).encode(), {}, 422),
        ("knn no query", "POST", "/knn-service", json.dumps({"text": ""}).encode(), {}, 422),
        ("knn image_url file://", "POST", "/knn-service", json.dumps({"image_url": "file:///etc/passwd"}).encode(), {}, 403),
        ("knn form", "POST", "/knn-service", b"text=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("knn NaN", "POST", "/knn-service", b'{"embedding_input": [NaN' + b", 0.1" * 31 + b"]}", {}, 422),
        ("metadata negative id", "POST", "/metadata", json.dumps({"ids": [-1]}).encode(), {}, 422),
        ("metadata huge id", "POST", "/metadata", json.dumps({"ids": [2**70]}).encode(), {}, 422),
        ("metadata too many ids", "POST", "/metadata", json.dumps({"ids": list(range(10_001))}).encode(), {}, 422),
        ("metadata unknown index", "POST", "/metadata", json.dumps({"ids": [1], "indice_name": "x"}).encode(), {}, 404),
        ("explain no text", "POST", "/explain", json.dumps({"text": "", "item": 1}).encode(), JSON, 422),
        ("explain unknown item", "POST", "/explain", json.dumps({"text": "a", "item": 99}).encode(), JSON, 404),
        ("explain bad method", "POST", "/explain", json.dumps({"text": "a", "item": 1, "method": "x"}).encode(), JSON, 422),
        ("GET on a POST route", "GET", "/search", None, {}, 405),
        ("unknown path", "GET", "/admin", None, {}, 404),
    ]
    return out


OPEN_ONLY = [  # cases that need the open server: its dups index, its refusal of every image_url
    ("knn image_url (off)", "POST", "/knn-service",
     json.dumps({"image_url": "http://127.0.0.1:9/x.jpg", "indice_name": "assets"}).encode(), {}, 403),
    ("symlink out of the data folder", "GET", "/items/dups/{link}/image", None, {}, 404),
    ("dups has no captions", "POST", "/search", json.dumps({"text": "a", "index": "dups", "modality": "text"}).encode(),
     JSON, 400),
]  # fmt: skip
