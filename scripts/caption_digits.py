#!/usr/bin/env python
"""How often a trained CoCa's caption names the right digit, on the held-out digits.

    mmlm fit --config configs/caption/coca-digits-tiny.yaml
    python scripts/caption_digits.py runs/coca-digits-tiny/version_0/checkpoints/last.ckpt [--num_beams 3]

Each of the 360 held-out scans is captioned as ``mmlm caption`` does (same loading, transform, decoding);
a caption names the digit when it holds its word or numeral ("three" or "3") and no other digit's.
``--save_images DIR`` also writes the first scans as PNG files, to try ``mmlm caption`` on.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

from mmlm.data.digits import DIGIT_CLASSNAMES, digits_image_text
from mmlm.factory import load


def names_digit(caption: str, label: int) -> bool:
    """True when ``caption`` names ``label`` (word or numeral) and no other digit."""
    found = {d for d, word in enumerate(DIGIT_CLASSNAMES) if re.search(rf"\b({word}|{d})\b", caption)}
    return found == {label}


def run(checkpoint: str, num_beams: int = 1, max_new_tokens: int = 16, batch_size: int = 120,
        save_images: Path | None = None, show: int = 10) -> float:  # fmt: skip
    """Print a few captions and the fraction of held-out scans whose caption names the right digit."""
    loaded = load(checkpoint)
    data = digits_image_text("test", seed=0)
    if save_images is not None:
        save_images.mkdir(parents=True, exist_ok=True)
        for i in range(show):
            data.image(i).save(save_images / f"digit_{i:03d}_label_{data.labels[i]}.png")
    right, captions = 0, []
    eot = loaded.model.cfg.text.eot_token_id
    for start in range(0, len(data), batch_size):
        idx = range(start, min(start + batch_size, len(data)))
        images = torch.stack([loaded.transform(data.image(i)) for i in idx])
        ids = loaded.model.generate(images, max_new_tokens=max_new_tokens, num_beams=num_beams)
        for i, row in zip(idx, ids.tolist()):
            text = loaded.tokenizer.decode(row[: row.index(eot)] if eot in row else row)
            captions.append(text)
            right += names_digit(text, int(data.labels[i]))
    for i in range(show):
        print(f"label {data.labels[i]}: {captions[i]}")
    accuracy = right / len(data)
    print(f"{right}/{len(data)} captions name the right digit: {accuracy:.1%} (num_beams={num_beams})")
    return accuracy


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(run)
