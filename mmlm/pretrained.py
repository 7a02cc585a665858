"""The file side of conversion: recognise a checkpoint, read it safely, hand back an mmlm model.

``load_pretrained(path)`` tells the formats apart by their files and keys:

=====================================  ==========================================  =========================
what ``path`` is                       recognised by                               returns
=====================================  ==========================================  =========================
mmlm folder                            config.json with ``"format": "mmlm"``       whatever was saved
``mmlm fit`` checkpoint (``.ckpt``)    ``mmlm_config`` stored by the task          the task's model, head
                                                                                   included
sentence-transformers folder           modules.json (+ 1_Pooling/config.json)      TextEncoder (its pooling)
transformers folder                    config.json ``model_type``: clip,           CLIP, TextEncoder,
                                       clip_text_model, clip_vision_model, bert,   VisionTransformer,
                                       gpt2, vit                                   TextWithHeads
timm hub folder                        config.json with ``architecture``           VisionTransformer
OpenCLIP hub folder                    open_clip_config.json                       CLIP or CoCa
OpenAI / OpenCLIP state dict file      ``visual.conv1.weight``                     CLIP or CoCa
timm ViT state dict file               ``patch_embed.proj.weight``                 VisionTransformer
=====================================  ==========================================  =========================

Reading and detection are ``mmlm.checkpoint``'s (safe: no pickle beyond ``weights_only``, no
TorchScript); the heavy work is in ``mmlm.convert``; this module dispatches and builds the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmlm import checkpoint
from mmlm.config import (
    Activation,
    CLIPConfig,
    CoCaConfig,
    ModelConfig,
    TextWithHeadsConfig,
    VisionConfig,
    from_dict,
    update,
)
from mmlm.convert import hf_bert, hf_clip, hf_gpt2, hf_vit, openclip, openclip_coca, timm_vit
from mmlm.convert.common import ConversionError, StateDict
from mmlm.models import create_model
from mmlm.paths import resolve

# ------------------------------------------------------------------------------ loading

# what each format's loader returns: the derived config, and the converter to run once overrides are applied
Loaded = tuple[ModelConfig, Callable[[ModelConfig], StateDict]]


def load_pretrained(
    path: str | Path,
    *,
    act: Activation | None = None,
    with_heads: bool = True,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> nn.Module:
    """Load any supported checkpoint (see the module docstring) into an mmlm model, in eval mode.

    Args:
        path: a checkpoint folder or a single weights file (``package:NAME/...`` for a folder
            inside an installed package).
        act: the MLP activation, for formats that do not record it (OpenAI/OpenCLIP state
            dicts: detected from open_clip_config.json, a ``quickgelu`` file name, or OpenAI's
            own keys; otherwise OpenCLIP's default ``gelu``, with a warning).
        with_heads: keep the heads the checkpoint carries (BERT MLM/NSP/pooler, GPT-2 LM,
            classifiers); False returns the bare encoder and drops them on purpose.
        device: where the returned model lives.
        overrides: config fields the files cannot tell, as for ``mmlm.config.update``
            (e.g. ``heads=16`` for a timm ViT with 80-wide heads, ``**{"vision.heads": 16}``).
    """
    path = resolve(path)
    if path.is_file() and path.name in checkpoint.SAFE_WEIGHTS + checkpoint.PICKLED_WEIGHTS and (path.parent / "config.json").is_file():
        path = path.parent
    fmt = checkpoint.detect_format(path)

    def finish(cfg: ModelConfig) -> ModelConfig:
        if act is not None:
            if isinstance(cfg, CoCaConfig):
                cfg = update(cfg, **{"text.act": act, "vision.act": act, "decoder.act": act})
            elif isinstance(cfg, CLIPConfig):
                cfg = update(cfg, **{"text.act": act, "vision.act": act})
            elif isinstance(cfg, TextWithHeadsConfig):
                cfg = update(cfg, **{"text.act": act})
            else:
                cfg = update(cfg, act=act)
        return update(cfg, **overrides) if overrides else cfg

    if fmt == "mmlm":
        model = load(path, device=str(device))
        if (not with_heads or overrides or act) and "quantization" in (checkpoint.read_json(path / "config.json") or {}):
            raise ValueError(f"{path} is an int8 model: load it as it is (no with_heads=False, act or overrides)")
        if not with_heads:
            model = _build(*_without_heads(model.cfg, model.state_dict()))
        if overrides or act:
            model = _build(finish(model.cfg), model.state_dict())
        return model.eval().to(device)
    loaders: dict[str, Callable[..., Loaded]] = {
        "lightning": _lightning,
        "sentence-transformers": _sentence_transformers,
        "hf-clip": _hf_clip,
        "hf-clip_text_model": _hf_clip,
        "hf-clip_vision_model": _hf_clip,
        "hf-bert": _hf_bert,
        "hf-gpt2": _hf_gpt2,
        "hf-vit": _hf_vit,
        "timm": _timm,
        "openclip": _openclip,
    }
    if fmt not in loaders:
        raise ConversionError(
            f"{path}: transformers model_type {fmt[3:]!r} is not supported (clip, bert, gpt2, vit are)"
        )
    cfg, convert = loaders[fmt](path, with_heads=with_heads, act=act)
    cfg = finish(cfg)
    return _build(cfg, convert(cfg)).eval().to(device)


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model ``mmlm.save`` wrote into the folder ``path`` and load its weights (strictly), in eval mode."""
    path = Path(path)
    if not checkpoint.is_mmlm_checkpoint(path):
        raise ValueError(
            f"{path} is not an mmlm checkpoint folder (expected {checkpoint.CONFIG_NAME} with format 'mmlm')"
        )
    meta = checkpoint.read_json(path / checkpoint.CONFIG_NAME)
    model = create_model(from_dict(meta["config"]))
    state = checkpoint.read_safetensors(path / checkpoint.WEIGHTS_NAME, device=device)
    if "quantization" in meta:
        return _load_int8(model, state, meta["quantization"], path, device)
    model.load_state_dict(state)
    return model.to(device).eval()


def _load_int8(
    model: nn.Module, state: dict[str, torch.Tensor], kind: str, path: Path, device: str | torch.device
) -> nn.Module:
    from mmlm.compress.quantize import INT8, load_int8_state_dict

    if kind != INT8:
        raise ValueError(f"{path}: unknown quantization {kind!r} (this mmlm reads {INT8!r})")
    if torch.device(device).type != "cpu":
        raise ValueError(f"{path} is an int8 model, which runs on the CPU only: load it with device='cpu'")
    return load_int8_state_dict(model, state).eval()


def _lightning(path: Path, with_heads: bool, **_: Any) -> Loaded:
    """A checkpoint written by ``mmlm fit``: every task stores its one model's config beside the
    weights (the task's ``model.*`` entries), fine-tuned heads included."""
    ckpt = checkpoint.torch_load(path)
    if "mmlm_config" not in ckpt:
        raise ConversionError(f"{path}: a Lightning checkpoint without an mmlm model config (not from mmlm fit?)")
    cfg = from_dict(ckpt["mmlm_config"])
    sd = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not with_heads:
        cfg, sd = _without_heads(cfg, sd)
    return cfg, lambda _cfg: sd


def _without_heads(cfg: ModelConfig, sd: StateDict) -> tuple[ModelConfig, StateDict]:
    """The bare encoder: a text model's without its heads, a ViT without its classifier; others as they are."""
    if isinstance(cfg, TextWithHeadsConfig):
        return cfg.text, {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    if isinstance(cfg, VisionConfig) and cfg.num_classes:
        return update(cfg, num_classes=0), {k: v for k, v in sd.items() if not k.startswith("head.")}
    return cfg, sd


def _build(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    model = create_model(cfg)
    # strict: a converter whose plan does not cover the model is a bug here, not the user's problem
    model.load_state_dict(sd, strict=True)
    return model


def _hf_clip(folder: Path, with_heads: bool, act: Activation | None) -> Loaded:
    hf = checkpoint.json_or_none(folder / "config.json") or {}
    sd = checkpoint.read_folder_weights(folder)
    pre = checkpoint.json_or_none(folder / "preprocessor_config.json")
    kind = hf["model_type"]
    if kind == "clip":
        return hf_clip.config_from_hf(hf, pre), lambda cfg: hf_clip.hf_clip_to_mmlm(sd, cfg)
    if kind == "clip_text_model":
        return hf_clip.text_config_from_hf(hf), lambda cfg: hf_clip.hf_clip_text_to_mmlm(sd, cfg)
    return hf_clip.vision_config_from_hf(hf, pre), lambda cfg: hf_clip.hf_clip_vision_to_mmlm(sd, cfg)


def _special_ids(folder: Path) -> dict[str, int] | None:
    """[PAD]/[SEP]/[MASK] ids from the WordPiece vocabulary beside the weights, if there is one."""
    vocab = folder / "vocab.txt"
    if vocab.is_file():
        ids = {tok: i for i, tok in enumerate(vocab.read_text(encoding="utf-8").splitlines())}
    elif (tok := checkpoint.json_or_none(folder / "tokenizer.json")) is not None and isinstance(tok.get("model", {}).get("vocab"), dict):
        ids = tok["model"]["vocab"]
    else:
        return None
    return {t: ids[t] for t in ("[PAD]", "[SEP]", "[MASK]") if t in ids}


def _hf_bert(folder: Path, with_heads: bool, act: Activation | None, pool: Literal["cls", "mean"] = "cls") -> Loaded:
    sd = checkpoint.read_folder_weights(folder)
    hf = checkpoint.json_or_none(folder / "config.json") or {}
    text = hf_bert.config_from_hf(hf, _special_ids(folder), pool=pool)
    heads = hf_bert.heads_in(hf_bert.canonical(sd), hf.get("architectures") or ()) if with_heads else ()
    if not heads:
        return text, lambda cfg: hf_bert.hf_bert_to_mmlm(sd, cfg)
    labels = hf_bert.labels_from_hf(hf) if {"classifier", "token_classifier"} & set(heads) else {}
    cfg = TextWithHeadsConfig(text=text, heads=heads, **labels)
    return cfg, lambda cfg: hf_bert.hf_bert_to_mmlm(sd, cfg.text, cfg.heads)


def _hf_gpt2(folder: Path, with_heads: bool, act: Activation | None) -> Loaded:
    sd = checkpoint.read_folder_weights(folder)
    hf = checkpoint.json_or_none(folder / "config.json") or {}
    text = hf_gpt2.config_from_hf(hf)
    if not (with_heads and hf_gpt2.has_lm_head(sd, hf)):
        return text, lambda cfg: hf_gpt2.hf_gpt2_to_mmlm(sd, cfg)
    return TextWithHeadsConfig(text=text, heads=("clm",)), lambda cfg: hf_gpt2.hf_gpt2_to_mmlm(sd, cfg.text, cfg.heads)


def _hf_vit(folder: Path, with_heads: bool, act: Activation | None) -> Loaded:
    sd = checkpoint.read_folder_weights(folder)
    head = sd.get("classifier.weight")
    classes = head.shape[0] if head is not None and with_heads else 0
    cfg = hf_vit.config_from_hf(
        checkpoint.json_or_none(folder / "config.json") or {}, checkpoint.json_or_none(folder / "preprocessor_config.json"), classes
    )
    return cfg, lambda cfg: hf_vit.hf_vit_to_mmlm(sd, cfg)


# sentence-transformers pooling mode -> TextConfig.pool; the legacy flags of 1_Pooling/config.json in the
# order sentence-transformers concatenates them
ST_POOLING = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last"}
ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _sentence_transformers(folder: Path, with_heads: bool, act: Activation | None) -> Loaded:
    """A BERT sentence encoder with what its modules do: Pooling -> ``pool``, Normalize -> ``normalize``,
    the Transformer's token limit and lower-casing -> ``max_seq_length`` / ``do_lower_case`` (read by ``encode``)."""
    modules = checkpoint.read_json(folder / "modules.json")
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ConversionError(
            f"{folder}: sentence-transformers modules {kinds}; mmlm reads Transformer -> Pooling (-> Normalize)"
        )
    inner = folder / modules[0].get("path", "")
    model_type = (checkpoint.json_or_none(inner / "config.json") or {}).get("model_type")
    if model_type != "bert":
        raise ConversionError(
            f"{folder}: a sentence-transformers model on {model_type!r}; only BERT models are supported"
        )
    # sentence-transformers never uses BERT's pooler: leave it out on purpose
    text, convert = _hf_bert(inner, with_heads=False, act=act)
    # where sentence-transformers takes its token limit from: the Transformer module's tokenizer arguments or
    # max_seq_length, else the tokenizer's model_max_length capped at the position embeddings
    sbert = checkpoint.json_or_none(inner / "sentence_bert_config.json") or {}
    kwargs = sbert.get("processor_kwargs") or sbert.get("tokenizer_args") or {}
    length = kwargs.get("model_max_length", sbert.get("max_seq_length"))
    if length is None:
        length = (checkpoint.json_or_none(inner / "tokenizer_config.json") or {}).get("model_max_length", text.context_length)
    length = min(int(length), text.context_length)
    text = update(
        text,
        pool=_st_pooling(folder, folder / modules[1].get("path", "")),
        normalize=len(kinds) == 3,
        max_seq_length=length if length < text.context_length else None,
        do_lower_case=bool(sbert.get("do_lower_case", False)),
    )
    return text, convert


def _st_pooling(folder: Path, pooling: Path) -> str:
    """The one pooling mode of ``1_Pooling/config.json``, new (``pooling_mode``) or legacy (flags) layout."""
    config = checkpoint.json_or_none(pooling / "config.json") or {}
    flags = [mode for key, mode in ST_POOLING_FLAGS.items() if config.get(key)]
    modes = config.get("pooling_mode") or flags or "mean"  # sentence-transformers' default
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in ST_POOLING:
        raise ConversionError(f"{folder}: pooling {modes} is not supported (one of {sorted(ST_POOLING)})")
    return ST_POOLING[modes[0]]


def _timm(path: Path, with_heads: bool, act: Activation | None) -> Loaded:
    """A timm ViT: a bare state dict file (config from shapes), or a hub folder whose named
    architecture is built on the meta device to read what shapes cannot tell."""
    import timm

    if path.is_file():
        sd = checkpoint.read_state_dict(path)
        cfg = timm_vit.config_from_state_dict(sd)
        if not with_heads:
            cfg = update(cfg, num_classes=0)
        return cfg, lambda cfg: timm_vit.timm_vit_to_mmlm(sd, cfg)
    folder = path
    hf = checkpoint.json_or_none(folder / "config.json") or {}
    args = dict(hf.get("model_args", {}))
    args["num_classes"] = hf.get("num_classes", args.get("num_classes", 1000)) if with_heads else 0
    with torch.device("meta"):
        model = timm.create_model(hf["architecture"], pretrained=False, **args)
    if not isinstance(model, timm.models.VisionTransformer):
        raise ConversionError(f"{folder}: timm architecture {hf['architecture']!r} is not a VisionTransformer")
    sd = checkpoint.read_folder_weights(folder)
    return timm_vit.config_from_timm(model, hf.get("pretrained_cfg")), lambda cfg: timm_vit.timm_vit_to_mmlm(sd, cfg)


def _openclip(path: Path, with_heads: bool, act: Activation | None) -> Loaded:
    """An OpenCLIP hub / local-dir folder (or a weights file, with open_clip_config.json beside it when there
    is one): the config reads back from that json; a bare file's from its shapes."""
    if path.is_dir():
        sd = checkpoint.read_folder_weights(path, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        oc_config = checkpoint.json_or_none(path / "open_clip_config.json")
    else:
        sd = checkpoint.read_state_dict(path)
        oc_config = checkpoint.json_or_none(path.parent / "open_clip_config.json")
    act = act or _openclip_act(path, sd, oc_config)
    if openclip_coca.is_coca(sd):
        cfg = openclip_coca.config_from_openclip_coca(sd, oc_config, act)
        return cfg, lambda cfg: openclip_coca.openclip_coca_to_mmlm(sd, cfg)
    if oc_config is None:
        cfg = openclip.config_from_state_dict(sd, act)
    else:
        cfg = openclip.config_from_openclip(oc_config, sd, act)
    return cfg, lambda cfg: openclip.openclip_to_mmlm(sd, cfg)


def _openclip_act(path: Path, sd: Mapping[str, torch.Tensor], oc_config: dict[str, Any] | None) -> Activation:
    """QuickGELU or GELU: nothing in the weights says, so look at everything around them.

    A ``model_cfg`` is what open_clip builds the model from, so its ``quick_gelu`` (default False) decides.
    """
    if oc_config is not None and "model_cfg" in oc_config:
        return "quick_gelu" if oc_config["model_cfg"].get("quick_gelu", False) else "gelu"
    if "quickgelu" in path.name.lower().replace("_", "").replace("-", ""):
        return "quick_gelu"
    if openclip.is_openai(sd):
        return "quick_gelu"
    warnings.warn(
        f"{path}: cannot tell whether this CLIP was trained with QuickGELU (OpenAI weights and OpenCLIP "
        "'*-quickgelu' models) or GELU; assuming OpenCLIP's default 'gelu'. Pass act='quick_gelu' if it is wrong: "
        "the wrong activation costs a few points of zero-shot accuracy without any error.",
        stacklevel=3,
    )
    return "gelu"
