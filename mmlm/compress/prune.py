"""Structured pruning of a CLIP: whole attention heads, MLP hidden units and residual channels go.

A ``keep`` fraction of the heads of every layer stays (the same number in every layer), and with
them the same fraction of MLP units and residual (embedding) channels, so the pruned model is a
plain smaller config: ``heads' = round(keep * heads)``, ``width' = heads' * head_dim`` (head size
unchanged), MLP ``mlp_ratio * width'``. What stays is chosen by activation magnitude on calibration
batches (Minitron's width pruning, Muralidharan et al. 2024):

    residual channel c   sum over the tower's LayerNorms of mean |LayerNorm output[c]|
    head h of a layer    mean L2 norm of the head's attention output (the input of attn.proj)
    MLP unit u           mean |activation[u]| (the input of mlp.fc2)

The weights are sliced as a state dict (``prune_state_dict``), which loads into the smaller model
built from its config; kept indices stay in their order, so ``keep=1.0`` returns the model unchanged.
Dropping residual channels changes what each LayerNorm normalises over: expect a short recovery
fine-tune to be needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mmlm.config import CLIPConfig, TransformerConfig, update
from mmlm.layers import Block
from mmlm.models import CLIP, create_model

TOWERS = {"visual": "vision", "text": "text"}  # module name in CLIP -> config field


def pruned_config(cfg: CLIPConfig, keep: float) -> CLIPConfig:
    """``cfg`` with ``round(keep * heads)`` heads per layer (at least 1) and the width and MLP that go with them."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return update(cfg, **{field: _shrunk(getattr(cfg, field), keep) for field in TOWERS.values()})


def _shrunk(cfg: TransformerConfig, keep: float) -> dict[str, int]:
    heads = max(1, round(keep * cfg.heads))
    return {"heads": heads, "width": heads * (cfg.width // cfg.heads)}


class Importance:
    """Activation statistics of a CLIP's heads, MLP units and residual channels, gathered by forward hooks."""

    def __init__(self, model: CLIP):
        self.model = model
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> Importance:  # typing.Self is Python 3.11+
        for tower, field in TOWERS.items():
            heads = getattr(self.model.cfg, field).heads
            for name, module in getattr(self.model, tower).named_modules():
                if isinstance(module, nn.LayerNorm):  # every LayerNorm of the tower adds to one channel score
                    self._hook(module, f"{tower}.channels", torch.abs, output=True)
                if isinstance(module, Block):
                    attn, mlp = module.attn.proj, module.mlp.fc2  # one modality: the parts are plain modules
                    self._hook(attn, f"{tower}.{name}.heads", lambda x, h=heads: x.unflatten(-1, (h, -1)).norm(dim=-1))
                    self._hook(mlp, f"{tower}.{name}.units", torch.abs)
        return self

    def _hook(self, module: nn.Module, key: str, stat: Callable[[torch.Tensor], torch.Tensor], output: bool = False):
        def hook(_module, inputs, out):
            value = stat((out if output else inputs[0]).detach().float()).flatten(0, -2)  # (tokens, features)
            self.sums[key] = self.sums.get(key, 0) + value.sum(0)
            self.counts[key] = self.counts.get(key, 0) + value.shape[0]

        self._hooks.append(module.register_forward_hook(hook))

    def __exit__(self, *exc: object) -> None:
        for handle in self._hooks:
            handle.remove()

    def scores(self) -> dict[str, torch.Tensor]:
        """The mean statistic of every feature."""
        return {k: v / self.counts[k] for k, v in self.sums.items()}


@torch.no_grad()
def importance(model: CLIP, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Scores of every residual channel (``visual.channels``), head (``text.blocks.0.heads``) and MLP unit
    (``text.blocks.0.units``) over the calibration ``batches`` (``image``, ``input_ids``, ``attention_mask``)."""
    if model.cfg.share != "none":
        raise ValueError("pruning needs share='none': shared blocks would have to keep the same heads in both towers")
    if model.cfg.text.pos_embed != "learned":
        raise ValueError("pruning needs learned text positions: a sinusoidal table is not a slice of a wider one")
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with Importance(model) as stats:
            for batch in batches:
                model.encode_image(batch["image"])
                model.encode_text(batch["input_ids"], batch["attention_mask"])
                seen += 1
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("no calibration batches")
    return stats.scores()


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order (ties: the earlier index wins)."""
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return order.sort().values


def keep_indices(model: CLIP, scores: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Which channels (``visual.channels``), heads (``visual.blocks.0.heads``) and MLP units to keep."""
    small = pruned_config(model.cfg, keep)
    kept = {}
    for tower, field in TOWERS.items():
        cfg, new = getattr(model.cfg, field), getattr(small, field)
        kept[f"{tower}.channels"] = _top(scores[f"{tower}.channels"], new.width)
        for i in range(cfg.depth):
            block = f"{tower}.blocks.{i}"
            kept[f"{block}.heads"] = _top(scores[f"{block}.heads"], new.heads)
            kept[f"{block}.units"] = _top(scores[f"{block}.units"], new.mlp_dim)
    return kept


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune_state_dict(
    state: dict[str, torch.Tensor], cfg: CLIPConfig, kept: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Slice a CLIP state dict down to the ``kept`` channels, heads and units (``keep_indices``); pure.

    Every key is matched by one rule below; a key no rule covers is an error, not silently copied.
    """
    out = {}
    for key, value in state.items():
        tower, _, rest = key.partition(".")
        if key in ("logit_scale", "logit_bias"):
            out[key] = value
            continue
        if key in ("visual_projection.weight", "text_projection.weight"):
            out[key] = value[:, kept[f"{'visual' if key.startswith('visual') else 'text'}.channels"]]
            continue
        if tower not in TOWERS:
            raise KeyError(f"pruning has no rule for {key}")
        c = kept[f"{tower}.channels"]
        block = re.match(r"blocks\.(\d+)\.(.+)", rest)
        if block is None:
            out[key] = _tower_tensor(rest, value, c, key)
            continue
        i, part = block.groups()
        width, heads = getattr(cfg, TOWERS[tower]).width, getattr(cfg, TOWERS[tower]).heads
        rows = _head_rows(kept[f"{tower}.blocks.{i}.heads"], width // heads)  # q rows; k, v: + width, + 2 width
        units = kept[f"{tower}.blocks.{i}.units"]
        if part == "attn.qkv.weight":
            out[key] = value[torch.cat([rows + j * width for j in range(3)])][:, c]
        elif part == "attn.qkv.bias":
            out[key] = value[torch.cat([rows + j * width for j in range(3)])]
        elif part == "attn.proj.weight":
            out[key] = value[c][:, rows]
        elif part == "mlp.fc1.weight":
            out[key] = value[units][:, c]
        elif part == "mlp.fc1.bias":
            out[key] = value[units]
        elif part == "mlp.fc2.weight":
            out[key] = value[c][:, units]
        elif part in ("attn.proj.bias", "mlp.fc2.bias") or re.fullmatch(r"(norm[12]\.(weight|bias))|ls[12]\.gamma", part):
            out[key] = value[c]
        else:
            raise KeyError(f"pruning has no rule for {key}")
    return {k: v.contiguous() for k, v in out.items()}


def _tower_tensor(name: str, value: torch.Tensor, c: torch.Tensor, key: str) -> torch.Tensor:
    """A tower's tensors outside its blocks: the channel is the last dimension, except the patch conv's output."""
    if name.startswith("patch_embed.proj."):
        return value[c]
    if name in ("head.bias",):
        return value
    if name in ("cls_token", "pos_embed", "token_embed.weight", "type_embed.weight", "head.weight") or re.fullmatch(
        r"(norm|norm_pre|norm_embed)\.(weight|bias)", name
    ):
        return value[..., c]
    raise KeyError(f"pruning has no rule for {key}")


def prune_clip(model: CLIP, keep: float, batches: Iterable[dict[str, torch.Tensor]]) -> CLIP:
    """A smaller dense CLIP keeping the ``keep`` fraction of heads, MLP units and channels that matter most
    on the calibration ``batches``; in eval mode, on the CPU. ``model`` is left as it is."""
    if not isinstance(model, CLIP):
        raise TypeError(f"pruning takes a CLIP model, not {type(model).__name__}")
    scores = importance(model, batches)
    small = pruned_config(model.cfg, keep)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    pruned = create_model(small)
    pruned.load_state_dict(prune_state_dict(state, model.cfg, keep_indices(model, scores, keep)))
    return pruned.eval()
