"""``mmlm convert``: anything ``mmlm.load_pretrained`` reads -> any ``mmlm.export`` target, tokenizer included.

It sits above the readers and the models: the model and its tokenizer come from ``mmlm.factory`` (the one
rule for which tokenizer goes with a checkpoint), the files from ``mmlm.export``.
"""

from __future__ import annotations

from pathlib import Path

from mmlm import outputs
from mmlm.config import Activation
from mmlm.convert.common import ConversionError
from mmlm.export import TARGETS, export
from mmlm.factory import resolve, tokenizer_for
from mmlm.models import CLIP


def export_hf_clip(model: CLIP, folder: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a complete transformers ``CLIPModel`` folder (see ``mmlm.export.hf``)."""
    if not isinstance(model, CLIP):
        raise ConversionError(f"export_hf_clip exports mmlm CLIP models, not {type(model).__name__}")
    return export(model, folder, "hf", overwrite=overwrite)


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "mmlm",
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
    act: Activation | None = None,
    with_heads: bool = True,
    int8: bool = False,
) -> Path:
    """Convert a checkpoint: anything ``load_pretrained`` reads -> any ``mmlm.export`` target.

    ``dst`` must be new or empty; ``overwrite=True`` replaces a folder mmlm wrote for the same target
    (``mmlm.outputs``). ``tokenizer`` (a folder or ``clip``) overrides the one that came with ``src``
    (``mmlm.factory.tokenizer_for``). ``act``: the MLP activation of an OpenAI / OpenCLIP file that does
    not record it; ``with_heads=False``: the bare encoder (``load_pretrained``'s). ``int8``: ONNX Runtime's
    int8 graphs (``--to onnx`` only; ``mmlm quantize`` makes an int8 mmlm model).
    """
    if to != "mmlm" and to not in TARGETS:
        raise ValueError(f"to must be one of {['mmlm', *TARGETS]}, not {to!r}")
    if int8 and to != "onnx":
        raise ValueError(f"--int8 applies to --to onnx, not --to {to} (`mmlm quantize` makes an int8 mmlm model)")
    outputs.check(dst, to, overwrite)  # before the slow part
    model = resolve(src, act=act, with_heads=with_heads)
    tok, source = tokenizer_for(src, model, tokenizer)
    # each exporter writes the CLIP BPE in its own ecosystem's format when given none
    tok = tok if source in ("given", "checkpoint") and (to != "mmlm" or source == "given") else None
    # onnx.json records where the model came from and whether its graphs are int8
    options = {"int8": int8, "source": str(src)} if to == "onnx" else {}
    return export(model, dst, to, tokenizer=tok, overwrite=overwrite, **options)  # type: ignore[arg-type]
