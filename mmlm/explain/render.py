"""Pictures of the explanations: heatmap overlays, the attention grid, coloured tokens (PNG or HTML).

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so
nothing global changes (a server can draw from several threads).
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mmlm.data.tokenizers import Tokenizer
    from mmlm.explain.text import TokenAttributions
    from mmlm.models.clip import CLIP

COLORMAP = "jet"
ALPHA = 0.5  # weight of the heatmap over the picture


def open_image(image: Image.Image | str | Path | bytes) -> Image.Image:
    """An RGB PIL image from an image, a path or encoded bytes (what a server receives)."""
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    elif not isinstance(image, Image.Image):
        image = Image.open(image)
    return image.convert("RGB")


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = ALPHA) -> Image.Image:
    """``image`` with the (H, W) map in [0, 1] blended over it in the colour map (red = high)."""
    from matplotlib import colormaps

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    colours = colormaps[COLORMAP](heat.numpy())[..., :3]
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * rgb + alpha * colours)))


def png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buf = io.BytesIO()
    figure.savefig(buf, format="png", bbox_inches="tight", dpi=100)
    return buf.getvalue()


def heatmap_figure(image: Image.Image, maps: torch.Tensor, titles: Sequence[str], panel: float = 2.6) -> bytes:
    """PNG: the picture, then one overlay per (H, W) map in ``maps`` titled by ``titles``."""
    from matplotlib.figure import Figure

    aspect = image.height / image.width
    figure = Figure(figsize=(panel * (1 + len(maps)), panel * aspect + 0.6))
    axes = figure.subplots(1, 1 + len(maps), squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    for ax, heat, title in zip(axes[1:], maps, titles):
        ax.imshow(overlay(image, heat))
        ax.set_title(title, fontsize=9, wrap=True)
    for ax in axes:
        ax.set_axis_off()
    return png(figure)


def attention_figure(image: Image.Image, maps: torch.Tensor, panel: float = 1.4) -> bytes:
    """PNG: a grid with one row per layer and one column per head of (layers, heads, H, W) maps."""
    from matplotlib.figure import Figure

    layers, heads = maps.shape[:2]
    aspect = image.height / image.width
    figure = Figure(figsize=(panel * heads, panel * aspect * layers + 0.3))
    axes = figure.subplots(layers, heads, squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer, head]
            ax.imshow(overlay(image, maps[layer, head]))
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    figure.suptitle("class-token attention per layer and head", fontsize=9)
    return png(figure)


def _colour(value: float, scale: float) -> tuple[int, int, int]:
    """Red for support of the class, blue against, white for nothing; ``scale`` = the largest |value|."""
    t = 0.0 if scale == 0 else min(1.0, abs(value) / scale)
    fade = round(255 * (1 - 0.8 * t))
    return (255, fade, fade) if value > 0 else (fade, fade, 255)


def _heading(attr: TokenAttributions, classes: Sequence[str] | None) -> str:
    name = classes[attr.target] if classes else f"class {attr.target}"
    return (f"{name}: p = {attr.probability:.3f} (baseline {attr.baseline_probability:.3f}); "
            f"Integrated Gradients, completeness delta {attr.delta:+.1e}")  # fmt: skip


def _pieces(attr: TokenAttributions) -> list[tuple[str, str, float]]:
    """(space before, token text, attribution) of each real token, in order."""
    out, end = [], None
    for (a, b), special, value in zip(attr.spans, attr.special, attr.attributions.tolist()):
        if special:
            continue
        out.append((" " if end is not None and a > end else "", attr.text[a:b], value))
        end = b
    return out


def tokens_html(attr: TokenAttributions, classes: Sequence[str] | None = None) -> str:
    """A standalone HTML page: each token on a background coloured by its attribution (hover: the value)."""
    scale = float(attr.attributions.abs().max())
    spans = "".join(
        f'{space}<span style="background:rgb{_colour(v, scale)}" title="{v:+.4f}">{html.escape(token)}</span>'
        for space, token, v in _pieces(attr)
    )
    return (f'<!doctype html><meta charset="utf-8"><title>token attributions</title>'
            f'<body style="font-family:sans-serif;max-width:48em;line-height:1.8">'
            f"<p><b>{html.escape(_heading(attr, classes))}</b></p><p>{spans}</p>"
            f"<p><small>red: raises the probability of the class, blue: lowers it</small></p></body>\n")  # fmt: skip


def tokens_png(attr: TokenAttributions, classes: Sequence[str] | None = None, width: int = 800) -> bytes:
    """The same as ``tokens_html``, drawn as a PNG (wrapped to ``width`` pixels)."""
    font = ImageFont.load_default(size=16)
    pad, line = 10, 26
    scale = float(attr.attributions.abs().max())
    placed, x, y = [], pad, pad + line  # the first line holds the heading
    for space, token, value in _pieces(attr):
        x += font.getlength(space)
        w = font.getlength(token)
        if x + w > width - pad and x > pad:
            x, y = pad, y + line
        placed.append((x, y, token, value, w))
        x += w
    canvas = Image.new("RGB", (width, y + line + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), _heading(attr, classes), fill="black", font=font)
    for x, y, token, value, w in placed:
        draw.rectangle((x, y, x + w, y + line - 4), fill=_colour(value, scale))
        draw.text((x, y + 2), token, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(
    model: CLIP,
    tokenizer: Tokenizer | None,
    image: Image.Image | str | Path | bytes,
    text: str,
    method: str = "occlusion",
) -> bytes:
    """PNG bytes of ``image`` (PIL, path or encoded bytes) at its own size with the map of ``text`` over it:
    what a server answers for "where does this result match the query"."""
    from mmlm.explain.heatmaps import heatmap

    picture = open_image(image)
    buf = io.BytesIO()
    overlay(picture, heatmap(model, picture, text, method, tokenizer)).save(buf, format="PNG")
    return buf.getvalue()
