#!/usr/bin/env python
"""Speed of mmlm against the reference libraries: one run, same machine, weights, inputs and dtype.

    python scripts/bench.py                                  # CPU sizes: about 15 minutes on 2 busy cores
    python scripts/bench.py --quick                          # tiny models: a smoke run, ratios mean little
    python scripts/bench.py --device cuda --dtype bf16 --full --json bench.json
    python scripts/bench.py --only '[clip_text, tokenizer]'  # a subset

Every workload builds the reference model with random weights, saves it in its library's
own format and loads that with ``mmlm.load_pretrained``, so both sides compute the same
function: the agreement column checks it. Each side then gets ``warmup`` untimed calls
and the median of ``repeats`` timed ones (inference under ``torch.inference_mode``).
``torch.set_num_threads`` is left at its default and reported.
Ratio = reference time / mmlm time: above 1, mmlm is faster.

Workloads (``--only`` takes these names):

=========================  ==============================================  =====================================
name                       mmlm                                            reference
=========================  ==============================================  =====================================
clip_image                 ``CLIP.encode_image`` (clip-vit-b-32 shapes)    open_clip ``ViT-B-32-quickgelu``
clip_text                  ``CLIP.encode_text``, padded to the longest     ``encode_text`` on ``tokenize``'s 77
                           (2nd row: the tower on all 77 columns)
clip_int8                  both encoders after ``quantize_int8`` (CPU)     ``quantize_dynamic`` of open_clip's
                                                                           ``nn.Linear`` layers, as its users do
clip_train                 forward + CLIP loss + backward + AdamW          the same with ``open_clip.ClipLoss``
clip_train_patch_dropout   the same for ViT-B/16, ``patch_dropout=0.5``     open_clip, ``patch_dropout=0.5``
                           (2nd row: against mmlm's step without)
clip_memory                peak memory of that step at B=32, each in a     open_clip: plain, and with
                           fresh process: plain, grad checkpointing,       ``set_grad_checkpointing``; no
                           ``ContrastiveAlignment(micro_batches=4)``       exact micro-batching (its plain step)
vit                        ``VisionTransformer`` (vit-b-16 shapes)         timm ``vit_base_patch16_224``
bert                       ``TextWithHeads`` (bert-base + pooler)          transformers ``BertModel``
mlm_train                  ``LanguagePretraining.training_step`` (MLM)     transformers ``BertForMaskedLM``
                           + backward + AdamW                              with ``labels``, same batch
tokenizer                  ``get_tokenizer("clip")(texts)``                ``open_clip.tokenize(texts)``
coca_generate              ``CoCa.generate`` greedy, with and without      open_clip ``CoCa`` (coca_ViT-B-32):
                           the KV cache (tokens/s in the notes)            forward + argmax, token by token
index_build, sync, query   ``mmlm index build`` / ``sync``, ``mmlm serve`` see ``scripts/bench_retrieval.py``
                           (in ``scripts/bench_retrieval.py``)
serve_runtime              ``mmlm serve --runtime onnx`` (fp32, int8):     ``mmlm serve --runtime torch`` (fp32,
                           cold start, memory, latency, throughput         ``--int8``); ``scripts/bench_serve.py``
=========================  ==============================================  =====================================

``ViT-B-32-quickgelu`` is the OpenAI architecture that mmlm's ``clip-vit-b-32`` preset
describes (QuickGELU); open_clip's plain ``ViT-B-32`` differs only in using GELU.
With ``--dtype bf16|fp16`` inference casts both models to that dtype; training steps
keep fp32 weights under ``torch.autocast`` on both sides. The int8 rows need the CPU
(and take float32 weights whatever ``--dtype`` says); elsewhere they are printed as skipped.

The agreement column is ``max|mmlm - reference|`` (the notes say of what), except for
int8 rows: the lowest cosine of an int8 embedding to the float32 one. Memory rows give
MiB; their ratio is reference / mmlm too (above 1, mmlm needs less).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built locally; never reach a hub

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

from bench_harness import TIERS, Bench, Row, Sizes, amount, log, skipped

import mmlm
from mmlm.data import get_tokenizer, image_transform
from mmlm.losses import clip_loss
from mmlm.paths import ASSETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

MICRO_BATCHES = 4  # clip_memory's ContrastiveAlignment(micro_batches=...)
PATCH_DROPOUT = 0.5  # clip_train_patch_dropout: the fraction of image patches dropped (FLIP)
# FLIP's smallest model: 196 patches, so the image tower is ~96% of the step; at B/32's 49 patches the
# text tower and the patch embedding (which see every patch) are ~15% and cap the gain near 1.7x
PATCH_DROPOUT_MODEL = "ViT-B-16"

# The tiny shapes keep the real vocabularies and heads 64 wide (the width the converters assume).
TINY_CLIP = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
TINY_VIT = {"img_size": 64, "patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 2, "num_classes": 10}
TINY_BERT = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}


class UsageError(ValueError):
    """A bad command-line value: one line on stderr, before anything is measured."""


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The lowest cosine between matching rows: how far a quantized embedding turned from the float one."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


@contextmanager
def quiet() -> Iterator[None]:
    """Warnings the benchmark expects: torch.ao's deprecation, and Lightning's ``self.log`` outside a Trainer
    (the training steps of the tasks run here without one; they log nothing then)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions .* are deprecated")
        warnings.filterwarnings("ignore", message=r"You are trying to `self\.log\(\)`")
        yield


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


def clip_pair(b: Bench, name: str = "ViT-B-32-quickgelu", folder: str = "open_clip") -> tuple[torch.nn.Module, mmlm.CLIP]:
    """An open_clip CLIP (the ``name`` config) with random weights and the same weights in mmlm, through an
    OpenCLIP hub folder (``b.tmp / folder``, which ``open_clip_from_folder`` reads back)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = TINY_CLIP if b.sizes.tiny else open_clip.get_model_config(name)
    ref = open_clip.CLIP(**model_cfg)
    folder = b.tmp / folder
    folder.mkdir(exist_ok=True)
    save_file(ref.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return ref, mmlm.load_pretrained(folder)


def open_clip_from_folder(folder: Path, **vision_cfg: Any) -> torch.nn.Module:
    """The open_clip CLIP that ``clip_pair`` saved, with ``vision_cfg`` entries replaced."""
    import open_clip
    from safetensors.torch import load_file

    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.CLIP(**{**cfg, "vision_cfg": {**cfg["vision_cfg"], **vision_cfg}})
    model.load_state_dict(load_file(folder / "open_clip_model.safetensors"))
    return model


def clip_inference_pair(b: Bench) -> tuple[torch.nn.Module, mmlm.CLIP]:
    """``clip_pair`` for inference, built once for the image and text workloads."""
    if "clip" not in b.cache:
        ref, ours = clip_pair(b)
        b.cache["clip"] = (b.infer(ref), b.infer(ours))
    return b.cache["clip"]


def clip_batch(vision_cfg: mmlm.VisionConfig, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``n`` photographs and their captions, each tokenised as its library does: ``ids77`` for open_clip
    (always 77 columns), ``input_ids`` / ``attention_mask`` for mmlm (padded to the longest caption)."""
    import open_clip

    texts = captions(n)
    tok = get_tokenizer("clip")(texts)
    batch = {"image": images(vision_cfg, n), "ids77": open_clip.tokenize(texts),
             "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()}


def open_clip_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable
) -> Callable[[], torch.Tensor]:
    """open_clip's training loss of ``batch``, as its training loop computes it (``ClipLoss``)."""
    import open_clip

    loss_fn = open_clip.ClipLoss()

    def loss() -> torch.Tensor:
        with autocast():
            image = F.normalize(model.encode_image(batch["image"]), dim=-1)
            text = F.normalize(model.encode_text(batch["ids77"]), dim=-1)
            return loss_fn(image, text, model.logit_scale.exp())

    return loss


def mmlm_clip_loss(model: mmlm.CLIP, batch: dict[str, torch.Tensor], autocast: Callable) -> Callable[[], torch.Tensor]:
    """mmlm's CLIP loss of ``batch`` (``ContrastiveAlignment.training_step`` without micro-batches)."""

    def loss() -> torch.Tensor:
        with autocast():
            return clip_loss(model.encode_image(batch["image"]), model.encode_text(batch["input_ids"],
                             batch["attention_mask"]), model.scale())  # fmt: skip

    return loss


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One call = forward + loss + backward + AdamW step + zeroed gradients."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)

    def step() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def eval_loss(loss_fn: Callable[[], torch.Tensor], *models: torch.nn.Module) -> float:
    """``loss_fn()`` with ``models`` in eval mode (no dropout of any kind), then back in training mode."""
    for m in models:
        m.eval()
    with torch.no_grad():
        value = loss_fn().item()
    for m in models:
        m.train()
    return value


# ------------------------------------------------------------------------------ memory


def memory_bytes(device: torch.device, peak: bool = False) -> int:
    """This process's memory now, or its peak since ``reset_peak``: allocated tensors on a GPU,
    the resident set on the CPU (Linux ``/proc``: ``VmRSS`` / ``VmHWM``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    field = "VmHWM" if peak else "VmRSS"
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current VmRSS


def in_fresh_process(device: torch.device, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new process holding none of this one's memory. For the CPU it is forked from
    multiprocessing's fork server, which imports the libraries once for every run; for a GPU it is
    spawned, as CUDA does not survive a fork (a library may initialise it when imported)."""
    ctx = multiprocessing.get_context("spawn" if device.type == "cuda" else "forkserver")
    if device.type != "cuda":
        ctx.set_forkserver_preload(["__main__", "open_clip", "mmlm.tasks"])
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def step_memory(side: str, mode: str, folder: Path, batch_path: Path, device: str, dtype: str) -> tuple[float, float]:
    """(MiB, d loss / d logit_scale) of one CLIP training step; run by ``in_fresh_process``.

    MiB = the peak of ``memory_bytes`` over the step minus its value once the model and the batch are
    in place: gradients, AdamW's state and the activations. A first step on ``MICRO_BATCHES`` pairs
    allocates the gradients and AdamW's state beforehand, so the measured step is a steady-state one.
    The learning rate is 0 (the memory does not depend on it): the measured step starts from the weights
    every process loads, and its gradients are comparable across processes.

    side, mode: ``open_clip`` or ``mmlm``; ``plain``, ``checkpointing`` (the model's
    ``set_grad_checkpointing``) or ``micro_batches`` (mmlm's ``ContrastiveAlignment``).
    """
    dev = torch.device(device)
    batch = {k: v.to(dev) for k, v in torch.load(batch_path).items()}
    autocast = (lambda: nullcontext()) if dtype == "fp32" else (lambda: torch.autocast(dev.type, DTYPES[dtype]))
    with quiet():
        if side == "open_clip":
            model = open_clip_from_folder(folder).to(dev)

            def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                return open_clip_loss(model, batch, autocast)()
        elif mode == "micro_batches":
            from mmlm.tasks import ContrastiveAlignment

            task = ContrastiveAlignment(str(folder), micro_batches=MICRO_BATCHES).to(dev)
            model = task.model

            def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                with autocast():
                    return task.training_step(batch, 0)  # the objective whose gradient is the full batch's
        else:
            model = mmlm.load_pretrained(folder, device=dev)

            def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                return mmlm_clip_loss(model, batch, autocast)()
        model.train()
        if mode == "checkpointing":
            model.set_grad_checkpointing(True)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        start = memory_bytes(dev)
        for part in ({k: v[:MICRO_BATCHES] for k, v in batch.items()}, batch):
            reset_peak(dev)
            loss(part).backward()
            grad = model.logit_scale.grad.item()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (memory_bytes(dev, peak=True) - start) / 2**20, grad


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


def clip_int8(b: Bench) -> list[Row]:
    """Both CLIP encoders with int8 Linear layers, against open_clip quantized as its users do on a CPU.

    mmlm: ``mmlm.compress.quantize_int8`` (per-channel weights; 8-bit activations where the CPU has
    VNNI). open_clip: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``
    (per-tensor weights, 7-bit activations), which leaves its attention (``nn.MultiheadAttention``) and
    projections (Parameters) in float32; its ``encode_text`` then needs ``int8_original_dtype`` on the
    quantized layers, the attribute open_clip's own (bitsandbytes) int8 conversion sets. Both start
    from the same float32 weights. The agreement is the lowest cosine of an embedding to the float32
    one: mmlm's in the column, open_clip's in the note, with mmlm int8's speed-up over mmlm float32
    in the same interleaved run.
    """
    import open_clip
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import quantize_dynamic

    from mmlm.compress import quantize_int8

    reference = "open_clip + quantize_dynamic"
    names = ("CLIP image encode, int8", "CLIP text encode, int8")
    if b.device.type != "cpu":
        return [skipped(name, reference, "int8 dynamic quantization runs on the CPU only") for name in names]
    if b.dtype == torch.float32:
        ref, ours = clip_inference_pair(b)
    else:  # the cached pair is in --dtype; int8 quantizes float32 weights
        ref, ours = (m.eval() for m in clip_pair(b))
    with quiet():
        ref8 = quantize_dynamic(ref, {torch.nn.Linear}, dtype=torch.qint8)
    for m in ref8.modules():
        if isinstance(m, DynamicLinear):  # open_clip's encode_text asks c_fc for its dtype (not a tensor here)
            m.int8_original_dtype = torch.float32
    ours8 = quantize_int8(ours)
    x = images(ours.cfg.vision, b.sizes.image_batch)
    texts = captions(b.sizes.text_batch)
    ids77 = open_clip.tokenize(texts)
    tok = get_tokenizer("clip")(texts)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    cases = (  # name, float32 reference output, mmlm fp32, mmlm int8, open_clip int8, note
        (names[0], ref.encode_image(x), lambda: ours.encode_image(x, normalize=False),
         lambda: ours8.encode_image(x, normalize=False), lambda: ref8.encode_image(x), f"B={len(x)}"),
        (names[1], ref.encode_text(ids77), lambda: ours.encode_text(ids, mask, normalize=False),
         lambda: ours8.encode_text(ids, mask, normalize=False), lambda: ref8.encode_text(ids77),
         f"B={len(texts)}; mmlm T={ids.shape[1]}, open_clip T=77"),
    )  # fmt: skip
    rows = []
    with torch.inference_mode(), quiet():
        for name, expected, fp32, int8, ref_int8, note in cases:
            cos, ref_cos = min_cosine(int8(), expected), min_cosine(ref_int8(), expected)
            t = b.time(mmlm=int8, ref=ref_int8, mmlm_fp32=fp32)
            rows.append(Row(name, t["mmlm"], t["ref"], reference, cos,
                            f"{note}; {t['mmlm_fp32'] / t['mmlm']:.2f}x mmlm fp32's speed; "
                            f"open_clip int8 min cos {ref_cos:.4f}", agreement="min_cos"))  # fmt: skip
    return rows


def clip_train(b: Bench) -> list[Row]:
    """One optimisation step: encode both towers, symmetric CLIP loss, backward, AdamW.

    Both start from the same weights and see the same pairs; the diff column is the gap
    between the two losses of the first step. mmlm's captions are padded to the longest,
    open_clip's to 77, as in each library's own training loop.
    """
    b.cache.pop("clip", None)  # the inference pair may be in bf16 and is no longer needed
    ref, ours = (m.train().to(b.device) for m in clip_pair(b))
    batch = clip_batch(ours.cfg.vision, b.sizes.train_batch, b.device)
    ref_loss, ours_loss = open_clip_loss(ref, batch, b.autocast), mmlm_clip_loss(ours, batch, b.autocast)
    with torch.no_grad():
        diff = abs(ours_loss().item() - ref_loss().item())
    t = b.time(train=True, mmlm=train_step(ours, ours_loss), ref=train_step(ref, ref_loss))
    note = f"B={len(batch['image'])}; mmlm T={batch['input_ids'].shape[1]}, open_clip T=77; diff = |loss gap| at step 1"
    return [Row("CLIP train step (fwd+bwd+AdamW)", t["mmlm"], t["ref"], "open_clip + ClipLoss", diff, note)]


def clip_train_patch_dropout(b: Bench) -> list[Row]:
    """``clip_train`` with half the image patches dropped (FLIP), and mmlm's speed-up from dropping them.

    mmlm: ``vision.patch_dropout`` in its config (a ``load_pretrained`` override); open_clip:
    ``patch_dropout`` in its ``vision_cfg``; the same weights. The patches are drawn at random, so
    training outputs cannot match: the diff column compares the losses in eval mode, where neither
    side drops any. The second row times mmlm's step with patch dropout against the same without.
    """
    b.cache.pop("clip", None)
    plain = clip_pair(b, PATCH_DROPOUT_MODEL, "open_clip_dropout")[1]
    folder = b.tmp / "open_clip_dropout"
    ours = mmlm.load_pretrained(folder, vision={"patch_dropout": PATCH_DROPOUT}).train().to(b.device)
    ref = open_clip_from_folder(folder, patch_dropout=PATCH_DROPOUT).train().to(b.device)
    plain = plain.train().to(b.device)
    batch = clip_batch(ours.cfg.vision, b.sizes.dropout_batch, b.device)
    ref_loss, ours_loss = open_clip_loss(ref, batch, b.autocast), mmlm_clip_loss(ours, batch, b.autocast)
    plain_loss = mmlm_clip_loss(plain, batch, b.autocast)
    loss = eval_loss(ours_loss, ours)
    diff, diff_plain = abs(loss - eval_loss(ref_loss, ref)), abs(loss - eval_loss(plain_loss, plain))
    t = b.time(train=True, mmlm=train_step(ours, ours_loss), ref=train_step(ref, ref_loss),
               plain=train_step(plain, plain_loss))  # fmt: skip
    n, p = len(batch["image"]), PATCH_DROPOUT
    kept = max(1, int(ours.cfg.vision.grid_size**2 * (1 - p)))
    return [
        Row(f"CLIP train step, patch dropout {p}", t["mmlm"], t["ref"], f"open_clip, patch_dropout={p}", diff,
            f"{PATCH_DROPOUT_MODEL}, B={n}, {kept} of {ours.cfg.vision.grid_size**2} patches kept; "
            f"mmlm T={batch['input_ids'].shape[1]}, "
            f"open_clip T=77; diff = |loss gap| in eval mode (no patches dropped)"),
        Row(f"CLIP train step, patch dropout {p} vs none", t["mmlm"], t["plain"], "mmlm, patch_dropout=0",
            diff_plain, f"{PATCH_DROPOUT_MODEL}, B={n}; ratio = mmlm's speed-up from patch dropout {p}; "
            "diff = |loss gap| in eval mode"),
    ]  # fmt: skip


def clip_memory(b: Bench) -> list[Row]:
    """Peak memory of ``clip_train``'s step at ``memory_batch`` pairs, each configuration in a fresh process.

    Plain; with activation checkpointing (both libraries' ``set_grad_checkpointing``); and mmlm's
    ``ContrastiveAlignment(micro_batches=4).training_step``, the exact full-batch gradient at one
    chunk's activations, for which open_clip has no equivalent: that row's reference is open_clip's
    plain step. See ``step_memory`` for what is counted. The diff column compares the gradient of the
    loss with respect to the logit scale, which every embedding of the batch feeds into.
    """
    what = "allocated (torch.cuda)" if b.device.type == "cuda" else "resident"
    names = {
        "plain": ("CLIP train step, peak memory", "open_clip + ClipLoss"),
        "checkpointing": ("CLIP train step, peak memory, grad checkpointing", "open_clip set_grad_checkpointing"),
        "micro_batches": (f"CLIP train step, peak memory, micro_batches={MICRO_BATCHES}",
                          "open_clip plain step (no exact equivalent)"),
    }  # fmt: skip
    if b.device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        return [skipped(name, ref, "the CPU peak is read from Linux /proc", "MiB") for name, ref in names.values()]
    b.cache.pop("clip", None)
    vision_cfg = clip_pair(b)[1].cfg.vision
    n = b.sizes.memory_batch
    batch = clip_batch(vision_cfg, n, torch.device("cpu"))
    batch_path = b.tmp / "memory_batch.pt"
    torch.save(batch, batch_path)
    dtype = next(k for k, v in DTYPES.items() if v == b.dtype)
    runs = (("open_clip", "plain"), ("mmlm", "plain"), ("open_clip", "checkpointing"), ("mmlm", "checkpointing"),
            ("mmlm", "micro_batches"))  # fmt: skip
    result = {}
    for side, mode in runs:
        log(f"  {side} {mode}, B={n}, in a fresh process ...")
        result[side, mode] = in_fresh_process(b.device, step_memory, side, mode, b.tmp / "open_clip", batch_path,
                                              str(b.device), dtype)  # fmt: skip
    shapes = "tiny CLIP" if b.sizes.tiny else "ViT-B/32"
    note = (f"{shapes}, B={n}; peak {what} memory over the step minus that with the model loaded; "
            f"mmlm T={batch['input_ids'].shape[1]}, open_clip T=77; diff = |gap in d loss / d logit_scale|")
    rows = []
    for mode, (name, reference) in names.items():
        ours_mib, ours_grad = result["mmlm", mode]
        ref_mib, ref_grad = result["open_clip", "plain" if mode == "micro_batches" else mode]
        rows.append(Row(name, ours_mib, ref_mib, reference, abs(ours_grad - ref_grad), note, unit="MiB"))
    return rows


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


def mlm_train(b: Bench) -> list[Row]:
    """One masked-LM training step of bert-base: mmlm's ``LanguagePretraining.training_step`` against
    transformers' ``BertForMaskedLM`` with ``labels``, each + backward + AdamW, from the same weights.

    Both get one batch of real sentences masked by mmlm's ``MLMCollator`` (15% of the tokens, 80/10/10),
    the same ids and labels. mmlm's head scores the masked positions only, HF's every position. Dropout
    (0.1 in BERT's config, on both sides) makes training losses random: the diff column is the gap
    between the losses in eval mode.
    """
    import transformers

    from mmlm.data.collators import IGNORE, MLMCollator
    from mmlm.tasks import LanguagePretraining

    ref = transformers.BertForMaskedLM(transformers.BertConfig(**(TINY_BERT if b.sizes.tiny else {})))
    folder = b.tmp / "bert-mlm"
    ref.save_pretrained(folder)
    ref = ref.train().to(b.device)
    with quiet():
        task = LanguagePretraining(str(folder), mlm_weight=1.0).train().to(b.device)
    tok = get_tokenizer(ASSETS / "tokenizer", context_length=b.sizes.bert_max_len)
    texts = sentences(b.sizes.bert_batch * 7)[::7]  # spread out: varied lengths
    batch = MLMCollator(tok)([{"text": t} for t in texts])
    batch = {k: batch[k].to(b.device) for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}

    def ours_loss() -> torch.Tensor:
        with b.autocast():
            return task.training_step(batch, 0)

    def ref_loss() -> torch.Tensor:
        with b.autocast():
            return ref(**batch).loss

    with quiet():
        diff = abs(eval_loss(ours_loss, task) - eval_loss(ref_loss, ref))
        t = b.time(train=True, mmlm=train_step(task, ours_loss), ref=train_step(ref, ref_loss))
    B, T = batch["input_ids"].shape
    masked = (batch["labels"] != IGNORE).sum().item()
    note = (f"B={B}, T={T}, {masked} tokens masked; mmlm's head runs on those, HF's on all {B * T}; "
            "diff = |loss gap| in eval mode (no dropout)")
    return [Row("BERT-base MLM train step (fwd+bwd+AdamW)", t["mmlm"], t["ref"], "transformers BertForMaskedLM",
                diff, note)]  # fmt: skip


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


def index_build(b: Bench) -> list[Row]:
    """``mmlm index build`` (scripts/bench_retrieval.py, imported when asked for)."""
    import bench_retrieval

    return bench_retrieval.index_build(b)


def sync(b: Bench) -> list[Row]:
    """``mmlm index sync`` after a 1% change against a full build (scripts/bench_retrieval.py)."""
    import bench_retrieval

    return bench_retrieval.sync(b)


def query(b: Bench) -> list[Row]:
    """Queries through ``mmlm serve`` (scripts/bench_retrieval.py, imported when asked for)."""
    import bench_retrieval

    return bench_retrieval.query(b)


TINY_COCA = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 2, "attentional_pool": True,
                   "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}  # fmt: skip
CAPTION_TOKENS = 20  # new tokens per caption in coca_generate (no end token: every row runs all steps)


def coca_generate(b: Bench) -> list[Row]:
    """Batched greedy captions of a CoCa: mmlm's ``generate`` with and without its KV cache, and open_clip's own
    forward-and-argmax loop (its ``generate()`` needs transformers' BeamSearchScorer, gone in transformers 5).

    Random weights make the end token unlikely, so every row decodes ``CAPTION_TOKENS`` tokens on every side;
    the agreement column counts token ids that differ from open_clip's.
    """
    import open_clip
    from safetensors.torch import save_file

    model_cfg = TINY_COCA if b.sizes.tiny else open_clip.get_model_config("coca_ViT-B-32")
    ref = open_clip.CoCa(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    with torch.no_grad():  # open_clip leaves the decoder's text_projection uninitialised (torch.empty)
        ref.text_decoder.text_projection.normal_(std=ref.text_decoder.text_projection.shape[0] ** -0.5)
    folder = b.tmp / "open_clip_coca"
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    ours = b.infer(mmlm.load_pretrained(folder))
    ref = b.infer(ref)
    x = images(ours.cfg.vision, b.sizes.image_batch).to(b.device, b.dtype)
    n = CAPTION_TOKENS

    def reference() -> torch.Tensor:
        latent, embs = ref._encode_image(x)
        text = torch.full((len(x), 1), 49406, dtype=torch.long, device=b.device)
        for _ in range(n):
            logits = ref(x, text, image_latent=latent, image_embs=embs, output_labels=False)["logits"]
            text = torch.cat([text, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return text

    cached = lambda: ours.generate(x, max_new_tokens=n)  # noqa: E731
    recomputed = lambda: ours.generate(x, max_new_tokens=n, use_cache=False)  # noqa: E731
    with torch.inference_mode():
        expected = reference()
        diffs = [float((f()[:, : n + 1] != expected).sum()) for f in (cached, recomputed)]
        t = b.time(cache=cached, no_cache=recomputed, ref=reference)
    tokens = len(x) * n
    per_s = {k: tokens / v for k, v in t.items()}
    note = (f"B={len(x)}, {n} new tokens each; tokens/s: mmlm cache {per_s['cache']:.0f}, "
            f"no cache {per_s['no_cache']:.0f}, open_clip {per_s['ref']:.0f}; agreement = differing token ids")
    return [
        Row("CoCa greedy captions, KV cache", t["cache"], t["ref"], "open_clip forward + argmax loop", diffs[0], note),
        Row("CoCa greedy captions, no cache", t["no_cache"], t["ref"], "open_clip forward + argmax loop", diffs[1],
            f"B={len(x)}; mmlm recomputes the caption each step, as open_clip does"),
        Row("CoCa: KV cache vs no cache", t["cache"], t["no_cache"], "mmlm generate(use_cache=False)", 0.0,
            "ratio = speed-up of the cache"),
    ]  # fmt: skip


def serve_runtime(b: Bench) -> list[Row]:
    """``mmlm serve`` with ONNX Runtime against torch (scripts/bench_serve.py, imported when asked for)."""
    import bench_serve

    return bench_serve.serve_runtime(b)


WORKLOADS: dict[str, Callable[[Bench], list[Row]]] = {
    "clip_image": clip_image,
    "clip_text": clip_text,
    "clip_int8": clip_int8,
    "clip_train": clip_train,
    "clip_train_patch_dropout": clip_train_patch_dropout,
    "clip_memory": clip_memory,
    "vit": vit,
    "bert": bert,
    "mlm_train": mlm_train,
    "tokenizer": tokenizer,
    "coca_generate": coca_generate,
    "index_build": index_build,
    "sync": sync,
    "query": query,
    "serve_runtime": serve_runtime,
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
        (
            "| workload | mmlm | reference | ratio (reference / mmlm, >1 = mmlm faster or smaller) "
            "| agreement (max abs diff; cos = min cosine to fp32) | reference entry | notes |"
        ),
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r.skipped:
            cells = ["skipped", "skipped", "-", "-", r.reference, f"skipped: {r.skipped}"]
        else:
            agreement = f"cos {r.diff:.4f}" if r.agreement == "min_cos" else f"{r.diff:.1e}"
            cells = [amount(r.mmlm_s, r.unit), amount(r.reference_s, r.unit), f"{r.ratio:.2f}x", agreement,
                     r.reference, r.note]  # fmt: skip
        lines.append("| " + " | ".join([r.workload, *(c.replace("|", "\\|") for c in cells)]) + " |")
    return "\n".join(lines)


def json_ready(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (a skipped row's numbers) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


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
        raise UsageError("--quick and --full exclude each other")
    tier = "quick" if quick else "full" if full else "default"
    sizes = TIERS[tier]
    if warmup is not None or repeats is not None:
        w, r = warmup if warmup is not None else sizes.warmup, repeats if repeats is not None else sizes.repeats
        sizes = Sizes(**{**asdict(sizes), "warmup": w, "repeats": r, "train_warmup": w, "train_repeats": r})
    names = list(only or WORKLOADS)
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        raise UsageError(f"unknown workload(s) {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
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
        record = {"environment": env, "rows": [json_ready({**asdict(r), "ratio": r.ratio}) for r in rows]}
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
    try:
        run(**kwargs)
    except UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
