"""The timing harness of ``scripts/bench.py`` and ``scripts/bench_retrieval.py``: tiers, interleaved timing,
rows, the per-run context (``Bench``) and the number formats.

It is its own module so that imports point one way: ``bench`` -> ``bench_retrieval`` -> ``bench_harness`` and
``bench`` -> ``bench_harness``. (When ``bench.py`` held these, ``bench_retrieval`` imported them back from it,
which needed ``bench.py`` to register itself in ``sys.modules`` so that ``Row`` and ``Bench`` stayed one class.)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

# ------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Sizes:
    """Model shapes and batch sizes of one benchmark tier."""

    tiny: bool  # tiny models of the same architectures (smoke test) instead of the real shapes
    image_batch: int  # CLIP image encoding
    text_batch: int  # CLIP text encoding (real captions)
    train_batch: int  # CLIP training step: this many image-caption pairs
    vit_batch: int  # ViT-B/16 classification forward
    bert_batch: int  # BERT forward on a right-padded batch
    bert_max_len: int  # BERT truncation length; the batch is padded to its longest text
    tokenizer_texts: int  # texts per tokenizer call
    warmup: int  # untimed calls before timing (inference)
    repeats: int  # timed calls; the median is reported (inference)
    train_warmup: int
    train_repeats: int
    memory_batch: int = 32  # CLIP training step whose peak memory is measured (clip_memory)
    # clip_train_patch_dropout (ViT-B/16): image compute must dominate for dropping patches to show (at B=4
    # on a CPU, AdamW over 150M parameters and the text tower are half the step)
    dropout_batch: int = 16


TIERS = {
    "quick": Sizes(True, 4, 8, 4, 2, 4, 32, 200, 1, 2, 1, 2, memory_batch=8, dropout_batch=4),
    "default": Sizes(False, 8, 32, 4, 2, 8, 128, 3000, 1, 3, 1, 2),
    "full": Sizes(False, 256, 256, 128, 128, 64, 256, 5000, 5, 20, 3, 10, dropout_batch=256),
}

# ------------------------------------------------------------------------------ timing


def timeit(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, in seconds.

    ``sync`` waits for queued device work (``torch.cuda.synchronize``), so a timed call
    includes its own kernels and none of the previous call's.
    """
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def compare(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median time of each function, measured in interleaved rounds (a, b, a, b, ...).

    Interleaving makes a slow drift of the machine (clock, other processes on a shared
    host) fall on both sides alike instead of on whichever ran second.
    """
    for fn in fns.values():
        timeit(fn, warmup, 0, sync)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timeit(fn, 0, 1, sync)
    return {name: statistics.median(t) for name, t in times.items()}



@dataclass
class Row:
    """One line of the table. ``mmlm_s`` and ``reference_s`` are in ``unit``: seconds per call, or MiB."""

    workload: str
    mmlm_s: float
    reference_s: float
    reference: str  # which library and entry point
    diff: float  # agreement of the compared outputs (see note), as ``agreement`` says
    note: str = ""
    unit: Literal["s", "MiB"] = "s"
    agreement: Literal["max_abs", "min_cos"] = "max_abs"  # max |mmlm - reference|, or the lowest cosine to fp32
    skipped: str = ""  # why the row did not run here (its numbers are then NaN)

    @property
    def ratio(self) -> float:
        return self.reference_s / self.mmlm_s


def skipped(workload: str, reference: str, reason: str, unit: Literal["s", "MiB"] = "s") -> Row:
    """A row that cannot run on this device: printed with its reason, never dropped."""
    nan = float("nan")
    return Row(workload, nan, nan, reference, nan, unit=unit, skipped=reason)


@dataclass
class Bench:
    """What every workload needs: sizes, where and in what dtype to run, a scratch folder."""

    sizes: Sizes
    device: torch.device
    dtype: torch.dtype
    tmp: Path
    cache: dict[str, Any] = field(default_factory=dict)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, train: bool = False, **fns: Callable[[], Any]) -> dict[str, float]:
        """Median seconds per call of each named function (see ``compare``)."""
        s = self.sizes
        warmup, repeats = (s.train_warmup, s.train_repeats) if train else (s.warmup, s.repeats)
        return compare(fns, warmup, repeats, self.sync)

    def infer(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in eval mode on the device, cast to the benchmark dtype."""
        return model.eval().to(self.device, self.dtype)

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)




def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def amount(value: float, unit: str) -> str:
    return ms(value) if unit == "s" else f"{value:,.0f} {unit}"
