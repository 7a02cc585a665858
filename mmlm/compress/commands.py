"""``mmlm quantize`` and ``mmlm prune``: thin wrappers that load, compress and save; torch loads inside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quantize(
    model: str, out: Path | None = None, tokenizer: str | None = None, overwrite: bool = False, seed: int = 0
) -> Path:
    """Write an int8 copy of a model (every Linear layer, for CPU inference) as an mmlm folder.

    The folder loads with ``mmlm.load_pretrained`` and runs wherever a model name is taken
    (``mmlm zeroshot OUT``); it holds the int8 weights themselves.

    Args:
        model: the model: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any
            checkpoint ``mmlm.load_pretrained`` reads.
        out: output folder (required); new or empty; ``--overwrite`` replaces an mmlm model folder, nothing else.
        tokenizer: the model's tokenizer folder, copied into ``out``; default: the one beside ``model``, if any.
        overwrite: replace the mmlm model folder ``out`` (refused for any other non-empty folder).
        seed: seed of a preset's random weights.
    """
    from mmlm import checkpoint, outputs
    from mmlm.compress.quantize import is_int8, quantize_int8
    from mmlm.errors import UsageError
    from mmlm.factory import load

    out = _out(out)
    outputs.check(out, "mmlm", overwrite)  # before the slow part
    loaded = load(model, tokenizer=tokenizer, seed=seed)
    net = loaded.model
    if is_int8(net):
        raise UsageError(f"{model} is already int8: quantize the float model it was made from")
    tok = _own_tokenizer(loaded)
    before = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    _save(quantize_int8(net), tok, out, overwrite)
    after = (out / checkpoint.WEIGHTS_NAME).stat().st_size
    print(f"wrote {out}: int8 Linear layers, weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    return out


def prune(
    model: str,
    out: Path | None = None,
    keep: float = 0.5,
    data: str = "digits",
    split: str = "train",
    samples: int = 512,
    batch_size: int = 64,
    image_key: str = "filepath",
    caption_key: str | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> Path:
    """Prune a CLIP's attention heads, MLP units and channels to a smaller dense model, saved as an mmlm folder.

    The same fraction of heads stays in every layer, chosen with the MLP units and residual
    channels by activation magnitude on calibration images and captions; fine-tune the result
    (``configs/align/prune-recover-digits-tiny.yaml``) to win back what pruning cost.

    Args:
        model: the CLIP: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any
            checkpoint ``mmlm.load_pretrained`` reads.
        out: output folder (required); new or empty; ``--overwrite`` replaces an mmlm model folder, nothing else.
        keep: fraction of heads (and with them of MLP units and channels) kept in every layer, in (0, 1].
        data: calibration images with captions: ``digits``, a CSV / TSV / JSONL manifest or WebDataset shards.
        split: ``train`` or ``test`` for digits and CLIP_benchmark folders (calibrate on what you do not evaluate on).
        samples: calibration images (with one caption each).
        batch_size: images per forward pass.
        image_key: manifest column with the image path.
        caption_key: manifest column (default ``title``) or shard json field (default ``caption``).
        tokenizer: the model's tokenizer folder; default: the one beside ``model``, else the CLIP BPE.
        overwrite: replace the mmlm model folder ``out`` (refused for any other non-empty folder).
        seed: seed of a preset's random weights.
    """
    from mmlm import outputs
    from mmlm.compress.prune import prune_clip, pruned_config
    from mmlm.compress.quantize import is_int8
    from mmlm.errors import UsageError
    from mmlm.factory import load
    from mmlm.models import CLIP

    out = _out(out)
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be at least 1, got {samples} and {batch_size}")
    outputs.check(out, "mmlm", overwrite)  # before the slow part
    loaded = load(model, tokenizer=tokenizer, seed=seed)
    net = loaded.model
    if not isinstance(net, CLIP):
        raise UsageError(f"{model} is a {type(net).__name__}: mmlm prune takes a CLIP")
    if is_int8(net):
        raise ValueError(f"{model} is int8: prune the float model, then quantize the pruned one")
    pruned_config(net.cfg, keep)  # a bad keep fails before the data is read
    batches = _calibration(loaded, data, split, samples, batch_size, image_key, caption_key)
    small = prune_clip(net, keep, batches)
    _save(small, _own_tokenizer(loaded), out, overwrite)
    heads = f"{net.cfg.vision.heads}/{net.cfg.text.heads} -> {small.cfg.vision.heads}/{small.cfg.text.heads}"
    print(f"wrote {out}: {_count(net):,} -> {_count(small):,} parameters (heads {heads})")
    return out


def _save(net: Any, tok: Any, out: Path, overwrite: bool) -> None:
    """The model and its tokenizer (if any), as one mmlm folder (``mmlm.outputs``: new, empty, or replaced)."""
    from mmlm import checkpoint, outputs

    with outputs.writing(out, "mmlm", overwrite) as folder:
        checkpoint.write(net, folder)
        if tok is not None:
            tok.save(folder)


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _out(out: Path | str | None) -> Path:
    if out is None:
        raise ValueError("give the folder to write the model into: --out DIR")
    return Path(out)


def _own_tokenizer(loaded: Any) -> Any:
    """The tokenizer to save beside the compressed model: the one given or found with the checkpoint. The CLIP
    BPE, the default for its vocabulary, is not copied (``mmlm.factory.tokenizer_for`` finds it again)."""
    return loaded.tokenizer if loaded.tokenizer_source in ("given", "checkpoint") else None


def _calibration(loaded, data, split, samples, batch_size, image_key, caption_key):
    """Batches of ``image``, ``input_ids``, ``attention_mask`` (the first caption of each image), ``samples`` images."""
    from mmlm.data.eval_datasets import retrieval_data

    tok = loaded.require_tokenizer()
    loader = retrieval_data(data, loaded.transform, split, image_key, caption_key).loader(batch_size)
    seen = 0
    for batch in loader:
        if "image" not in batch:
            continue
        n = min(len(batch["image"]), samples - seen)
        tokens = tok([captions[0] for captions in batch["captions"][:n]])
        yield {"image": batch["image"][:n], "input_ids": tokens["input_ids"],
               "attention_mask": tokens["attention_mask"]}  # fmt: skip
        seen += n
        if seen >= samples:
            return
