"""The machinery every converter shares: a plan of target tensors, run with a strict key check.

A converter is a pure function ``state_dict -> state_dict``. It writes a *plan*: for
every target key, which source keys it reads and how it combines them (a rename, a
transpose, a q/k/v concatenation). ``run_plan`` executes it and refuses to return
anything unless every source key was either read by the plan or named in the
converter's list of keys dropped on purpose, and every key the plan reads exists.
Checkpoints that carry something mmlm would silently ignore therefore fail loudly,
naming the key.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from mmlm.config import Activation

StateDict = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint does not fit the converter: unused or missing keys, or an unsupported option."""


@dataclass(frozen=True)
class Op:
    """How one target tensor is made: ``fn(*source_tensors)``."""

    sources: tuple[str, ...]
    fn: Callable[..., torch.Tensor]


Plan = dict[str, Op]


def copy(src: str) -> Op:
    return Op((src,), lambda w: w)


def transpose(src: str) -> Op:
    """A weight stored [in, out] (GPT-2 Conv1D, CLIP projections) -> nn.Linear's [out, in]."""
    return Op((src,), lambda w: w.t().contiguous())


def cat(*srcs: str) -> Op:
    """Separate q, k, v projections -> one fused qkv, concatenated in that order along dim 0."""
    return Op(tuple(srcs), lambda *ws: torch.cat(ws, dim=0))


def chunk(src: str, index: int, chunks: int = 3) -> Op:
    """The inverse of ``cat``: one of q, k, v out of a fused qkv."""
    return Op((src,), lambda w: w.chunk(chunks, dim=0)[index].contiguous())


def reshape(src: str, *shape: int) -> Op:
    return Op((src,), lambda w: w.reshape(shape).contiguous())


def linear_pairs(table: Mapping[str, str], dst: str, src: str, params: Iterable[str] = ("weight", "bias")) -> Plan:
    """Rename ``src + name + .weight/.bias`` to ``dst + mmlm_name + ...`` for every row of ``table``.

    ``table`` maps mmlm module names to source module names, so Linear and LayerNorm
    renames are one row each instead of two.
    """
    return {f"{dst}{ours}.{p}": copy(f"{src}{theirs}.{p}") for ours, theirs in table.items() for p in params}


def run_plan(
    sd: Mapping[str, torch.Tensor],
    plan: Plan,
    drop: Iterable[str] = (),
    source: str = "checkpoint",
    target: str = "mmlm",
) -> StateDict:
    """Execute ``plan`` on ``sd``; raise ``ConversionError`` naming every missing or unused key.

    ``drop`` holds glob patterns (``*`` matches dots too) of source keys left out on
    purpose: buffers such as position ids and causal masks, tied copies, metadata.
    """
    drop = tuple(drop)
    needed = {s for op in plan.values() for s in op.sources}
    missing = sorted(needed - sd.keys())
    unused = sorted(k for k in sd.keys() - needed if not any(fnmatch.fnmatchcase(k, pat) for pat in drop))
    if missing or unused:
        lines = [f"cannot convert this {source} to {target}:"]
        if missing:
            lines.append(f"  missing key(s) ({len(missing)}): {_short(missing)}")
        if unused:
            lines.append(
                f"  unused key(s) ({len(unused)}): {_short(unused)}"
                "  (weights mmlm would ignore: a different architecture or an unsupported option)"
            )
        raise ConversionError("\n".join(lines))
    return {dst: op.fn(*(sd[s] for s in op.sources)) for dst, op in plan.items()}


def _short(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Keys with ``prefix`` lose it; the others are kept as they are (and will be reported if unused)."""
    return {(k.removeprefix(prefix)): v for k, v in sd.items()}


def count_layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered sub-modules under ``prefix`` (``prefix`` ends where the index starts)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if found != set(range(len(found))):
        raise ConversionError(f"layers under {prefix!r} are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def check_tied(sd: Mapping[str, torch.Tensor], copy_key: str, owner_key: str) -> None:
    """A tied weight saved twice must be equal; otherwise the head is untied and mmlm cannot tie it."""
    if copy_key in sd and not torch.equal(sd[copy_key].to(sd[owner_key].dtype), sd[owner_key]):
        raise ConversionError(
            f"{copy_key} differs from {owner_key}: this checkpoint has an untied head, which mmlm's tied heads cannot hold"
        )


_HF_ACTS: dict[str, Activation] = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "quick_gelu": "quick_gelu",
    # tanh approximations of GELU under their historical names
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def act_from_hf(name: str) -> Activation:
    if name not in _HF_ACTS:
        raise ConversionError(f"activation {name!r} has no mmlm equivalent; supported: {sorted(_HF_ACTS)}")
    return _HF_ACTS[name]


def mlp_ratio(width: int, hidden: int) -> float:
    """``hidden / width``, checked to give back exactly ``hidden`` through ``TransformerConfig.mlp_dim``."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise ConversionError(f"MLP size {hidden} is not representable as width {width} * mlp_ratio")
    return ratio
