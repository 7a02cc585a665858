#!/usr/bin/env python
"""Deletion check for token attributions: do the tokens Integrated Gradients ranks highest matter most?

    mmlm fit --config configs/finetune/text-topics-tiny.yaml        # the text-classification demo
    python scripts/deletion_check.py runs/text-topics-tiny/version_0/checkpoints/last.ckpt

On every held-out text the classifier's predicted class is explained (``mmlm.explain.token_attributions``);
then the ``k`` tokens with the largest attributions are deleted from the token sequence, and, as the
control, ``k`` tokens drawn at random (``draws`` times, averaged). Reported: the mean drop of the predicted
class's probability for each, and how often the top-k deletion drops it more. Attributions that track the
model should beat random deletion by a clear margin (Samek et al., 2017, "Evaluating the visualization of
what a deep neural network has learned").
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

from mmlm.explain.text import class_probabilities, token_attributions
from mmlm.factory import resolve, tokenizer_for
from mmlm.paths import resolve as resolve_path


def probability_without(model, ids: list[int], types: list[int] | None, drop: set[int], target: int) -> float:
    """The probability of ``target`` once the positions in ``drop`` are deleted from the sequence."""
    keep = [i for i in range(len(ids)) if i not in drop]
    batch = {"input_ids": torch.tensor([[ids[i] for i in keep]]), "attention_mask": torch.ones(1, len(keep), dtype=torch.long)}
    if types is not None:
        batch["token_type_ids"] = torch.tensor([[types[i] for i in keep]])
    with torch.no_grad():
        return float(class_probabilities(model, batch)[0, target])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the text classifier (`mmlm fit` of configs/finetune/text-topics-tiny.yaml)")
    parser.add_argument("--data", default="assets/finetune/topics_val.csv", help="held-out CSV with a `text` column")
    parser.add_argument("--tokenizer", default=None, help="default: the one the checkpoint was trained with")
    parser.add_argument("--k", type=int, default=3, help="tokens deleted")
    parser.add_argument("--draws", type=int, default=5, help="random deletions per text, averaged")
    parser.add_argument("--steps", type=int, default=50, help="Integrated Gradients steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    model = resolve(args.checkpoint).eval()
    tokenizer, _ = tokenizer_for(args.checkpoint, model, args.tokenizer)
    if tokenizer is None:
        parser.error(f"no tokenizer is known for {args.checkpoint}: give --tokenizer (a tokenizer folder)")
    with open(resolve_path(args.data), newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    rng = random.Random(args.seed)
    top_drops, random_drops, deltas, wins = [], [], [], 0
    for text in texts:
        attr = token_attributions(model, tokenizer, text, steps=args.steps)
        real = [i for i, special in enumerate(attr.special) if not special]
        if len(real) <= args.k:
            continue
        types = tokenizer([text]).get("token_type_ids")
        types = None if types is None else types[0].tolist()
        scores = attr.attributions.tolist()
        top = set(sorted(real, key=lambda i: scores[i], reverse=True)[: args.k])
        top_drop = attr.probability - probability_without(model, attr.input_ids, types, top, attr.target)
        random_drop = sum(attr.probability - probability_without(model, attr.input_ids, types, set(rng.sample(real, args.k)),
                                                                 attr.target) for _ in range(args.draws)) / args.draws  # fmt: skip
        top_drops.append(top_drop)
        random_drops.append(random_drop)
        deltas.append(abs(attr.delta))
        wins += top_drop > random_drop
    n = len(top_drops)
    result = {
        "checkpoint": str(args.checkpoint), "data": args.data, "texts": n, "k": args.k, "draws": args.draws,
        "mean_drop_top_k": sum(top_drops) / n, "mean_drop_random_k": sum(random_drops) / n,
        "top_k_beats_random": wins / n, "mean_abs_delta": sum(deltas) / n,
    }  # fmt: skip
    print(f"deletion check on {n} held-out texts ({args.data}), k = {args.k}, {args.draws} random draws each")
    print(f"mean drop of the predicted class's probability: top-{args.k} {result['mean_drop_top_k']:.3f}, "
          f"random-{args.k} {result['mean_drop_random_k']:.3f}")  # fmt: skip
    print(f"top-{args.k} deletion drops it more than random on {wins}/{n} texts ({wins / n:.0%}); "
          f"mean |IG delta| {result['mean_abs_delta']:.1e}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
