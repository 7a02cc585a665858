"""mmlm CLIP -> a folder any ONNX Runtime (Python, C++, C#, Java, JavaScript, Rust, ...) can embed with.

=====================  ===================================================================================
file                   what it holds
=====================  ===================================================================================
``image.onnx``         ``pixels`` float32 (batch, 3, H, W) -> ``embeds`` float32 (batch, D); the projection
                       and the L2 normalisation are inside the graph; dynamic batch
``text.onnx``          ``input_ids``, ``attention_mask`` int64 (batch, seq) -> ``embeds`` float32 (batch, D),
                       normalised; dynamic batch and sequence (right padding, as the tokenizer pads)
``*.onnx.data``        each graph's weights, as ONNX external data (``EXTERNAL``)
``tokenizer.json``     the model's tokenizer in HF ``tokenizers`` format, with its truncation (context
                       length, end token kept) and its padding (to the longest text) switched on: any
                       ``tokenizers`` binding's ``encode_batch`` gives the ids and mask the graph takes
``preprocess.json``    mmlm's eval image transform as numbers (``PREPROCESS_DOC``)
``onnx.json``          format, version, embed_dim, image_size, context_length, pad_token_id, clean,
                       logit_scale, logit_bias, weights_hash (of the float model, what an index records),
                       int8, source, exporter, opset
=====================  ===================================================================================

``mmlm.serve.runtime.onnx.OnnxEncoder`` reads the folder without torch.

Why the graphs are traced from small wrappers (``ImageGraph``, ``TextGraph``) rather than from
``CLIP.encode_text``: mmlm's text forward validates ids and trims padding columns in Python, from values
(``.tolist()``, ``int(...)``), which a graph cannot hold: torch.export refuses it and TorchScript tracing
would bake one batch's answer in. The wrapper runs the tower's own body (``TextEncoder.states``: embeddings,
the shared blocks, the final norm), its pooling and the projection, with the padding mask always built
(``build_attn_mask(always=True)``), which gives mmlm's numbers for
right-padded batches (the parity tests check it to 1e-4; measured ~1e-6).

Weights go beside each graph as ONNX external data (``image.onnx.data``; any ONNX Runtime finds it next to
the graph), not inside it: ONNX Runtime then memory-maps them instead of parsing them out of one protobuf, and
frees what it repacks for its matrix products. Measured on a ViT-B/32-size CLIP (2-core CPU, one thread,
load average ~2): the text graph loads in 0.31-0.42 s instead of 0.89 s and holds 172 MiB instead of 367 MiB
(the token embedding stays on disk but for the rows a query reads); both graphs 0.80 s and 505 MiB instead of
1.62 s and 690 MiB; query times unchanged. The int8 graphs: 153 MiB instead of 195 MiB.

The exporter, by measurement (``torch.onnx.export``, torch 2.14.1, onnxscript 0.7.2, opset 18, on this
shared 2-core CPU; parity = max |ONNX Runtime - mmlm| over both towers at batches 1 and 7; the ViT-B/32
load and run times were measured interleaved in one process, two rounds, under a load average of ~8):

=============  =================  ==========  ======  ==========  ===================  =====================
model          exporter           export (s)  parity  files (MB)  ORT load text/image  p50 text / image (b1)
=============  =================  ==========  ======  ==========  ===================  =====================
clip-tiny      TorchScript        2.1         3.4e-7  13.6        0.1 s                0.4 ms
clip-tiny      dynamo+onnxscript  12.1        3.4e-7  13.8        0.1 s                0.3 ms
ViT-B/32 CLIP  TorchScript        9.5         1.8e-7  605.4       2.0-2.3 / 1.6-1.8 s  85-126 / 604-735 ms
ViT-B/32 CLIP  dynamo+onnxscript  96.7-177    1.9e-7  606.7       2.3-3.0 / 1.2-1.8 s  111-203 / 724-768 ms
=============  =================  ==========  ======  ==========  ===================  =====================

Both are exact and their graphs load and run alike (within this machine's noise); TorchScript
(``dynamo=False``) exports 6-10x faster, so it is the one used. ``DYNAMO`` switches; a slow test keeps the
dynamo path exact, for the day torch drops TorchScript.

int8 (``--int8``): ONNX Runtime's ``quantize_dynamic`` on the exported float graphs (8-bit weights of
MatMul / Gemm per channel, activations quantized per batch at run time, as ``mmlm quantize`` does in torch);
``weights_hash`` stays the float model's, so an index built from the float model accepts either folder.
Measured: a ViT-B/32 CLIP's files 605 -> 147 MB; cosine to float32 >= 0.999 for the bundled photos and
captions; zero-shot accuracy on the 360 held-out digits of the main job's model (200 steps) 71.7% in torch,
in ONNX float32 and in ONNX int8 alike.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.convert.common import ConversionError
from mmlm.data.tokenizers import CLIP_VOCAB_SIZE, Tokenizer, clip_tokenizer
from mmlm.layers import build_attn_mask

FORMAT, VERSION = "mmlm-onnx", 1
OPSET = 18
DYNAMO = False  # the exporter the measurement above chose (True: torch.export + onnxscript)
MAX_GRAPH_BYTES = 2**31 - 2**24  # protobuf's 2 GiB, less room for the graph itself
EXTERNAL = 1024  # tensors of at least this many bytes are written to ``NAME.onnx.data`` (onnx's own threshold)
PREPROCESS_DOC = (
    "convert to channel_mode (PIL Image.convert); resize so the short side is `size` and the long side "
    "int(size * long / short) (PIL Image.resize with `interpolation`, PIL's antialiasing filter); centre crop "
    "crop_size, top = round((h - crop) / 2) and left = round((w - crop) / 2) with Python's round (half to even); "
    "pixels as float32 / 255 in channel order RGB, then (x - mean) / std per channel; layout (3, H, W)"
)


class ImageGraph(nn.Module):
    """``pixels`` (B, 3, H, W) -> L2-normalised ``embeds`` (B, D): what ``image.onnx`` computes."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)  # shape checks only: nothing read from values


class TextGraph(nn.Module):
    """``input_ids``, ``attention_mask`` (B, T) -> L2-normalised ``embeds`` (B, D): ``text.onnx``.

    ``TextEncoder.forward_features`` and ``CLIP.encode_text`` with the padding mask always applied:
    their value checks, column trimming and "no padding, no mask" shortcut are Python decisions on
    values (module docstring), and a right-padded batch needs none of them.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        text = self.clip.text
        keep, is_causal = build_attn_mask(attention_mask, text.cfg.causal, input_ids.shape[1], always=True)
        x = text.states(input_ids, keep, is_causal)  # (B, T, width); eval mode: no dropout
        x = text.pool(x, input_ids, attention_mask)  # (B, width)
        if text.cfg.normalize:
            x = F.normalize(x, dim=-1)
        return F.normalize(self.clip.text_projection(x), dim=-1)


def check_exportable(model: nn.Module) -> None:
    """Raise ``ConversionError`` (one line, naming what does not fit) unless ``model`` can be written."""
    from mmlm.compress.quantize import is_int8
    from mmlm.models import CLIP

    if not isinstance(model, CLIP):
        raise ConversionError(
            f"--to onnx writes two-tower CLIP models (an image and a text tower), not a {type(model).__name__}"
        )
    if is_int8(model):
        raise ConversionError(
            "--to onnx cannot write a torch int8 model (its dynamic int8 Linear layers have no ONNX form): "
            "export the float model and pass --int8 for ONNX Runtime's int8"
        )
    for name, tower in (("image", model.visual), ("text", model.text)):
        size = sum(p.numel() * p.element_size() for p in tower.parameters())
        if size > MAX_GRAPH_BYTES:
            raise ConversionError(
                f"the {name} tower holds {size / 2**30:.1f} GiB of weights: the exporter writes each graph as "
                "one protobuf (under 2 GiB) before its weights move to external data"
            )


def export(
    model: nn.Module,
    folder: Path,
    *,
    tokenizer: Tokenizer | None = None,
    final: Path | None = None,
    int8: bool = False,
    source: str | None = None,
    weights_hash: str | None = None,
    dynamo: bool | None = None,
) -> Path:
    """Write the ONNX folder (module docstring) of the CLIP ``model`` into ``folder``.

    Args:
        tokenizer: the model's tokenizer; None for the CLIP BPE (a text tower with CLIP's 49,408 tokens).
        int8: int8 graphs (``quantize_dynamic``) instead of float32 ones.
        source: the spec the model came from, recorded in ``onnx.json``.
        weights_hash: ``mmlm.factory.weights_hash`` of the float model, computed when None.
        dynamo: the exporter (None: ``DYNAMO``, the measured choice).
    """
    from mmlm.factory import weights_hash as hash_of

    check_exportable(model)
    tok = _tokenizer(model, tokenizer)
    digest = weights_hash or hash_of(model)  # of the model as given: what an index built with it records
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).float().cpu()  # the caller's model stays as it was
    model = model.eval()
    dynamo = DYNAMO if dynamo is None else dynamo
    context = min(tok.context_length or model.cfg.text.context_length, model.cfg.text.context_length)
    export_graphs(model, folder, dynamo=dynamo)
    if int8:
        quantize(folder)
    for name in ("image", "text"):
        external_weights(folder / f"{name}.onnx")
    _write_tokenizer(tok, context, folder / "tokenizer.json")
    (folder / "preprocess.json").write_text(json.dumps(preprocess_config(model.cfg.vision), indent=2) + "\n")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "embed_dim": model.cfg.embed_dim,
        "image_size": model.cfg.vision.image_size,
        "context_length": context,  # where tokenizer.json truncates: the text tower's, or a sentence tower's less
        "pad_token_id": tok.pad_token_id,
        "clean": "clip" if tok.clean is not None else None,  # mmlm's only Python clean-up: CLIP's ftfy + html
        "logit_scale": float(model.scale().detach()),  # exp'd and clamped: the factor the logits use
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "weights_hash": digest,
        "int8": int8,
        "source": source,
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo={dynamo})",
        "opset": OPSET,
    }
    (folder / "onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def export_graphs(model: nn.Module, folder: Path, dynamo: bool = DYNAMO) -> dict[str, float]:
    """Write ``image.onnx`` and ``text.onnx`` of the float CLIP ``model``; returns seconds per graph."""
    size = model.cfg.vision.image_size
    T = min(8, model.cfg.text.context_length)
    ids = torch.ones(2, T, dtype=torch.long)  # dummy values: the graph is traced, nothing read from them
    ids[:, -1] = model.cfg.text.eot_token_id or 0
    mask = torch.ones_like(ids)
    graphs = {
        "image": (ImageGraph(model), (torch.zeros(2, 3, size, size),), ["pixels"], {"pixels": {0: "batch"}}),
        "text": (
            TextGraph(model), (ids, mask), ["input_ids", "attention_mask"],
            {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        ),
    }  # fmt: skip
    seconds = {}
    for name, (graph, args, inputs, axes) in graphs.items():
        start = time.perf_counter()
        _export_one(graph, args, inputs, axes, folder / f"{name}.onnx", dynamo)
        seconds[name] = time.perf_counter() - start
    return seconds


def _export_one(
    graph: nn.Module, args: tuple, inputs: list[str], axes: dict[str, dict[int, str]], path: Path, dynamo: bool
) -> None:
    import warnings

    common: dict[str, Any] = dict(input_names=inputs, output_names=["embeds"], opset_version=OPSET)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' tracer and deprecation notes, not about this model
        if dynamo:
            dims = {k: {i: torch.export.Dim.DYNAMIC for i in v} for k, v in axes.items()}
            program = torch.onnx.export(
                graph, args, dynamo=True, dynamic_shapes=dims, external_data=False, optimize=True, **common
            )
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                graph, args, str(path), dynamo=False, dynamic_axes=axes, do_constant_folding=True, **common
            )


def quantize(folder: Path) -> None:
    """Replace the float graphs in ``folder`` by int8 ones (``quantize_dynamic``: 8-bit weights per channel,
    activations quantized per batch as they come).

    Unsigned 8-bit weights: with signed ones ONNX Runtime multiplies u8 x s8, which saturates on AVX2 CPUs
    without VNNI; on a tiny CLIP that took the text cosine to float32 down to 0.957, against 0.9996 for
    u8 x u8 (0.9987 for s8 with ``reduce_range``, 0.9993 for mmlm's torch int8).
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process applies to static quantization
    try:
        for name in ("image", "text"):
            src, dst = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
            quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QUInt8)
            dst.replace(src)
    finally:
        logging.getLogger().setLevel(quiet)


def external_weights(path: Path) -> None:
    """Move the weights of the graph at ``path`` into ``NAME.onnx.data`` beside it (onnx's external data:
    memory-mapped by ONNX Runtime; the module docstring has the measurement)."""
    import onnx

    graph = onnx.load(str(path))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to the file
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=EXTERNAL)  # fmt: skip
    data.chmod(path.stat().st_mode)  # onnx creates it readable by its owner only; the graph's own mode instead


def preprocess_config(vision: Any) -> dict[str, Any]:
    """``image_transform(vision, train=False)`` as numbers: what a client without torch must do to a photo."""
    size = vision.image_size
    return {
        "size": size,
        "resize": "shortest_edge",
        "crop": "center",
        "crop_size": [size, size],
        "interpolation": vision.interpolation,
        "channel_mode": "RGB",
        "rescale": 1 / 255,
        "mean": list(vision.image_mean),
        "std": list(vision.image_std),
        "layout": "CHW",
        "steps": PREPROCESS_DOC,
    }


def _tokenizer(model: nn.Module, tokenizer: Tokenizer | None) -> Tokenizer:
    """The tokenizer to write, checked against the text tower (the CLIP BPE when none is given)."""
    text = model.cfg.text
    if tokenizer is None:
        if text.vocab_size != CLIP_VOCAB_SIZE:
            raise ConversionError(
                f"the text tower has {text.vocab_size} tokens, not the CLIP BPE's {CLIP_VOCAB_SIZE}: "
                "give the tokenizer it was trained with (--tokenizer DIR)"
            )
        return clip_tokenizer(text.context_length)
    if tokenizer.vocab_size > text.vocab_size:
        raise ConversionError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the text tower only {text.vocab_size}: "
            "give the tokenizer the model was trained with (--tokenizer DIR)"
        )
    if text.pool == "eot" and tokenizer.eot_token_id != text.eot_token_id:
        raise ConversionError(
            f"the tokenizer ends a text with id {tokenizer.eot_token_id}, the text tower pools id "
            f"{text.eot_token_id}: give the tokenizer the model was trained with (--tokenizer DIR)"
        )
    return tokenizer


def _write_tokenizer(tok: Tokenizer, context: int, path: Path) -> None:
    """``tokenizer.json`` with mmlm's truncation (at ``context`` tokens) and padding switched on, so that any
    ``tokenizers`` binding's ``encode_batch`` gives mmlm's ``input_ids`` / ``attention_mask``."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tok.backend.to_str())
    backend.enable_truncation(context)  # a post-processor's special tokens are kept: the end token survives
    pad = tok.pad_token_id
    backend.enable_padding(pad_id=pad, pad_token=tok.id_to_token(pad) or "")  # to the longest text, on the right
    backend.save(str(path))
