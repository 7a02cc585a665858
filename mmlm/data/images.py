"""Image files read without torch: what a bad one is (``Skip`` and its image reasons) and ``load_image``.

Apart from ``mmlm.data.skips`` (which counts skips through torch's data loaders) so that the serving path,
which decodes uploads and item files with the same rules, imports Pillow and nothing heavier.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from io import BytesIO

from PIL import Image

# torchvision's IMG_EXTENSIONS (torchvision.datasets.folder), repeated so that reading a file needs no torch
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# the reasons an image is skipped; mmlm.data.skips has the others
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
CORRUPT_IMAGE = "corrupt_image"  # unreadable, truncated or not an image at all
DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than PIL.Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class Skip:
    """What a dataset returns instead of a sample it cannot use."""

    reason: str
    path: str
    detail: str = ""


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image | Skip:
    """An RGB PIL image from a path or encoded bytes, or the Skip that says why not.

    The pixel limit is Pillow's own ``Image.MAX_IMAGE_PIXELS``: Pillow only warns
    between 1x and 2x the limit, so that warning is turned into a skip too.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if not isinstance(source, bytes):
        try:
            size = os.path.getsize(source)
        except FileNotFoundError:
            return Skip(MISSING_FILE, name)
        except OSError as e:
            return Skip(MISSING_FILE, name, str(e))
        if size == 0:
            return Skip(EMPTY_FILE, name)
    elif len(source) == 0:
        return Skip(EMPTY_FILE, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(BytesIO(source) if isinstance(source, bytes) else source) as im:
                im.load()  # decode now: a truncated file fails here, not inside a transform
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Skip(DECOMPRESSION_BOMB, name, str(e))
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a bad sample, not a crash
        return Skip(CORRUPT_IMAGE, name, f"{type(e).__name__}: {e}")
