#!/usr/bin/env python
"""Speed of mmlm against the reference libraries: one run, same machine, weights, inputs and dtype.

    python scripts/bench.py                                  # CPU sizes, a few minutes on 2 cores
    python scripts/bench.py --quick                          # tiny models: a smoke run, ratios mean little
    python scripts/bench.py --device cuda --dtype bf16 --full --json bench.json
    python scripts/bench.py --only '[clip_text, tokenizer]'  # a subset

Every workload builds the reference model with random weights, saves it in its library's
own format and loads that with ``mmlm.load_pretrained``, so both sides compute the same
function: the ``max|diff|`` column checks it. Each side then gets ``warmup`` untimed calls
and the median of ``repeats`` timed ones (inference under ``torch.inference_mode``).
``torch.set_num_threads`` is left at its default and reported.
Ratio = reference time / mmlm time: above 1, mmlm is faster.

Workloads (``--only`` takes these names):

=============  ==============================================  =====================================
name           mmlm                                            reference
=============  ==============================================  =====================================
clip_image     ``CLIP.encode_image`` (clip-vit-b-32 shapes)    open_clip ``ViT-B-32-quickgelu``
clip_text      ``CLIP.encode_text``, padded to the longest     ``encode_text`` on ``tokenize``'s 77
               (2nd row: the tower on all 77 columns)
clip_train     forward + CLIP loss + backward + AdamW          the same with ``open_clip.ClipLoss``
vit            ``VisionTransformer`` (vit-b-16 shapes)         timm ``vit_base_patch16_224``
bert           ``TextWithHeads`` (bert-base + pooler)          transformers ``BertModel``
tokenizer      ``get_tokenizer("clip")(texts)``                ``open_clip.tokenize(texts)``
=============  ==============================================  =====================================

``ViT-B-32-quickgelu`` is the OpenAI architecture that mmlm's ``clip-vit-b-32`` preset
describes (QuickGELU); open_clip's plain ``ViT-B-32`` differs only in using GELU.
With ``--dtype bf16|fp16`` inference casts both models to that dtype; the training step
keeps fp32 weights under ``torch.autocast`` on both sides.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built locally; never reach a hub

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

import mmlm
from mmlm.data import get_tokenizer, image_transform
from mmlm.losses import clip_loss
from mmlm.paths import ASSETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

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


TIERS = {
    "quick": Sizes(True, 4, 8, 4, 2, 4, 32, 200, 1, 2, 1, 2),
    "default": Sizes(False, 8, 32, 4, 2, 8, 128, 3000, 1, 3, 1, 2),
    "full": Sizes(False, 256, 256, 128, 128, 64, 256, 5000, 5, 20, 3, 10),
}

# The tiny shapes keep the real vocabularies and heads 64 wide (the width the converters assume).
TINY_CLIP = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
TINY_VIT = {"img_size": 64, "patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 2, "num_classes": 10}
TINY_BERT = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}

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
    """One line of the table."""

    workload: str
    mmlm_s: float
    reference_s: float
    reference: str  # which library and entry point
    diff: float  # max |mmlm - reference| over the compared outputs (see note)
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.reference_s / self.mmlm_s


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


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


# ------------------------------------------------------------------------------ inputs


def captions(n: int) -> list[str]:
    """``n`` of the bundled real captions (repeated when more are asked for)."""
    lines = (ASSETS / "captions.csv").read_text(encoding="utf-8").splitlines()[1:]
    titles = [line.split(",", 1)[1].strip().strip('"') for line in lines if line.strip()]
    return [titles[i % len(titles)] for i in range(n)]


def sentences(n: int) -> list[str]:
    """``n`` real English sentences from CPython's bundled documentation (repeated when more are asked for)."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s.strip()) <= 400]
    return [found[i % len(found)] for i in range(n)]


def images(vision_cfg: mmlm.VisionConfig, n: int) -> torch.Tensor:
    """The bundled photographs through the model's eval transform, (n, 3, S, S), repeated to fill ``n``."""
    from PIL import Image

    transform = image_transform(vision_cfg, train=False)
    paths = sorted((ASSETS / "images").glob("*.jpg"))
    return torch.stack([transform(Image.open(paths[i % len(paths)]).convert("RGB")) for i in range(n)])


# ------------------------------------------------------------------------------ models


def clip_pair(b: Bench) -> tuple[torch.nn.Module, mmlm.CLIP]:
    """An open_clip CLIP with random weights and the same weights in mmlm, through an OpenCLIP hub folder."""
    import open_clip
    from safetensors.torch import save_file

    if b.sizes.tiny:
        model_cfg, ref = TINY_CLIP, open_clip.CLIP(**TINY_CLIP)
    else:
        model_cfg, ref = open_clip.get_model_config("ViT-B-32-quickgelu"), open_clip.create_model("ViT-B-32-quickgelu")
    folder = b.tmp / "open_clip"
    folder.mkdir(exist_ok=True)
    save_file(ref.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return ref, mmlm.load_pretrained(folder)


def clip_inference_pair(b: Bench) -> tuple[torch.nn.Module, mmlm.CLIP]:
    """``clip_pair`` for inference, built once for the image and text workloads."""
    if "clip" not in b.cache:
        ref, ours = clip_pair(b)
        b.cache["clip"] = (b.infer(ref), b.infer(ours))
    return b.cache["clip"]


# ------------------------------------------------------------------------------ workloads


def clip_image(b: Bench) -> list[Row]:
    """CLIP image tower + projection on real photographs."""
    ref, ours = clip_inference_pair(b)
    x = images(ours.cfg.vision, b.sizes.image_batch).to(b.device, b.dtype)
    with torch.inference_mode():
        diff = max_diff(ours.encode_image(x, normalize=False), ref.encode_image(x))
        t = b.time(mmlm=lambda: ours.encode_image(x, normalize=False), ref=lambda: ref.encode_image(x))
    size = ours.cfg.vision.image_size
    return [Row("CLIP image encode", t["mmlm"], t["ref"], "open_clip encode_image", diff, f"B={len(x)}, {size} px")]


def clip_text(b: Bench) -> list[Row]:
    """CLIP text tower + projection on real captions; each side tokenised by its own library.

    mmlm pads a batch to its longest text (and ``encode_text`` drops padding columns);
    open_clip always pads to 77. The second row runs mmlm's tower on all 77 columns too,
    to separate the cost of the padding from the cost per token.
    """
    import open_clip

    ref, ours = clip_inference_pair(b)
    texts = captions(b.sizes.text_batch)
    ids77 = open_clip.tokenize(texts).to(b.device)  # (B, 77)
    tok = get_tokenizer("clip")(texts)
    ids, mask = tok["input_ids"].to(b.device), tok["attention_mask"].to(b.device)  # (B, longest)

    def ours_77() -> torch.Tensor:  # forward_features on every column, as open_clip computes
        return ours.text_projection(ours.text.pool(ours.text.forward_features(ids77), ids77))

    with torch.inference_mode():
        expected = ref.encode_text(ids77)
        diff = max_diff(ours.encode_text(ids, mask, normalize=False), expected)
        diff_77 = max_diff(ours_77(), expected)
        t = b.time(mmlm=lambda: ours.encode_text(ids, mask, normalize=False), mmlm_77=ours_77,
                   ref=lambda: ref.encode_text(ids77))  # fmt: skip
    n = f"B={len(texts)}"
    return [
        Row("CLIP text encode", t["mmlm"], t["ref"], "open_clip encode_text", diff,
            f"{n}; mmlm T={ids.shape[1]} (longest caption), open_clip T=77"),
        Row("CLIP text encode, both T=77", t["mmlm_77"], t["ref"], "open_clip encode_text", diff_77,
            f"{n}; mmlm tower on all 77 columns, no trimming"),
    ]  # fmt: skip


def clip_train(b: Bench) -> list[Row]:
    """One optimisation step: encode both towers, symmetric CLIP loss, backward, AdamW.

    Both start from the same weights and see the same pairs; the diff column is the gap
    between the two losses of the first step. mmlm's captions are padded to the longest,
    open_clip's to 77, as in each library's own training loop.
    """
    import open_clip

    b.cache.pop("clip", None)  # the inference pair may be in bf16 and is no longer needed
    ref, ours = (m.train().to(b.device) for m in clip_pair(b))
    n = b.sizes.train_batch
    x = images(ours.cfg.vision, n).to(b.device)
    texts = captions(n)
    ids77 = open_clip.tokenize(texts).to(b.device)
    tok = get_tokenizer("clip")(texts)
    ids, mask = tok["input_ids"].to(b.device), tok["attention_mask"].to(b.device)
    ref_loss_fn = open_clip.ClipLoss()

    def ref_loss() -> torch.Tensor:
        with b.autocast():
            image = F.normalize(ref.encode_image(x), dim=-1)
            text = F.normalize(ref.encode_text(ids77), dim=-1)
            return ref_loss_fn(image, text, ref.logit_scale.exp())

    def ours_loss() -> torch.Tensor:
        with b.autocast():
            return clip_loss(ours.encode_image(x), ours.encode_text(ids, mask), ours.scale())

    def stepper(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

        def step() -> None:
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    with torch.no_grad():
        diff = abs(ours_loss().item() - ref_loss().item())
    t = b.time(train=True, mmlm=stepper(ours, ours_loss), ref=stepper(ref, ref_loss))
    note = f"B={n}; mmlm T={ids.shape[1]}, open_clip T=77; diff = |loss gap| at step 1"
    return [Row("CLIP train step (fwd+bwd+AdamW)", t["mmlm"], t["ref"], "open_clip + ClipLoss", diff, note)]


def vit(b: Bench) -> list[Row]:
    """ViT-B/16 classification logits; mmlm loads timm's state dict file."""
    import timm
    from safetensors.torch import save_file

    kwargs = TINY_VIT if b.sizes.tiny else {}
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    path = b.tmp / "vit.safetensors"
    save_file(ref.state_dict(), path)
    ours = b.infer(mmlm.load_pretrained(path))
    ref = b.infer(ref)
    x = images(ours.cfg, b.sizes.vit_batch).to(b.device, b.dtype)
    with torch.inference_mode():
        diff = max_diff(ours(x), ref(x))
        t = b.time(mmlm=lambda: ours(x), ref=lambda: ref(x))
    return [Row("ViT-B/16 forward", t["mmlm"], t["ref"], "timm vit_base_patch16_224", diff,
                f"B={len(x)}, {ours.cfg.image_size} px, logits")]  # fmt: skip


def bert(b: Bench) -> list[Row]:
    """bert-base on a right-padded batch of real sentences; mmlm loads a ``save_pretrained`` folder.

    Compared: the last hidden state at real tokens and the pooler output.
    """
    import transformers

    config = transformers.BertConfig(**(TINY_BERT if b.sizes.tiny else {}))
    ref = transformers.BertModel(config)
    folder = b.tmp / "bert"
    ref.save_pretrained(folder)
    ours = b.infer(mmlm.load_pretrained(folder))  # TextWithHeads: encoder + pooler
    ref = b.infer(ref)
    # the bundled WordPiece vocabulary (4k tokens) gives real lengths and ids < bert-base's 30522
    tok = get_tokenizer(ASSETS / "tokenizer", context_length=b.sizes.bert_max_len)
    texts = sentences(b.sizes.bert_batch * 7)[::7]  # spread out: varied lengths
    batch = {k: v.to(b.device) for k, v in tok(texts).items()}
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        out, expected = ours(**batch), ref(**batch)
        diff = max(
            max_diff(out["hidden_states"][real], expected.last_hidden_state[real]),
            max_diff(out["pooled"], expected.pooler_output),
        )
        t = b.time(mmlm=lambda: ours(**batch), ref=lambda: ref(**batch))
    lengths = real.sum(1)
    note = (f"B={len(texts)}, T={real.shape[1]} (lengths {lengths.min().item()}-{lengths.max().item()}, "
            f"{real.float().mean().item():.0%} real); HF attention: {ref.config._attn_implementation}")  # fmt: skip
    return [Row("BERT-base forward (padded)", t["mmlm"], t["ref"], "transformers BertModel", diff, note)]


def tokenizer(b: Bench) -> list[Row]:
    """CLIP BPE on real sentences, texts -> (B, T) id tensor, warm caches on both sides.

    mmlm: HF ``tokenizers`` (Rust, its own thread pool) after the same Python clean-up as
    open_clip (ftfy + html unescape); open_clip: its pure-Python BPE. The diff column
    counts texts whose ids differ (mmlm's row padded to 77).
    """
    import open_clip

    texts = sentences(b.sizes.tokenizer_texts)
    ours = get_tokenizer("clip")
    ids77 = open_clip.tokenize(texts)
    ids = ours(texts)["input_ids"]
    differ = (F.pad(ids, (0, 77 - ids.shape[1])) != ids77).any(1).sum().item()
    t = b.time(mmlm=lambda: ours(texts), ref=lambda: open_clip.tokenize(texts))
    n = len(texts)
    note = f"{n} texts; mmlm {n / t['mmlm']:,.0f}/s, open_clip {n / t['ref']:,.0f}/s; diff = texts with other ids"
    return [Row("CLIP tokenizer", t["mmlm"], t["ref"], "open_clip.tokenize", float(differ), note)]


WORKLOADS: dict[str, Callable[[Bench], list[Row]]] = {
    "clip_image": clip_image,
    "clip_text": clip_text,
    "clip_train": clip_train,
    "vit": vit,
    "bert": bert,
    "tokenizer": tokenizer,
}

# ------------------------------------------------------------------------------ report


def environment(b: Bench, tier: str) -> dict[str, Any]:
    import open_clip
    import timm
    import tokenizers
    import transformers

    env = {
        "tier": tier,
        "device": str(b.device),
        "device_name": torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(b.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other processes on a shared host skew CPU timings
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mmlm": mmlm.__version__,
        "open_clip": open_clip.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "warmup/repeats": f"{b.sizes.warmup}/{b.sizes.repeats} (train {b.sizes.train_warmup}/{b.sizes.train_repeats})",
    }  # fmt: skip
    return env


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def markdown(rows: list[Row], env: dict[str, Any]) -> str:
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    lines = [f"<!-- {head} -->", ""]
    busy = max(env["load_avg_1min"], env.get("load_avg_1min_end", 0))
    if env["device"] == "cpu" and busy > 0.5 * (env["cpu_count"] or 1):
        lines += [
            (
                f"> load average {busy:.1f} on {env['cpu_count']} cores: other processes share this CPU, "
                "so times are inflated and ratios rougher than on an idle machine."
            ),
            "",
        ]
    lines += [
        "| workload | mmlm | reference | ratio (ref time / mmlm time, >1 = mmlm faster) | max abs diff | reference entry | notes |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {ms(r.mmlm_s)} | {ms(r.reference_s)} | {r.ratio:.2f}x | {r.diff:.1e} | {r.reference} | {r.note} |"
        )
    return "\n".join(lines)


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mmlm-bench-") as tmp:
        yield Path(tmp)


def run(
    device: str = "cpu",
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
    quick: bool = False,
    full: bool = False,
    only: list[str] | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    json_path: Path | None = None,
    seed: int = 0,
) -> list[Row]:
    """Run the workloads, print the Markdown table to stdout (progress goes to stderr).

    Args:
        device: torch device, e.g. ``cpu`` or ``cuda``.
        dtype: inference dtype of both sides; training keeps fp32 weights under autocast.
        quick: tiny models of the same architectures and tiny batches: a smoke run (seconds).
        full: large batches and more repeats, for a GPU.
        only: run only these workloads (default: all).
        warmup: override the tier's untimed calls per measurement (training too).
        repeats: override the tier's timed calls per measurement (training too).
        json_path: also write the environment and rows to this JSON file.
        seed: seed for the random weights.
    """
    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    tier = "quick" if quick else "full" if full else "default"
    sizes = TIERS[tier]
    if warmup is not None or repeats is not None:
        w, r = warmup if warmup is not None else sizes.warmup, repeats if repeats is not None else sizes.repeats
        sizes = Sizes(**{**asdict(sizes), "warmup": w, "repeats": r, "train_warmup": w, "train_repeats": r})
    names = list(only or WORKLOADS)
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workload(s) {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    torch.manual_seed(seed)
    rows: list[Row] = []
    with scratch() as tmp:
        b = Bench(sizes, torch.device(device), DTYPES[dtype], tmp)
        env = environment(b, tier)
        for name in names:
            log(f"{name} ...")
            start = time.perf_counter()
            rows += WORKLOADS[name](b)
            log(f"{name} done in {time.perf_counter() - start:.1f} s")
        b.cache.clear()
    env["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(markdown(rows, env))
    if json_path is not None:
        record = {"environment": env, "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]}
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
    return rows


def main(args: list[str] | None = None) -> None:
    """jsonargparse reads ``run``'s signature; ``--quick`` / ``--full`` are plain switches."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench.py")
    parser.add_function_arguments(run, skip={"quick", "full", "json_path"}, as_group=False)
    parser.add_argument("--quick", action=ActionYesNo, help="tiny models and batches: a smoke run (seconds)")
    parser.add_argument("--full", action=ActionYesNo, help="large batches and more repeats, for a GPU")
    parser.add_argument("--json", type=Path | None, default=None, help="also write the results to this JSON file")
    cfg = parser.parse_args(args)
    kwargs = cfg.as_dict()
    kwargs["json_path"] = kwargs.pop("json")
    run(**kwargs)


if __name__ == "__main__":
    main()
