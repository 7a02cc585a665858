"""``OnnxEncoder``: an ``mmlm convert --to onnx`` folder (``mmlm.export.onnx``) as an encoder, without torch.

::

    enc = OnnxEncoder.open("clip-onnx")
    enc.encode_text(["a photo of a cat"])                 # (1, D) float32, unit rows
    enc.encode_image(enc.preprocess(Image.open(p))[None])  # (1, D)

It gives mmlm's embeddings (within 1e-4 in float32): the tokenizer file carries mmlm's truncation (the end
token kept) and padding, ``preprocess`` is mmlm's eval image transform redone with Pillow and NumPy, and
CLIP's text clean-up (ftfy + html) runs when ``onnx.json`` says ``"clean": "clip"``.

Only NumPy, ONNX Runtime, ``tokenizers``, Pillow, ftfy (for CLIP's clean-up) and the standard library are
imported: never torch, nor an mmlm module that imports it (a test checks ``sys.modules``).
"""

from __future__ import annotations

import html
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

FORMAT, VERSION = "mmlm-onnx", 1  # what mmlm.export.onnx writes; kept here so no torch module is imported
FILES = ("onnx.json", "image.onnx", "text.onnx", "tokenizer.json", "preprocess.json")
# onnx.json's fields the encoder reads, and their types (a bool is no int here)
FIELDS: dict[str, tuple[type, ...]] = {
    "embed_dim": (int,),
    "image_size": (int,),
    "context_length": (int,),
    "pad_token_id": (int,),
    "weights_hash": (str,),
    "int8": (bool,),
    "logit_scale": (float, int),
}
CLEANS = (None, "clip")
PREPROCESS: dict[str, tuple[type, ...]] = {
    "size": (int,),
    "crop_size": (list,),
    "interpolation": (str,),
    "channel_mode": (str,),
    "mean": (list,),
    "std": (list,),
}
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class OnnxEncoder:
    """Texts and images -> L2-normalised float32 embeddings (B, D), through ONNX Runtime. Use ``open``."""

    def __init__(
        self,
        folder: Path,
        meta: dict[str, Any],
        preprocess_cfg: dict[str, Any],
        tokenizer: Tokenizer,
        image: ort.InferenceSession | None,
        text: ort.InferenceSession,
        options: ort.SessionOptions | None = None,
    ) -> None:
        self.folder = folder
        self.meta = meta
        self.preprocess_cfg = preprocess_cfg
        self.tokenizer = tokenizer
        self._image, self._options, self._lock = image, options or ort.SessionOptions(), threading.Lock()
        self.text_session = text

    @property
    def image_session(self) -> ort.InferenceSession:
        """The image graph's session, built here on first use when ``open`` was told ``lazy_image``."""
        with self._lock:
            if self._image is None:
                self._image = _session(self.folder / "image.onnx", self._options)
            return self._image

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, folder: str | Path, threads: int | None = None, lazy_image: bool = False) -> OnnxEncoder:
        """Read and check ``folder``; ``threads``: ONNX Runtime's intra-op threads (None: its default, the cores).
        ``lazy_image``: the image graph's session is built by the first ``encode_image`` (ViT-B/32: 0.5 s and
        ~330 MiB), as immich's machine-learning service loads a model on first use: a server that only ever gets
        text queries never holds the image tower, and one that does answers its first text query sooner.

        A folder that is not an ``mmlm-onnx`` version-1 export is refused in one line naming the file and
        field (ValueError; FileNotFoundError for a missing file).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (an `mmlm convert --to onnx` output)")
        for name in FILES:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: {folder} is not a complete mmlm ONNX export")
        meta = _read_json(folder / "onnx.json")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / 'onnx.json'}: format is {meta.get('format')!r}, not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise ValueError(
                f"{folder / 'onnx.json'}: version {meta.get('version')!r} is not {VERSION}, the one this mmlm reads: "
                "export the model again with this mmlm"
            )
        _check_fields(folder / "onnx.json", meta, FIELDS)
        if meta.get("clean") not in CLEANS:
            raise ValueError(f"{folder / 'onnx.json'}: clean is {meta.get('clean')!r}, not one of {list(CLEANS)}")
        pre = _read_json(folder / "preprocess.json")
        _check_fields(folder / "preprocess.json", pre, PREPROCESS)
        if pre["interpolation"] not in RESAMPLE:
            raise ValueError(
                f"{folder / 'preprocess.json'}: interpolation {pre['interpolation']!r} is not one of {list(RESAMPLE)}"
            )
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises its own Exception type for a file it cannot parse
            raise ValueError(f"{folder / 'tokenizer.json'} is not a tokenizers file: {e}") from None
        if tokenizer.truncation is None:  # a hand-edited file: mmlm's rule is the context length, end token kept
            tokenizer.enable_truncation(meta["context_length"])
        if tokenizer.padding is None:
            tokenizer.enable_padding(pad_id=meta["pad_token_id"])
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # "extended", not ONNX Runtime's default "all": the layout optimisations of "all" doubled the time to load
        # a ViT-B/32's graphs (0.89 s each against 0.47 and 0.50 s, idle 2-core CPU) for no faster query (text,
        # batch 1: 12.9 ms against 12.6 ms)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if lazy_image:  # (its file was found above; ONNX Runtime reads it when the session is built)
            image, text = None, _session(folder / "text.onnx", options)
        else:  # ONNX Runtime optimises a graph as it loads it (most of the time it takes): both at once
            with ThreadPoolExecutor(2) as pool:
                image, text = pool.map(lambda name: _session(folder / f"{name}.onnx", options), ("image", "text"))
        encoder = cls(folder, meta, pre, tokenizer, image, text, options)
        encoder.encode_text(["warm up"])  # ftfy's import and the session's first run, here rather than in a query
        return encoder

    # ---------------------------------------------------------------- facts
    @property
    def dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def weights_hash(self) -> str:
        """``mmlm.factory.weights_hash`` of the float model the folder came from (int8 folders too)."""
        return str(self.meta["weights_hash"])

    # ---------------------------------------------------------------- text
    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """mmlm's ``input_ids`` and ``attention_mask`` (B, T) int64, T = the longest text (context at most)."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of texts, not one string: wrap it as [text]")
        if not texts:
            raise ValueError("cannot tokenise an empty batch")
        if self.meta.get("clean") == "clip":
            texts = [clip_clean(t) for t in texts]
        encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """(B, D) float32 unit rows."""
        return self.text_session.run(["embeds"], self.tokenize(texts))[0]

    # ---------------------------------------------------------------- images
    def preprocess(self, img: Image.Image) -> np.ndarray:
        """(3, S, S) float32: mmlm's eval transform (resize the short side, centre crop, normalise)."""
        cfg = self.preprocess_cfg
        size, (crop_h, crop_w) = int(cfg["size"]), (int(v) for v in cfg["crop_size"])
        img = img.convert(cfg["channel_mode"])
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample=RESAMPLE[cfg["interpolation"]])
        x = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
        if crop_h > x.shape[0] or crop_w > x.shape[1]:  # torchvision pads a small image with zeros first
            dh, dw = max(crop_h - x.shape[0], 0), max(crop_w - x.shape[1], 0)
            x = np.pad(x, ((dh // 2, (dh + 1) // 2), (dw // 2, (dw + 1) // 2), (0, 0)))
        top = int(round((x.shape[0] - crop_h) / 2.0))  # Python's round, as torchvision's centre crop
        left = int(round((x.shape[1] - crop_w) / 2.0))
        x = x[top : top + crop_h, left : left + crop_w].astype(np.float32) * np.float32(1 / 255)
        mean = np.asarray(cfg["mean"], dtype=np.float32)
        std = np.asarray(cfg["std"], dtype=np.float32)
        return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))  # (3, S, S)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) pixels from ``preprocess`` -> (B, D) float32 unit rows."""
        pixels = np.asarray(pixels, dtype=np.float32)
        S = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, S, S):
            hint = "; stack single images as pixels[None]" if pixels.ndim == 3 else ""
            raise ValueError(f"expected pixels of shape (batch, 3, {S}, {S}), got {pixels.shape}{hint}")
        return self.image_session.run(["embeds"], {"pixels": np.ascontiguousarray(pixels)})[0]

    def __repr__(self) -> str:
        kind = "int8" if self.meta.get("int8") else "float32"
        return f"OnnxEncoder({str(self.folder)!r}, dim={self.dim}, image_size={self.image_size}, {kind})"


def clip_clean(text: str) -> str:
    """CLIP's text clean-up as mmlm's tokenizer runs it (ftfy, html unescaped twice, whitespace collapsed);
    the lower-casing is in ``tokenizer.json``'s normaliser."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def _session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types, for a file it cannot load
        raise ValueError(f"{path} is not an ONNX graph ONNX Runtime can load: {' '.join(str(e).split())}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(found, dict):
        raise ValueError(f"{path} holds a {type(found).__name__}, not a JSON object")
    return found


def _check_fields(path: Path, found: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> None:
    for name, types in fields.items():
        value = found.get(name)
        if value is None or isinstance(value, bool) is not (bool in types) or not isinstance(value, types):
            wanted = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{path}: field {name!r} is {value!r}, expected {wanted}")
