#!/usr/bin/env python
"""Pointing game (Zhang et al., 2016) for mmlm's heatmaps, with the randomised-model control.

    python scripts/pointing_game.py runs/clip-digits-tiny/version_0/checkpoints/last.ckpt
    python scripts/pointing_game.py CKPT --pairs 50 --json pointing.json   # a quicker, smaller run
    python scripts/pointing_game.py CKPT --pairs 0 --figure docs/images/pointing_game.png  # the README's picture

Held-out digits (the ``test`` split the CLIP never trained on) are paired, two different digits side
by side in one 64 x 32 image, and each digit N is asked for as "a photo of the number N." A hit is a
map whose maximum over the half holding N is above its maximum over the other half (a tie, e.g. a
flat map, is a miss). Chance is 50%.

The same maps from the same architecture with freshly initialised weights (Adebayo et al., 2018,
"Sanity checks for saliency maps") must score near chance: a method that scores well without a
trained model shows the image or the architecture, not what the model learned. Attention rollout
does not read the text, so it points at the same half for both digits of a pair: 50% by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

from mmlm import factory
from mmlm.data import DIGIT_CLASSNAMES, digits_image_text
from mmlm.explain.heatmaps import METHODS, heatmaps
from mmlm.models import create_model

PROMPT = "a photo of the number {}."


def digit_pairs(labels: list[int], count: int | None, seed: int) -> list[tuple[int, int]]:
    """Disjoint pairs of held-out digits with different labels, in a seeded random order."""
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    pairs, waiting = [], []
    for i in order:
        partner = next((j for j in waiting if labels[j] != labels[i]), None)
        if partner is None:
            waiting.append(i)
        else:
            waiting.remove(partner)
            pairs.append((partner, i))
    return pairs[:count]


def hit(heat: torch.Tensor, left: bool) -> bool:
    half = heat.shape[-1] // 2
    inside, outside = (heat[:, :half], heat[:, half:]) if left else (heat[:, half:], heat[:, :half])
    return bool(inside.max() > outside.max())


def play(model, tokenizer, data, pairs, methods) -> dict[str, int]:
    hits = dict.fromkeys(methods, 0)
    for a, b in pairs:
        pixels = torch.cat([data[a]["image"], data[b]["image"]], dim=-1)  # (3, 32, 64): a left, b right
        texts = [PROMPT.format(DIGIT_CLASSNAMES[data.labels[i]]) for i in (a, b)]
        for method in methods:
            maps = heatmaps(model, pixels, texts, method, tokenizer)  # (2, H, W)
            hits[method] += hit(maps[0], left=True) + hit(maps[1], left=False)
    return hits


def figure(model, tokenizer, data, pairs, methods) -> bytes:
    """PNG: per pair, the image, then for each method the maps of the left and of the right digit."""
    from matplotlib.figure import Figure
    from PIL import Image

    from mmlm.explain.render import overlay, png

    figure = Figure(figsize=(1.2 * (1 + 2 * len(methods)), 0.75 * len(pairs) + 0.5))
    axes = figure.subplots(len(pairs), 1 + 2 * len(methods), squeeze=False)
    for row, (a, b) in zip(axes, pairs):
        images = [data.image(i) for i in (a, b)]
        picture = Image.new("RGB", (64, 32))
        picture.paste(images[0], (0, 0))
        picture.paste(images[1], (32, 0))
        pixels = torch.cat([data[a]["image"], data[b]["image"]], dim=-1)
        digits = [int(data.labels[i]) for i in (a, b)]
        texts = [PROMPT.format(DIGIT_CLASSNAMES[d]) for d in digits]
        row[0].imshow(picture)
        for m, method in enumerate(methods):
            maps = heatmaps(model, pixels, texts, method, tokenizer)
            for side in (0, 1):
                ax = row[1 + 2 * m + side]
                ax.imshow(overlay(picture, maps[side]))
                ax.set_title(f"{method}: {digits[side]}", fontsize=6)
    for ax in axes.flat:
        ax.set_axis_off()
    return png(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the trained CLIP (a `mmlm fit` .ckpt of configs/align/clip-digits-tiny.yaml)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs to play (default: all the held-out digits make)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0, help="pairing order and the randomised model's weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--figure", type=Path, default=None, help="draw the trained model's maps of the first pairs (PNG)")
    args = parser.parse_args()

    loaded = factory.load(args.checkpoint, image_text="the pointing game")
    trained, tokenizer = loaded.model, loaded.require_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        randomised = create_model(trained.cfg).eval()
    data = digits_image_text("test", transform=loaded.transform)
    pairs = digit_pairs([int(y) for y in data.labels], args.pairs, args.seed)
    if args.figure is not None:
        args.figure.write_bytes(figure(trained, tokenizer, data, digit_pairs([int(y) for y in data.labels], 3, args.seed), args.methods))
    if not pairs:
        return
    queries = 2 * len(pairs)
    results = {name: play(model, tokenizer, data, pairs, args.methods)
               for name, model in (("trained", trained), ("randomised", randomised))}  # fmt: skip

    print(f"pointing game: {len(pairs)} pairs of held-out digits, {queries} queries, chance 50%")
    print("| method | trained CLIP | same model, random weights |")
    print("|---|---|---|")
    for method in args.methods:
        cells = [f"{results[n][method] / queries:.1%} ({results[n][method]}/{queries})" for n in results]
        print(f"| {method} | {' | '.join(cells)} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "pairs": len(pairs), "queries": queries,
                                         "hits": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
