"""Interpretability: where a CLIP looks for a text, and which words decide a text classifier.

=======================================  ===========================================================
``heatmap(model, image, text, method)``  (H, W) map in [0, 1] at the image's resolution (``METHODS``;
                                         several texts at once: ``mmlm.explain.heatmaps.heatmaps``)
``attention_maps(model, image)``         (layers, heads, H, W) class-token attention of every head
``token_attributions(model, tok, text)`` Integrated Gradients per token of a text classifier
``heatmap_png(model, tok, image, text)`` PNG bytes: the image with the text's map over it
``explain`` (``mmlm explain``)           the command: heatmap / attention PNG, token HTML / PNG
=======================================  ===========================================================

Names load on first use (PEP 562): ``mmlm explain --help`` and ``import mmlm.explain`` stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmlm._lazy import lazy_exports

_EXPORTS = {
    "METHODS": "mmlm.explain.heatmaps",
    "heatmap": "mmlm.explain.heatmaps",
    "attention_maps": "mmlm.explain.heatmaps",
    "record_attention": "mmlm.explain.attention",
    "rollout": "mmlm.explain.attention",
    "TokenAttributions": "mmlm.explain.text",
    "token_attributions": "mmlm.explain.text",
    "heatmap_png": "mmlm.explain.render",
    "tokens_html": "mmlm.explain.render",
    "tokens_png": "mmlm.explain.render",
    "explain": "mmlm.explain.command",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mmlm.explain.attention import record_attention, rollout
    from mmlm.explain.command import explain
    from mmlm.explain.heatmaps import METHODS, attention_maps, heatmap
    from mmlm.explain.render import heatmap_png, tokens_html, tokens_png
    from mmlm.explain.text import TokenAttributions, token_attributions


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
