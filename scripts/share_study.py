#!/usr/bin/env python
"""What sharing blocks between CLIP's towers buys: parameters, zero-shot accuracy, retrieval recall, speed.

    python scripts/share_study.py --out docs --workers 2                     # the README's table and plot
    python scripts/share_study.py --out /tmp/s --steps 5 --seeds 1 --modes '[none, all]'   # a smoke run

Every run is the main job, ``configs/align/clip-digits-tiny.yaml`` (clip-tiny on the bundled digits),
started through ``mmlm fit``'s own CLI with only these changed: the seed, ``max_steps``, the sharing
mode (``model.init_args.model_overrides``), a temporary run folder, and no validation or periodic
checkpoints during training. Its final checkpoint is then scored by ``mmlm zeroshot`` and
``mmlm eval-retrieval`` on the 360 held-out digits: the split of the config's data module (data seed 0),
so every run is scored on the same scans and none was trained on. The seed sets the initial
weights and the augmentation; the shuffle order is the config's.

A mode is a ``CLIPConfig.share`` value (``none``, ``attention``, ``attention_mlp``, ``all``), optionally
limited to the layers [START, STOP) as ``MODE@START:STOP``: ``attention_mlp@1:2`` shares attention
and MLP in layer 1 only. The default modes are the four plus ``attention_mlp`` on the upper half of
the layers.

Writes OUT/share_study.json and OUT/images/share_study.png (the layout of docs/, so ``--out docs``
writes the README's files) and prints the Markdown table. Throughput is training samples per
second, each run at one torch thread with ``workers`` runs at a time; on a shared machine it moves
with the load, recorded at the start and end.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, get_args

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

from mmlm.config import PRESETS, Share, from_name, update  # light: no torch

CONFIG = ROOT / "configs" / "align" / "clip-digits-tiny.yaml"
JSON_NAME = "share_study.json"
PNG_NAME = "images/share_study.png"
# the columns of the table and the plot, as mmlm eval-retrieval names them (text -> image is "image_retrieval")
RECALLS = {
    "image_retrieval_recall@1": "text→image R@1",
    "image_retrieval_recall@5": "text→image R@5",
    "text_retrieval_recall@1": "image→text R@1",
    "text_retrieval_recall@5": "image→text R@5",
}
# one thread per process everywhere: torch's intra-op pool, OpenMP / MKL, and the tokenizer's Rust pool
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class UsageError(ValueError):
    """A bad argument: reported in one line, before anything is trained."""


@dataclass(frozen=True)
class Mode:
    """A sharing mode and the layers [start, stop) it applies to (None: every layer)."""

    share: str
    layers: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.share if self.layers is None else f"{self.share}@{self.layers[0]}:{self.layers[1]}"

    def overrides(self) -> dict[str, Any]:
        return {"share": self.share, "share_layers": None if self.layers is None else list(self.layers)}


def parse_mode(text: str, preset: str) -> Mode:
    """``MODE`` or ``MODE@START:STOP``, checked against the preset's depth by ``CLIPConfig`` itself."""
    share, _, layers = text.partition("@")
    known = ", ".join(get_args(Share))
    if share not in get_args(Share):
        raise UsageError(f"unknown mode {text!r}: use one of {known}, optionally @START:STOP (e.g. attention_mlp@1:2)")
    span: tuple[int, int] | None = None
    if layers:
        try:
            start, stop = (int(v) for v in layers.split(":"))
        except ValueError:
            raise UsageError(f"mode {text!r}: write the layers as @START:STOP, e.g. {share}@1:2") from None
        if share == "none":
            raise UsageError(f"mode {text!r}: 'none' shares no layers, so it takes no @START:STOP")
        span = (start, stop)
    try:
        update(from_name(preset), **Mode(share, span).overrides())
    except ValueError as e:
        raise UsageError(f"mode {text!r}: {e}") from None
    return Mode(share, span)


def recall_ceiling(ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Expected recall@k, both ways, of a model that knows each held-out scan's class and nothing more.

    A digit's caption names its class in a template drawn independently of the scan, so among the
    scans (captions) of one class the right one is no more likely than any other: min(1, k / n_class).
    """
    import numpy as np

    from mmlm.data.digits import digits_image_text

    labels = digits_image_text("test").labels
    per_class = np.bincount(labels)[labels]
    return {f"recall@{k}": float(np.minimum(1.0, k / per_class).mean()) for k in ks}


def default_modes(preset: str) -> list[str]:
    depth = from_name(preset).vision.depth
    return [*get_args(Share), f"attention_mlp@{depth // 2}:{depth}"]


# ------------------------------------------------------------------------------ one run (in a worker process)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def train_and_score(config: str, mode: Mode, seed: int, steps: int, folder: str) -> dict[str, Any]:
    """``mmlm fit`` the config in ``folder``, then ``mmlm zeroshot`` and ``mmlm eval-retrieval`` its last checkpoint.

    Everything the run prints goes to ``folder/log.txt``; the folder is removed once scored.
    """
    import logging

    from lightning.pytorch.callbacks import Timer

    from mmlm.cli import eval_retrieval, zeroshot
    from mmlm.layers import Block
    from mmlm.runs import RunCLI

    callbacks = [  # a Timer for the throughput; the last state saved once, at the end (mmlm's SaveFinalState)
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0},
        },
        {"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"interval": "step", "verbose": False}},
    ]
    args = [
        "fit", "--config", config, "--seed_everything", str(seed), "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", folder, "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.callbacks", json.dumps(callbacks), "--model.init_args.model_overrides", json.dumps(mode.overrides()),
    ]  # fmt: skip
    Path(folder).mkdir(parents=True)
    for name in ("lightning.pytorch", "lightning.fabric"):  # their handlers hold the real stderr: "GPU available", ...
        logging.getLogger(name).setLevel(logging.WARNING)
    with open(Path(folder) / "log.txt", "w") as log, redirect_stdout(log), redirect_stderr(log):
        cli = RunCLI(args)
        ckpt = cli.trainer.checkpoint_callback.last_model_path
        accuracy = zeroshot(ckpt, dataset="digits", split="test")
        retrieval = eval_retrieval(ckpt, dataset="digits", split="test", ks=[1, 5, 10])
    train_s = next(c for c in cli.trainer.callbacks if isinstance(c, Timer)).time_elapsed("train")
    model = cli.model.model
    blocks = {id(p): p.numel() for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
    samples = steps * cli.datamodule.batch_size
    shutil.rmtree(folder)
    return {
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),  # parameters() yields a shared tensor once
        "block_params": sum(blocks.values()),
        "train_loss": float(cli.trainer.callback_metrics["train/loss"]),
        "zeroshot_acc1": accuracy["metrics"]["acc1"],
        "zeroshot_mean_per_class_recall": accuracy["metrics"]["mean_per_class_recall"],
        "eval_images": accuracy["samples"]["used"],
        **{k: v for k, v in retrieval["metrics"].items() if "recall@" in k},
        "train_s": train_s,
        "samples_per_s": samples / train_s,
    }


# ------------------------------------------------------------------------------ summary


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (None for one value), min, max and the values in seed order."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summarise(mode: Mode, runs: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> dict[str, Any]:
    runs = sorted(runs, key=lambda r: r["seed"])
    metrics = ["zeroshot_acc1", "zeroshot_mean_per_class_recall", *RECALLS, "samples_per_s", "train_loss"]
    out: dict[str, Any] = {
        **mode.overrides(),
        "params": runs[0]["params"],
        "block_params": runs[0]["block_params"],
        **{m: spread([r[m] for r in runs]) for m in metrics},
    }
    if baseline is not None:  # paired by seed: same initial RNG state and data order, only the sharing differs
        base = {r["seed"]: r["zeroshot_acc1"] for r in baseline}
        diffs = [r["zeroshot_acc1"] - base[r["seed"]] for r in runs if r["seed"] in base]
        if diffs:
            out["zeroshot_acc1_minus_none"] = spread(diffs)
    out["runs"] = runs
    return out


def pm(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (``mean`` alone for one seed)."""
    text = f"{s['mean'] * scale:.{digits}f}"
    return text if s["std"] is None else f"{text} ± {s['std'] * scale:.{digits}f}"


def layer_span(start: int, stop: int) -> str:
    return str(start) if stop - start == 1 else f"{start}–{stop - 1}"


def markdown(result: dict[str, Any]) -> str:
    modes = result["modes"]
    base = modes.get("none", {}).get("params")
    lines = [
        "| mode | shared layers | parameters | of which blocks | zero-shot top-1 (%) | "
        + " | ".join(f"{v} (%)" for v in RECALLS.values())
        + " | samples/s |",
        "|---|---|---:|---:|---:|" + "---:|" * len(RECALLS) + "---:|",
    ]
    for name, m in modes.items():
        layers = "–" if m["share"] == "none" else "all" if m["share_layers"] is None else layer_span(*m["share_layers"])
        saved = f" ({m['params'] / base - 1:+.1%})" if base and name != "none" else ""
        cells = [name, layers, f"{m['params']:,}{saved}", f"{m['block_params']:,}", pm(m["zeroshot_acc1"])]
        cells += [pm(m[k]) for k in RECALLS] + [pm(m["samples_per_s"], 1.0, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Zero-shot accuracy, retrieval recall@5 and throughput per mode: mean ± std, each seed a dot beside it.

    The axes are zoomed to the data (not from 0): the modes differ by a few points, which a 0-100 scale hides.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    names = list(modes)
    ticks = [f"{n}\n{modes[n]['params'] / 1e6:.3f} M" for n in names]
    ceiling = result["recall_ceiling"]["recall@5"] * 100
    panels = [  # title, (metric, label) per series, scale, (reference line, its label)
        ("held-out zero-shot top-1 (%), chance 10%", [("zeroshot_acc1", "top-1")], 100.0, None),
        ("retrieval recall@5 (%)", [("image_retrieval_recall@5", "text→image"), ("text_retrieval_recall@5", "image→text")],
         100.0, (ceiling, "expected from knowing the class alone")),
        ("training samples/s (1 thread, data loading included)", [("samples_per_s", "samples/s")], 1.0, None),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4), constrained_layout=True)
    for ax, (title, series, scale, line) in zip(axes, panels):
        for j, (key, label) in enumerate(series):
            pos = [i + 0.25 * (j - (len(series) - 1) / 2) for i in range(len(names))]
            means = [modes[n][key]["mean"] * scale for n in names]
            stds = [(modes[n][key]["std"] or 0.0) * scale for n in names]
            ax.errorbar(
                pos, means, yerr=stds, fmt="o", capsize=4, color=f"C{j}", label=label if len(series) > 1 else None
            )
            for p, n in zip(pos, names):
                values = [v * scale for v in modes[n][key]["values"]]
                ax.plot([p + 0.08] * len(values), values, ".", color="grey", markersize=5)
        if line is not None:
            ax.axhline(line[0], color="grey", linestyle="--", linewidth=1, label=line[1])
        if len(series) > 1 or line is not None:  # headroom above the data, so the legend covers no point
            low, high = ax.get_ylim()
            ax.set_ylim(low, high + 0.35 * (high - low))
            ax.legend(fontsize=8, loc="upper right", ncols=2)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)), ticks, fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{result['model']} on the digits, {result['steps']} steps; dots: the {len(result['seeds'])} seeds, "
                 "marker and bar: mean ± std; under each mode: its unique parameters", fontsize=10)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def command(out: Path, steps: int, seeds: int, modes: list[str] | None, workers: int, config: Path) -> str:
    """The command line that makes these results again."""
    args = ["--out", str(out), "--steps", str(steps), "--seeds", str(seeds), "--workers", str(workers)]
    if modes:
        args += ["--modes", f"[{', '.join(modes)}]"]
    if Path(config).resolve() != CONFIG:
        args += ["--config", shown(config)]
    return "python scripts/share_study.py " + shlex.join(args)


def log(msg: str) -> None:
    print(f"[share_study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    out: Path,
    steps: int = 600,
    seeds: int = 3,
    modes: list[str] | None = None,
    workers: int = 1,
    config: Path = CONFIG,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train every mode with every seed, write the JSON and the plot, print the Markdown table.

    Args:
        out: folder for share_study.json and images/share_study.png.
        steps: training steps of every run (the config's batch size).
        seeds: runs per mode, with seeds 0 .. seeds - 1.
        modes: sharing modes, ``MODE`` or ``MODE@START:STOP`` (default: none, attention, attention_mlp,
            all, and attention_mlp on the upper half of the layers).
        workers: runs trained at a time, each in its own process at one torch thread.
        config: the ``mmlm fit`` config every run starts from (a ContrastiveAlignment on the digits).
        overwrite: replace the results already in ``out``.
    """
    if steps < 1 or seeds < 1 or workers < 1:
        raise UsageError(f"steps, seeds and workers must be 1 or more, got {steps}, {seeds}, {workers}")
    if not Path(config).is_file():
        raise UsageError(f"--config {config}: no such file")
    spec = yaml.safe_load(Path(config).read_text())
    preset = spec["model"]["init_args"]["model"]
    if preset not in PRESETS:
        raise UsageError(
            f"--config {config}: its model {preset!r} is not a preset; the study builds each mode from one"
        )
    chosen = [parse_mode(m, preset) for m in (modes or default_modes(preset))]
    if len({m.name for m in chosen}) < len(chosen):
        raise UsageError(f"modes {[m.name for m in chosen]}: each mode once")
    targets = [Path(out) / JSON_NAME, Path(out) / PNG_NAME]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"{', '.join(existing)} already exist: give another --out, or pass --overwrite")

    load_start = os.getloadavg()
    started = time.perf_counter()
    jobs = [(m, s) for s in range(seeds) for m in chosen]
    os.environ.update(ONE_THREAD)  # inherited by the workers
    results: dict[str, list[dict[str, Any]]] = {m.name: [] for m in chosen}
    with tempfile.TemporaryDirectory(prefix="mmlm-share-study-") as tmp:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread)
        with pool:
            futures = {
                pool.submit(train_and_score, str(config), m, s, steps, str(Path(tmp) / f"{m.name}-seed{s}")): (m, s)
                for m, s in jobs
            }
            for done, future in enumerate(as_completed(futures), 1):
                m, s = futures[future]
                r = future.result()
                results[m.name].append(r)
                log(f"{m.name} seed {s}: zero-shot {r['zeroshot_acc1']:.1%}, {r['samples_per_s']:.0f} samples/s "
                    f"({done}/{len(jobs)}, {time.perf_counter() - started:.0f} s)")  # fmt: skip

    import lightning
    import torch

    result = {
        "command": command(out, steps, seeds, modes, workers, config),
        "config": shown(config),
        "model": preset,
        "steps": steps,
        "batch_size": spec["data"]["init_args"]["batch_size"],
        "seeds": list(range(seeds)),  # seed_everything: initial weights and augmentation; the data seed stays 0
        "evaluation": "mmlm zeroshot / mmlm eval-retrieval --dataset digits --split test on each run's last checkpoint",
        "recall_ceiling": recall_ceiling(),  # what knowing the class alone gives; the captions say nothing more
        "environment": {
            "workers": workers,
            "torch_threads_per_run": 1,
            "cpu_count": os.cpu_count(),
            "load_avg_start": [round(v, 2) for v in load_start],  # 1, 5, 15 min; other jobs slow the runs down
            "load_avg_end": [round(v, 2) for v in os.getloadavg()],
            "wall_s": round(time.perf_counter() - started, 1),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "modes": {},
    }  # fmt: skip
    for m in chosen:
        result["modes"][m.name] = summarise(m, results[m.name], results.get("none") if m.name != "none" else None)
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    targets[0].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot(result, targets[1])
    log(f"wrote {targets[0]} and {targets[1]}")
    print(markdown(result))
    return result


def main(args: list[str] | None = None) -> None:
    """jsonargparse reads ``run``'s signature; a bad value ends in one line on stderr, not a traceback."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], prog="share_study.py")
    parser.add_function_arguments(run, skip={"overwrite"}, as_group=False)
    parser.add_argument("--overwrite", action=ActionYesNo, help="replace the results already in --out")
    cfg = parser.parse_args(args)
    try:
        run(**cfg.as_dict())
    except UsageError as e:
        print(f"share_study.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
