"""Images a client sends: base64 decoded, the header checked (format, pixels) before a pixel is decoded, and
``image_url`` fetched only from the addresses the server allows, or, when it names one of this server's own
items, never fetched at all. Items whose data has pixels but no files (digits) are rendered as PNG. Each step is
a plain function that raises ``HTTPException``; the routes run the heavy ones on a pool thread, off the event
loop."""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from io import BytesIO
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from PIL import Image, UnidentifiedImageError

import mmlm
from mmlm.data.digit_scans import DigitScans, digit_scans
from mmlm.data.images import DECOMPRESSION_BOMB, Skip, load_image
from mmlm.data.sources import is_digits
from mmlm.serve.served import Served

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # decoders exposed to uploads (no TIFF, PSD, ...)
INLINE_BASE64 = 64 * 1024  # characters decoded on the event loop (tens of microseconds); more go to a thread
DIGIT_SIDE = 128  # a rendered digit: bicubic from its 8x8 scan as the index's (at 32 px), large enough to look at
ITEM_PATH = re.compile(r"items/([A-Za-z0-9._-]+)/([0-9]{1,19})/image")  # ``item_image``'s path, under the root


def b64decode(text: str) -> bytes:
    if text.startswith("data:"):  # a data URL, as browsers' FileReader makes them
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "image: not valid base64") from None


async def b64decode_async(text: str) -> bytes:
    """``b64decode``; a large upload (up to the body limit, 10 MiB) on a pool thread, so the event loop
    keeps answering other requests meanwhile."""
    return b64decode(text) if len(text) <= INLINE_BASE64 else await run_in_threadpool(b64decode, text)


def read_image(data: bytes, max_pixels: int) -> Image.Image:
    """The uploaded image, its format and pixel count checked from the header before a pixel is decoded."""
    try:
        with Image.open(BytesIO(data), formats=IMAGE_FORMATS) as probe:
            width, height = probe.size
    except UnidentifiedImageError:
        formats = ", ".join(IMAGE_FORMATS)
        raise HTTPException(415, f"image: not a file in a format this server reads ({formats})") from None
    except Image.DecompressionBombError as e:  # Pillow refuses to open past twice its own pixel limit
        raise HTTPException(413, f"image: {e}") from None
    except Exception as e:  # noqa: BLE001 -- any parser failure on a header is the upload's fault
        raise HTTPException(400, f"image: unreadable header ({type(e).__name__}: {e})") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"image of {width}x{height} = {width * height:,} pixels; "
                                 f"the limit is {max_pixels:,}")  # fmt: skip
    image = load_image(data, "upload")
    if isinstance(image, Skip):
        status = 413 if image.reason == DECOMPRESSION_BOMB else 400
        raise HTTPException(status, f"image: {image.reason.replace('_', ' ')} ({image.detail[:200]})")
    return image


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a redirect could leave the allowed addresses
        return None


def fetch_image(url: str, allow: Sequence[str], max_bytes: int) -> bytes:
    """``image_url``'s bytes, only from an address that starts with an allowed one (same scheme, host and
    port, path prefix), without redirects: the server must not become a proxy into its own network."""
    parts = urlsplit(url)
    inside = any(parts.scheme == a.scheme and parts.netloc == a.netloc and parts.path.startswith(a.path)
                 for a in map(urlsplit, allow))  # fmt: skip
    climbs = any(segment in (".", "..") for segment in unquote(parts.path).split("/"))  # back out of the prefix
    if not inside or climbs or parts.scheme not in ("http", "https"):
        why = "is off on this server" if not allow else f"may only name addresses under {', '.join(allow)}"
        raise HTTPException(403, f"image_url {why}; send the image itself (base64 in 'image')")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"mmlm-serve/{mmlm.__version__}"})
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # InvalidURL: a space, \r\n
        raise HTTPException(400, f"image_url: could not fetch it ({e})") from None
    if len(data) > max_bytes:
        raise HTTPException(413, f"image_url: larger than {max_bytes:,} bytes")
    return data


def own_item(url: str, base_url: str) -> tuple[str, int] | None:
    """``(index, id)`` when ``url`` is this server's ``/items/{index}/{id}/image`` (as its answers write it,
    ``base_url`` being the request's, root path included; or that path without scheme and host), else None.
    Such a URL is answered from the index, so it needs neither a fetch nor ``--image_url_allow``."""
    parts, base = urlsplit(url), urlsplit(base_url)
    if (parts.scheme or parts.netloc) and (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
        return None
    root = base.path if base.path.endswith("/") else base.path + "/"
    found = ITEM_PATH.fullmatch(parts.path.removeprefix(root)) if parts.path.startswith(root) else None
    return (found.group(1), int(found.group(2))) if found else None


@functools.lru_cache(maxsize=2)
def digits(split: str) -> DigitScans:
    return digit_scans(split, image_size=DIGIT_SIDE)  # type: ignore[arg-type]


def digits_build(s: Served, item: int, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The build that embedded the item from pixels without a file (digits: ``meta["index"]`` in its split)."""
    if not isinstance(meta.get("index"), int):
        return None
    return next((b for b in s.index.manifest["builds"]
                 if b["ids"] and b["ids"][0] <= item <= b["ids"][1] and is_digits(b["data"])), None)  # fmt: skip


def rendered(s: Served, item: int, meta: dict[str, Any]) -> bool:
    """Whether ``item_image`` answers the item with its rendered pixels (it has no file)."""
    return digits_build(s, item, meta) is not None


def render_png(s: Served, item: int, meta: dict[str, Any]) -> bytes | None:
    """The item's pixels as a PNG (digits, ink dark on white), None for an item without such pixels."""
    build = digits_build(s, item, meta)
    if build is None:
        return None
    out = BytesIO()
    digits(build["split"]).image(meta["index"]).save(out, "PNG")
    return out.getvalue()


def item_bytes(s: Served, item: int, meta: dict[str, Any]) -> bytes | None:
    """The item's picture as a file's bytes: its image file, or its rendered pixels; None when it has neither."""
    path = s.image_file(item, meta)
    return path.read_bytes() if path is not None else render_png(s, item, meta)
