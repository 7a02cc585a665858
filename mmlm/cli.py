"""The ``mmlm`` command: thin wrappers on typed functions (jsonargparse reads the signatures).

    mmlm fit|validate|test|predict --config FILE   LightningCLI: model and data are class_path choices
    mmlm convert SRC DST [--to mmlm|hf]            any checkpoint load_pretrained reads -> mmlm / transformers
    mmlm tokenizer train '[FILE, ...]' --vocab_size N --out DIR
    mmlm zeroshot MODEL --dataset DATA                zero-shot classification, CLIP_benchmark JSON + confusion PNG
    mmlm eval-retrieval MODEL --dataset DATA          image<->text recall@k in bounded memory
    mmlm demo                                      encode the bundled images and captions, print similarities
    mmlm presets                                   list the model presets
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Literal

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def presets() -> None:
    """List the model presets with their type and shape."""
    from mmlm.config import PRESETS, from_name

    for name in sorted(PRESETS):
        cfg = from_name(name)
        towers = [cfg.vision, cfg.text] if cfg.model_type == "clip" else [cfg]
        shape = " + ".join(f"{t.model_type} {t.width}x{t.depth}" for t in towers)
        print(f"{name:20s} {cfg.model_type:7s} {shape}  {(PRESETS[name].__doc__ or '').strip()}")


def demo(
    preset: str = "clip-tiny",
    manifest: Path = ASSETS / "captions.csv",
    checkpoint: Path | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Encode the bundled photographs and one caption each; print the image-text cosine similarities.

    Args:
        preset: model preset to build (random weights) when no checkpoint is given.
        manifest: CSV with ``filepath`` and ``title`` columns (paths relative to the CSV).
        checkpoint: an mmlm checkpoint folder to load instead of random weights.
        seed: seed for the random initialisation.
    """
    from PIL import Image

    import mmlm
    from mmlm.data import get_tokenizer, image_transform

    torch.manual_seed(seed)
    model = (mmlm.load(checkpoint) if checkpoint else mmlm.create_model(preset)).eval()
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    first: dict[str, str] = {}
    for row in rows:  # one caption per image: the first listed
        first.setdefault(row["filepath"], row["title"])
    paths, captions = list(first), list(first.values())

    transform = image_transform(model.cfg.vision, train=False)
    images = torch.stack([transform(Image.open(manifest.parent / p).convert("RGB")) for p in paths])
    tokens = get_tokenizer("clip", context_length=model.cfg.text.context_length)(captions)
    with torch.no_grad():
        sim = model.encode_image(images) @ model.encode_text(tokens["input_ids"], tokens["attention_mask"]).T

    names = [Path(p).stem[:10] for p in paths]
    print(f"{model.cfg.__class__.__name__} '{preset}': {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"cosine similarity, {len(paths)} images (rows) x {len(captions)} captions (columns)")
    print(" " * 11 + " ".join(f"{i:>5d}" for i in range(len(captions))))
    for name, row in zip(names, sim):
        print(f"{name:>10s} " + " ".join(f"{v:5.2f}" for v in row.tolist()))
    for i, c in enumerate(captions):
        print(f"  caption {i:2d}: {c}")
    accuracy = (sim.argmax(1) == torch.arange(len(paths))).float().mean().item()
    print(f"image->caption top-1: {accuracy:.1%} (chance {1 / len(paths):.1%})")
    return sim


def convert(src: Path, dst: Path, to: Literal["mmlm", "hf"] = "mmlm", act: str | None = None) -> None:
    """Convert a checkpoint (HF, OpenAI / OpenCLIP, timm, sentence-transformers, mmlm) to mmlm or transformers.

    Args:
        src: checkpoint file or folder.
        dst: output folder.
        to: ``mmlm`` (safetensors + config.json) or ``hf`` (a transformers CLIPModel folder; CLIP only).
        act: MLP activation of an OpenAI / OpenCLIP file when it cannot be detected (``quick_gelu`` or ``gelu``).
    """
    from mmlm.pretrained import convert as run

    kwargs = {"act": act} if act else {}
    print(f"wrote {run(src, dst, to, **kwargs)}")


def train_tokenizer(
    files: list[Path], vocab_size: int = 8000, out: Path = Path("tokenizer"), kind: Literal["wordpiece", "bpe"] = "wordpiece"
) -> None:
    """Train a WordPiece (BERT) or byte-level BPE (GPT-2) tokenizer and save it as a tokenizer.json folder.

    Args:
        files: plain-text files.
        vocab_size: target vocabulary size, special tokens included.
        out: output folder (loads with ``mmlm.get_tokenizer(out)`` or transformers' ``AutoTokenizer``).
        kind: ``wordpiece`` or ``bpe``.
    """
    from mmlm.data import train_tokenizer as train

    tok = train(files, vocab_size, out, kind)
    print(f"{kind} tokenizer with {tok.vocab_size} tokens written to {out}")


def zeroshot(
    model: str,
    dataset: str = "digits",
    classnames: Path | None = None,
    templates: str | None = None,
    split: str = "test",
    output: Path | None = None,
    confusion_matrix: Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    act: Literal["gelu", "quick_gelu"] | None = None,
    tokenizer: str | None = None,
    image_key: str = "filepath",
    label_key: str = "label",
    language: str = "en",
    seed: int = 0,
) -> dict:
    """Zero-shot classification: acc1, acc5, mean per-class recall, printed as CLIP_benchmark's result JSON.

    Args:
        model: an mmlm checkpoint folder, anything ``mmlm.load_pretrained`` reads (OpenCLIP / OpenAI
            state dict, transformers CLIP folder), or a preset name (random weights, for smoke tests).
        dataset: ``digits``, an ImageFolder, a CSV / TSV / JSONL manifest, WebDataset shards
            (``data/{0..9}.tar``, image + ``cls``) or a CLIP_benchmark ``wds`` folder.
        classnames: file with one class name per line, in label order; default: the dataset's.
        templates: ``simple``, ``openai`` (the 80 CLIP ImageNet prompts), ``digits``, or a file with one
            template per line (``{}`` or ``{c}`` marks the class); default: the dataset's own, else ``openai``.
        split: ``train`` or ``test`` for digits and CLIP_benchmark folders.
        output: write the result JSON here too.
        confusion_matrix: write the confusion matrix here (PNG).
        batch_size: images per forward pass.
        num_workers: DataLoader workers reading images.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        act: MLP activation of an OpenAI / OpenCLIP state dict when it cannot be detected.
        tokenizer: tokenizer name or folder; default: the checkpoint's, else the CLIP BPE.
        image_key: manifest column with the image path.
        label_key: manifest column with the label (class name or integer).
        language: the ``language`` field of the result.
        seed: seed of a preset's random weights.
    """
    from mmlm import benchmark
    from mmlm.data import image_transform
    from mmlm.zeroshot import (
        OPENAI_IMAGENET_TEMPLATES,
        load_classnames,
        load_templates,
        save_confusion_matrix,
        zero_shot_classify,
    )

    net = benchmark.load_model(model, act, device, seed)
    tok = benchmark.model_tokenizer(net, tokenizer, model)
    names = load_classnames(classnames) if classnames is not None else None
    data = benchmark.classification_data(dataset, image_transform(net.cfg.vision, train=False), split, names,
                                         image_key, label_key)  # fmt: skip
    if not data.classes:
        raise ValueError(f"{dataset} does not name its classes: give --classnames")
    prompts = load_templates(templates) if templates else data.templates or list(OPENAI_IMAGENET_TEMPLATES)
    metrics, logits, labels = zero_shot_classify(net, tok, data.loader(batch_size, num_workers), data.classes, prompts, device)
    if confusion_matrix is not None:
        save_confusion_matrix(labels, logits.argmax(1), data.classes, confusion_matrix)
    result = benchmark.benchmark_result(dataset, *benchmark.describe_model(model, seed), "zeroshot_classification",
                                        metrics, language)  # fmt: skip
    benchmark.write_result(result, output)
    return result


def eval_retrieval(
    model: str,
    dataset: str = "digits",
    split: str = "test",
    output: Path | None = None,
    ks: list[int] = [1, 5, 10],  # noqa: B006 (jsonargparse reads the default; never mutated)
    batch_size: int = 64,
    chunk_size: int = 1024,
    num_workers: int = 0,
    device: str = "cpu",
    act: Literal["gelu", "quick_gelu"] | None = None,
    tokenizer: str | None = None,
    image_key: str = "filepath",
    caption_key: str | None = None,
    language: str = "en",
    seed: int = 0,
) -> dict:
    """Image-text retrieval: recall@k, mean and median rank both ways, as CLIP_benchmark's result JSON.

    Several captions per image count an image query as a hit when any of its captions is in the
    top k. Scores are computed ``chunk_size`` query rows at a time, never as the full matrix.

    Args:
        model: an mmlm checkpoint folder, anything ``mmlm.load_pretrained`` reads, or a preset name
            (random weights, for smoke tests).
        dataset: ``digits``, a CSV / TSV / JSONL manifest (one row per caption; repeat the image path
            for more captions), WebDataset shards (image + ``txt`` lines or ``json`` captions) or a
            CLIP_benchmark ``wds`` folder.
        split: ``train`` or ``test`` for digits and CLIP_benchmark folders.
        output: write the result JSON here too.
        ks: the k of recall@k.
        batch_size: images per forward pass.
        chunk_size: query rows scored at a time (memory: chunk_size x max(images, texts) floats).
        num_workers: DataLoader workers reading images.
        device: ``cpu``, ``cuda``, ...
        act: MLP activation of an OpenAI / OpenCLIP state dict when it cannot be detected.
        tokenizer: tokenizer name or folder; default: the checkpoint's, else the CLIP BPE.
        image_key: manifest column with the image path.
        caption_key: manifest column (default ``title``) or shard json field (default ``caption``).
        language: the ``language`` field of the result.
        seed: seed of a preset's random weights.
    """
    from mmlm import benchmark
    from mmlm.data import image_transform
    from mmlm.retrieval import evaluate_retrieval

    net = benchmark.load_model(model, act, device, seed)
    tok = benchmark.model_tokenizer(net, tokenizer, model)
    data = benchmark.retrieval_data(dataset, image_transform(net.cfg.vision, train=False), split, image_key, caption_key)
    metrics = evaluate_retrieval(net, tok, data.loader(batch_size, num_workers), device, tuple(ks), chunk_size)
    result = benchmark.benchmark_result(dataset, *benchmark.describe_model(model, seed), "zeroshot_retrieval",
                                        metrics, language)  # fmt: skip
    benchmark.write_result(result, output)
    return result


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """LightningCLI over every mmlm task and data module (``class_path`` in the YAML)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    import mmlm.data  # noqa: F401  (registers the data modules as subclasses)
    import mmlm.tasks  # noqa: F401
    from mmlm.callbacks import RestoreRNG

    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # tasks build their own optimizer and warmup + cosine schedule
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [RestoreRNG()]},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in LIGHTNING_COMMANDS:
        lightning_cli(argv)  # None: LightningCLI reads sys.argv itself
    else:
        CLI({"convert": convert, "demo": demo, "presets": presets, "tokenizer": {"train": train_tokenizer},
             "zeroshot": zeroshot, "eval-retrieval": eval_retrieval}, args=args)  # fmt: skip


if __name__ == "__main__":
    main()
