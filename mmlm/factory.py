"""THE way from what a user names a model to everything a command needs (OpenCLIP's
``create_model_and_transforms`` + ``get_tokenizer`` in one call).

::

    loaded = factory.load("runs/clip/last.ckpt", int8=True)
    loaded.model        # eval mode, on its device, int8 when asked
    loaded.tokenizer    # the one it was trained with, truncating where its text tower does
    loaded.transform    # the image transform its vision tower expects
    loaded.weights_hash # sha256 of its config and tensors: an index records it, a server checks it

``resolve(spec)`` is the model alone (the tasks' ``model`` argument), ``tokenizer_for(spec, model)`` the
tokenizer alone (what ``mmlm convert`` writes beside an export). Every command, task and the server
take their models from here, so they all accept the same specs (``SPEC_DOC``), fail on a bad one with
the same message and pick the same tokenizer.

The tokenizer of a checkpoint, in this order: the one given; the one a ``mmlm fit`` .ckpt carries (the
tasks store their data module's tokenizer in it); ``tokenizer.json`` in the checkpoint's folder (an
mmlm, transformers, OpenCLIP or sentence-transformers folder) or beside its weights file; the CLIP BPE
for a text tower with CLIP's 49,408 tokens; else none (a command that needs one says so).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmlm.checkpoint import detect_format, torch_load
from mmlm.config import PRESETS, Activation, to_dict, unknown_model
from mmlm.data.tokenizers import CLIP_VOCAB_SIZE, Tokenizer, get_tokenizer, is_clip_name
from mmlm.data.transforms import image_transform
from mmlm.models import create_model, tower
from mmlm.paths import resolve as resolve_path
from mmlm.pretrained import load_pretrained

# What every task's and command's ``model`` argument may be, worded once for their docstrings.
SPEC_DOC = "a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint ``mmlm.load_pretrained`` reads"

# where a ``mmlm fit`` checkpoint keeps its tokenizer's files (``tokenizer_files``), and which files those are
CKPT_TOKENIZER = "mmlm_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

TokenizerSource = Literal["given", "checkpoint", "clip"]


def resolve(
    spec: str | Path | nn.Module,
    *,
    part: Literal["image", "text"] | None = None,
    overrides: dict[str, Any] | None = None,
    with_heads: bool = True,
    act: Activation | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> nn.Module:
    """The model ``spec`` names, or its ``part`` tower.

    Args:
        spec: a preset name (random weights, in train mode as ``create_model`` builds them); an mmlm
            folder, a ``mmlm fit`` .ckpt or any checkpoint ``mmlm.load_pretrained`` reads (HF,
            OpenCLIP, timm, sentence-transformers; ``package:NAME/...``), loaded in eval mode;
            or an ``nn.Module``, returned as it is (or its ``part``), on its own device.
        part: ``None`` for the whole model, ``"image"`` or ``"text"`` for that tower alone, a
            standalone copy when taken out of a CLIP (``mmlm.models.tower``).
        overrides: config fields of a preset, as for ``create_model``; an error for anything else
            (a checkpoint's config is its own).
        with_heads: keep the heads a checkpoint carries; False loads its bare encoder
            (``load_pretrained``'s ``with_heads``). A preset's heads are config fields (``num_classes``).
        act: MLP activation of a checkpoint that does not record it (OpenAI / OpenCLIP state dicts).
        device: where the model lives.
        seed: seeds a preset's random weights (the global RNG is left as it was); None: not seeded.
    """
    is_module = isinstance(spec, nn.Module)
    is_preset = not is_module and str(spec) in PRESETS
    if not (is_module or is_preset or resolve_path(spec).exists()):
        raise ValueError(unknown_model(str(spec)))
    if overrides and not is_preset:
        raise ValueError("model_overrides apply to presets only, not to a checkpoint")
    if is_module:
        model = spec
    elif is_preset:
        model = _preset(str(spec), overrides or {}, seed).to(device)
    else:
        model = load_pretrained(spec, act=act, with_heads=with_heads, device=device)
    return model if part is None else tower(model, part)


def _preset(name: str, overrides: dict[str, Any], seed: int | None) -> nn.Module:
    """A preset with random weights; seeded ones from a forked RNG, so that seeding one model
    leaves the caller's random stream as it was (weights are drawn on the CPU)."""
    if seed is None:
        return create_model(name, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **overrides)


@dataclass(eq=False)
class Loaded:
    """A model with everything a command needs beside it (``load``)."""

    model: nn.Module  # in eval mode, on its device; int8 when asked
    transform: Callable[[Any], torch.Tensor] | None  # PIL image -> (3, H, W); None without a vision tower
    spec: str  # the model as the user named it
    act: str | None = None
    seed: int = 0
    int8: bool = False
    _hash: str | None = field(default=None, repr=False)
    _tokenizer_of: tuple[Any, ...] = field(default=(), repr=False)  # tokenizer_for's arguments

    @cached_property
    def _tokenizer(self) -> tuple[Tokenizer | None, TokenizerSource | None]:
        return tokenizer_for(*self._tokenizer_of) if self._tokenizer_of else (None, None)

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer (``tokenizer_for``), read on first use: a command that embeds only images (``index sync``)
        does not pay for building the CLIP BPE. None: no text tower, or none known (``require_tokenizer``)."""
        return self._tokenizer[0]

    @property
    def tokenizer_source(self) -> TokenizerSource | None:
        """Where the tokenizer came from (``tokenizer_for``)."""
        return self._tokenizer[1]

    @cached_property
    def weights_hash(self) -> str:
        """``weights_hash(model)``, computed on first use (about a second for a ViT-B/32)."""
        return self._hash or weights_hash(self.model)

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a ValueError telling the user to name one."""
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer is known for {self.spec}: give --tokenizer (a tokenizer folder)")
        return self.tokenizer


def load(
    spec: str | Path | nn.Module,
    *,
    tokenizer: str | Path | None = None,
    act: Activation | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    int8: bool = False,
    with_heads: bool = True,
    image_text: str | None = None,
) -> Loaded:
    """The model ``spec`` names (``resolve``; a preset's random weights seeded by ``seed``), in eval mode,
    with its tokenizer (``tokenizer_for``), its image transform and its weights hash.

    Args:
        tokenizer: a tokenizer name or folder that overrides the one found with the checkpoint.
        int8: quantize on the fly for the CPU (``mmlm.compress.quantize_int8``); the weights hash stays
            the float model's, so an index built with ``--int8`` still names the weights it came from.
        image_text: what needs an image-text model (``"zero-shot evaluation"``, ``"an index"``); a model
            that does not encode both images and text is then refused, naming it. None: any model.
    """
    from mmlm.errors import UsageError, check_device

    check_device(str(device))
    model = resolve(spec, act=act, device=device, seed=seed, with_heads=with_heads).eval()
    if image_text is not None and not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise UsageError(f"{spec} is a {type(model).__name__}: {image_text} needs an image-text (CLIP) model")
    vision = _vision_config(model)
    loaded = Loaded(model, image_transform(vision, train=False) if vision else None, str(spec), act, seed,
                    _tokenizer_of=(spec, model, tokenizer))  # fmt: skip
    if tokenizer is not None:  # the user's: a bad one is named now, before any work
        loaded.tokenizer  # noqa: B018
    if int8:
        from mmlm.compress.quantize import is_int8, quantize_int8

        if not is_int8(model):
            loaded._hash = weights_hash(model)  # the float weights': what the index is checked against
            loaded.model = quantize_int8(model, inplace=True)  # the float model is not kept: no copy of it
            # the tokenizer, found on first use, from the int8 copy (same cfg): nothing keeps the float one alive
            loaded._tokenizer_of = (spec, loaded.model, tokenizer)
            del model
            release_freed_memory()
        loaded.int8 = True
    return loaded


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the OS. glibc keeps freed blocks for reuse, so the float
    model an int8 copy replaced stayed resident: a ViT-B/32 CLIP loaded in int8 held 2,428 MiB, and 966 MiB
    after this (``malloc_trim``). Elsewhere than glibc (macOS, musl, Windows), nothing to do."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # no such library, or a C library without malloc_trim
        pass


# ------------------------------------------------------------------------------ tokenizers


def tokenizer_for(
    spec: str | Path | nn.Module, model: nn.Module, given: str | Path | None = None
) -> tuple[Tokenizer | None, TokenizerSource | None]:
    """The tokenizer of ``model`` (loaded from ``spec``) and where it came from (module docstring's order).

    It truncates where the text tower does: ``max_seq_length`` (a sentence-transformers tower's
    token limit), else the context length.
    """
    text = _text_config(model)
    if text is None:
        return None, None
    context = getattr(text, "max_seq_length", None) or text.context_length
    if given is not None:
        return get_tokenizer(given, context_length=context), "given"
    found = None if isinstance(spec, nn.Module) or str(spec) in PRESETS else _checkpoint_tokenizer(spec, context)
    if found is not None:
        return found, "checkpoint"
    if text.vocab_size == CLIP_VOCAB_SIZE:
        return get_tokenizer("clip", context_length=context), "clip"
    return None, None


def _checkpoint_tokenizer(spec: str | Path, context: int) -> Tokenizer | None:
    """The tokenizer that came with the checkpoint ``spec``: the one a ``mmlm fit`` .ckpt stores (or, in one
    written before tokenizers were stored, the one its data module named), else ``tokenizer.json`` in the
    checkpoint folder or beside the weights file."""
    path = resolve_path(spec)
    if path.is_file() and detect_format(path) == "lightning":
        ckpt = torch_load(path, mmap=True)  # load_pretrained has read the weights: map them, read the rest
        stored = ckpt.get(CKPT_TOKENIZER)
        if isinstance(stored, dict) and "tokenizer.json" in stored:
            with tempfile.TemporaryDirectory() as tmp:  # get_tokenizer reads the files at once
                for name, text in stored.items():
                    if name in TOKENIZER_FILES:
                        (Path(tmp) / name).write_text(text, encoding="utf-8")
                return get_tokenizer(tmp, context_length=context)
        name = (ckpt.get("datamodule_hyper_parameters") or {}).get("tokenizer")
        if name and not is_clip_name(str(name)) and resolve_path(name).exists():  # the CLIP BPE: the default
            return get_tokenizer(name, context_length=context)
        return None
    folder = path if path.is_dir() else path.parent
    return get_tokenizer(folder, context_length=context) if (folder / "tokenizer.json").is_file() else None


def tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    """The files ``Tokenizer.save`` writes, as text: what a ``mmlm fit`` checkpoint stores (``CKPT_TOKENIZER``)."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.name in TOKENIZER_FILES}


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "cfg", None)
    text = getattr(cfg, "text", cfg)
    return text if hasattr(text, "vocab_size") else None


def _vision_config(model: nn.Module) -> Any:
    cfg = getattr(model, "cfg", None)
    vision = getattr(cfg, "vision", cfg)
    return vision if hasattr(vision, "patch_size") else None


# ------------------------------------------------------------------------------ weights hash


def weights_hash(model: nn.Module) -> str:
    """sha256 of the config and every tensor (name, dtype, bytes): equal only for the same model."""
    from mmlm.checkpoint import tensors

    h = hashlib.sha256(json.dumps(_config_dict(model), sort_keys=True).encode())
    for name, tensor in sorted(tensors(model).items()):  # an int8 model's int8 weights and scales too
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_dict(model: nn.Module) -> dict[str, Any]:
    return to_dict(model.cfg)
