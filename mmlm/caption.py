"""``mmlm caption MODEL IMAGE [IMAGE ...]``: what a CoCa says is in each image.

Imports nothing heavy at module level: the CLI's ``--help`` reads this signature without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal


def caption(
    inputs: list[str],
    max_new_tokens: int = 20,
    num_beams: int = 1,
    do_sample: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    batch_size: int = 32,
    tokenizer: str | None = None,
    act: Literal["gelu", "quick_gelu"] | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, str]]:
    """Caption images with a CoCa: one ``IMAGE<TAB>caption`` line each (greedy decoding unless told otherwise).

    Args:
        inputs: MODEL, then one or more images. MODEL is a CoCa: a ``mmlm fit`` .ckpt, an mmlm folder, an
            OpenCLIP CoCa checkpoint, or a preset name (random weights, for smoke tests).
        max_new_tokens: longest caption, in tokens (the end token included).
        num_beams: beams of beam search; 1 decodes greedily (or samples, with ``--do_sample``).
        do_sample: draw each token at random (``--top_k``, ``--top_p``, ``--temperature``; ``--seed`` fixes it).
        top_k: sample among this many most likely tokens (0: all).
        top_p: sample among the most likely tokens that together reach this probability (1.0: all).
        temperature: divides the logits before sampling (< 1: safer captions, > 1: more varied).
        batch_size: images per generation batch.
        tokenizer: tokenizer name or folder that decodes the ids; default the checkpoint's, else the CLIP BPE.
        act: MLP activation of an OpenCLIP state dict when it cannot be detected.
        device: ``cpu``, ``cuda``, ...
        seed: seed of sampling and of a preset's random weights.
    """
    import torch

    from mmlm.errors import UsageError, check_at_least, check_device
    from mmlm.factory import load
    from mmlm.models.coca import CoCa
    from mmlm.paths import resolve as resolve_path

    if len(inputs) < 2:
        raise UsageError("give MODEL, then one or more images to caption")
    spec, *names = [str(i) for i in inputs]
    check_device(device)
    check_at_least(1, max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size)
    paths = [resolve_path(n) for n in names]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    loaded = load(spec, tokenizer=tokenizer, act=act, device=device, seed=seed)
    if not isinstance(loaded.model, CoCa):
        raise UsageError(f"{spec} is a {type(loaded.model).__name__}: captions need a CoCa (e.g. coca-tiny trained by "
                         "`mmlm fit --config configs/caption/coca-digits-tiny.yaml`)")  # fmt: skip
    tok = loaded.require_tokenizer()
    generator = torch.Generator(device).manual_seed(seed) if do_sample else None
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([loaded.transform(_open(p)) for p in chunk]).to(device)
        texts = captions_of(loaded.model, tok, images, max_new_tokens=max_new_tokens, num_beams=num_beams,
                            do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature,
                            generator=generator)  # fmt: skip
        for path, text in zip(chunk, texts):
            print(f"{path}\t{text}", flush=True)
            results.append({"image": str(path), "caption": text})
    return results


def captions_of(model: Any, tokenizer: Any, images: Any, **options: Any) -> list[str]:
    """The caption text of each image of ``images`` (B, 3, H, W), decoded up to the end token: what ``mmlm caption``
    prints and ``POST /caption`` answers. ``options``: ``mmlm.generate.generate``'s."""
    import torch

    with torch.inference_mode():
        ids = model.generate(images, **options)
    eot = model.cfg.text.eot_token_id
    return [tokenizer.decode(_until_end(row, eot), skip_special_tokens=True) for row in ids]


def _until_end(row, eot: int) -> list[int]:
    """The ids up to the end token: the padding after it is id 0, a real token ("!") in CLIP's BPE."""
    ids = row.tolist()
    return ids[: ids.index(eot)] if eot in ids else ids


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
