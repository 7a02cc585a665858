"""Typed model configs and the named presets.

A preset is a function returning a config; ``from_name("clip-vit-b-32")`` looks it
up. YAML files in ``configs/`` only choose a preset and override fields, so every
shape in the project is written down once, here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union, get_args

from mmlm.errors import UsageKeyError, UsageTypeError

Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]
Share = Literal["none", "attention", "attention_mlp", "all"]
# Whose initialisation a model starts from (see mmlm.models.init): HF BERT, HF GPT-2, timm ViT, OpenCLIP.
Init = Literal["bert", "gpt2", "timm", "clip"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass
class TransformerConfig:
    """What every stack of shared ``Block``s needs; both towers extend it."""

    width: int = 768  # model dimension
    depth: int = 12  # number of blocks
    heads: int = 12  # attention heads; width must divide evenly
    mlp_ratio: float = 4.0  # MLP hidden size = width * mlp_ratio
    act: Activation = "gelu"  # MLP activation
    norm_eps: float = 1e-5  # LayerNorm eps (BERT 1e-12, timm ViT 1e-6)
    pre_norm: bool = True  # pre-LN (GPT, CLIP, ViT) or post-LN (BERT)
    qkv_bias: bool = True  # bias on the fused qkv projection
    dropout: float = 0.0  # dropout on embeddings and residual branches
    attn_dropout: float = 0.0  # dropout on attention probabilities
    drop_path: float = 0.0  # stochastic depth rate, linear over depth
    layer_scale: float | None = None  # LayerScale init value; None disables it
    init: Init = "timm"  # initialisation of a new model, as its reference does it; the presets set it per family

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class TextConfig(TransformerConfig):
    """A text Transformer: CLIP text tower, BERT, GPT-2, MiniLM."""

    vocab_size: int = 49408
    context_length: int = 77  # number of position embeddings
    pos_embed: Literal["learned", "sinusoidal"] = "learned"
    causal: bool = True  # GPT / CLIP attend left only; BERT sees both sides
    type_vocab_size: int = 0  # BERT token types (segments); 0 = none
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    final_norm: bool = True  # LayerNorm after the last block (pre-LN models)
    pool: Literal["cls", "eot", "mean", "max", "last"] = "eot"
    pad_token_id: int = 0
    eot_token_id: int | None = 49407  # pooled token for pool="eot"
    mask_token_id: int | None = None  # [MASK] for MLM, when the vocabulary has one
    # what a sentence encoder adds (sentence-transformers' Transformer and Normalize modules):
    normalize: bool = False  # forward() L2-normalises the pooled output
    max_seq_length: int | None = None  # encode() truncates texts to this many tokens; None = context_length
    do_lower_case: bool = False  # encode() lower-cases texts before tokenising
    init: Init = "clip"  # like every default above, that of CLIP's text tower

    @property
    def model_type(self) -> str:
        return "text"


@dataclass
class VisionConfig(TransformerConfig):
    """A patch-based Vision Transformer (CLIP image tower or timm-style ViT)."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    patch_bias: bool = True  # timm ViT has a bias on the patch conv, CLIP not
    class_token: bool = True
    norm_pre: bool = False  # CLIP's ln_pre before the blocks
    final_norm: bool = True
    pool: Literal["cls", "gap"] = "cls"
    patch_dropout: float = 0.0  # fraction of patch tokens dropped in training (FLIP)
    num_classes: int = 0  # classifier head size; 0 = no head
    # preprocessing the weights were trained with (read by mmlm.data transforms)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    @property
    def model_type(self) -> str:
        return "vision"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class CLIPConfig:
    """Two towers (or one shared tower) projected into a joint embedding space."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # What the towers share per layer: none | attention | attention_mlp | all.
    share: Share = "none"
    # Layers [start, stop) that share; None = every layer. Needs equal tower depth.
    share_layers: tuple[int, int] | None = None
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # SigLIP: -10
    max_logit_scale: float = math.log(100)

    @property
    def model_type(self) -> str:
        return "clip"

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if self.share_layers is not None:
            self.share_layers = tuple(self.share_layers)
        if self.share not in get_args(Share):
            raise ValueError(f"share={self.share!r} is not a sharing mode; use one of {', '.join(get_args(Share))}")
        if self.share != "none":
            self.check_shareable()

    def check_shareable(self) -> None:
        """Sharing a block needs both towers to have the same block shape."""
        v, t = self.vision, self.text
        for name in ("width", "heads", "mlp_ratio", "depth", "act", "norm_eps", "pre_norm", "qkv_bias", "layer_scale"):
            if getattr(v, name) != getattr(t, name):
                raise ValueError(
                    f"share={self.share!r} needs equal {name} in both towers, "
                    f"got vision {getattr(v, name)!r} and text {getattr(t, name)!r}"
                )
        start, stop = self.shared_range
        if not 0 <= start < stop <= v.depth:
            raise ValueError(f"share_layers {self.share_layers} out of range for depth {v.depth}")

    @property
    def shared_range(self) -> tuple[int, int]:
        if self.share == "none":
            return (0, 0)
        return self.share_layers if self.share_layers is not None else (0, self.vision.depth)


@dataclass
class CoCaConfig(CLIPConfig):
    """CoCa (OpenCLIP's ``coca_*``): a CLIP whose image tower ends in an attentional pooler, plus a
    multimodal text decoder whose blocks attend to the pooled image tokens, for captions.

    ``text.context_length`` counts the class token CoCa appends after the text: texts hold at most
    ``context_length - 1`` tokens (``text.max_seq_length``). ``text.width`` must equal ``decoder.width``
    (the decoder reads the text tower's tokens).
    """

    decoder: TextConfig = field(default_factory=TextConfig)  # width, depth, heads, act, vocab_size (logits)
    pool_queries: int = 256  # attentional pooler queries: the first is pooled (contrastive), the rest feed the decoder
    pool_heads: int = 8
    # OpenCLIP's original CoCa text mask, shifted by one column: what every released CoCa was trained with and
    # what open_clip 3.3's configs build. False: the corrected mask (TextTransformer(correct_cls_mask=True))
    legacy_cls_mask: bool = True
    sot_token_id: int = 49406  # the first token of every caption (CLIP's <start_of_text>)

    @property
    def model_type(self) -> str:
        return "coca"

    def __post_init__(self) -> None:
        if isinstance(self.decoder, dict):
            self.decoder = TextConfig(**self.decoder)
        super().__post_init__()
        if self.text.width != self.decoder.width:
            raise ValueError(f"CoCa needs text.width == decoder.width, got {self.text.width} and {self.decoder.width}")
        if self.pool_queries < 2:
            raise ValueError("CoCa's pooler needs at least 2 queries: one pooled, the others for the decoder")

    @property
    def max_text_length(self) -> int:
        return self.text.max_seq_length or self.text.context_length - 1


TextHead = Literal["pooler", "mlm", "nsp", "clm", "classifier", "token_classifier", "qa"]
TEXT_HEADS: tuple[str, ...] = get_args(TextHead)


@dataclass
class TextWithHeadsConfig:
    """A TextEncoder plus task heads: those its checkpoint came with (BERT pretraining, GPT-2 LM) or fine-tuned ones."""

    text: TextConfig = field(default_factory=TextConfig)
    # pooler: BERT dense+tanh on [CLS]; mlm: tied masked-LM head; nsp: 2-way on the pooler; clm: tied LM head;
    # classifier: linear on the pooler output when 'pooler' is among the heads (BERT), else on the encoder's
    # pooled output; token_classifier: linear per token; qa: 2-way linear per token (answer start / end)
    heads: tuple[TextHead, ...] = ("mlm",)
    num_labels: int = 0  # classes of the classifier / token_classifier head
    classifier_dropout: float = 0.1  # dropout before the classifier / token_classifier head

    @property
    def model_type(self) -> str:
        return "text_heads"

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.heads = tuple(self.heads)
        unknown = set(self.heads) - set(TEXT_HEADS)
        if unknown:
            raise ValueError(f"unknown text head(s) {sorted(unknown)}; known: {', '.join(TEXT_HEADS)}")
        if "nsp" in self.heads and "pooler" not in self.heads:
            raise ValueError("the nsp head reads the pooler output: add 'pooler' to heads")
        labelled = [h for h in self.heads if h in ("classifier", "token_classifier")]
        if len(labelled) > 1:
            raise ValueError("heads classifier and token_classifier both give 'logits': choose one")
        if labelled and self.num_labels < 1:
            raise ValueError(f"the {labelled[0]} head needs num_labels >= 1, got {self.num_labels}")


ModelConfig = Union[CLIPConfig, CoCaConfig, TextConfig, VisionConfig, TextWithHeadsConfig]
CONFIG_TYPES: dict[str, type] = {
    "clip": CLIPConfig,
    "coca": CoCaConfig,
    "text": TextConfig,
    "vision": VisionConfig,
    "text_heads": TextWithHeadsConfig,
}


def to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A JSON-ready dict, tagged with the model type so ``from_dict`` can rebuild it."""
    return {"model_type": cfg.model_type, **dataclasses.asdict(cfg)}


def from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    cls = CONFIG_TYPES[d.pop("model_type")]
    for key in ("image_mean", "image_std"):
        if key in d:
            d[key] = tuple(d[key])
    for key in ("vision", "text", "decoder"):
        if key in d:
            d[key] = from_dict({"model_type": "text" if key == "decoder" else key, **d[key]})
    return cls(**d)


def update(cfg: ModelConfig, **overrides: Any) -> ModelConfig:
    """A copy of ``cfg`` with fields replaced; nested configs take dicts or dotted keys.

    >>> update(from_name("clip-tiny"), share="all", vision={"patch_dropout": 0.5})
    >>> update(from_name("clip-tiny"), **{"text.causal": False})
    """
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, key, None)):
            nested.setdefault(head, {}).update(value)
        else:
            flat[key] = value
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = (set(flat) | set(nested)) - names
    if unknown:
        fields = ", ".join(sorted(names))
        raise UsageTypeError(f"{type(cfg).__name__} has no field(s) {sorted(unknown)}; its fields: {fields}")
    for key, sub in nested.items():
        flat[key] = update(getattr(cfg, key), **sub)
    return dataclasses.replace(cfg, **flat)


# ---------------------------------------------------------------------------- presets

PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register(name: str, doc: str | None = None):
    """Add a preset; ``doc`` (or the function's docstring) is shown by ``mmlm presets``."""

    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        fn.__doc__ = doc or fn.__doc__
        PRESETS[name] = fn
        return fn

    return wrap


def from_name(name: str, **overrides: Any) -> ModelConfig:
    """The preset called ``name``, with ``overrides`` applied (see ``update``)."""
    if name not in PRESETS:
        raise UsageKeyError(unknown_preset(name))
    cfg = PRESETS[name]()
    return update(cfg, **overrides) if overrides else cfg


def list_presets() -> list[str]:
    return sorted(PRESETS)


def unknown_preset(name: str, also: str = "") -> str:
    """The message for a name that is no preset: the closest presets first, then all of them."""
    close = difflib.get_close_matches(name, PRESETS, n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return f"unknown preset {name!r}{also}{hint}. Presets: {', '.join(sorted(PRESETS))}"


def unknown_model(spec: str) -> str:
    """The message for a model that is neither a preset nor an existing checkpoint, worded for what it looks like."""
    if "/" in spec or "\\" in spec or spec.endswith((".ckpt", ".safetensors", ".bin", ".pt", ".pth")):
        return f"no checkpoint file or folder {spec!r} (nor is it a preset name)"
    return unknown_preset(spec, also=", and no checkpoint file or folder of that name")


def _clip_vision(patch_size: int, width: int = 768, depth: int = 12, heads: int = 12, image_size: int = 224) -> VisionConfig:
    return VisionConfig(
        width=width, depth=depth, heads=heads, image_size=image_size, patch_size=patch_size,
        patch_bias=False, norm_pre=True, act="quick_gelu", norm_eps=1e-5, init="clip",
        image_mean=OPENAI_MEAN, image_std=OPENAI_STD,
    )  # fmt: skip


def _clip_text(width: int = 512, depth: int = 12, heads: int = 8, vocab_size: int = 49408, context_length: int = 77) -> TextConfig:
    return TextConfig(
        width=width, depth=depth, heads=heads, vocab_size=vocab_size, context_length=context_length,
        act="quick_gelu", causal=True, pool="eot", eot_token_id=vocab_size - 1, pad_token_id=0, init="clip",
    )  # fmt: skip


@register("clip-vit-b-32")
def _() -> CLIPConfig:
    """OpenAI CLIP ViT-B/32 (151.28 M parameters)."""
    return CLIPConfig(embed_dim=512, vision=_clip_vision(32), text=_clip_text())


@register("clip-vit-b-16")
def _() -> CLIPConfig:
    """OpenAI CLIP ViT-B/16 (149.62 M parameters)."""
    return CLIPConfig(embed_dim=512, vision=_clip_vision(16), text=_clip_text())


@register("clip-shared-b-32")
def _() -> CLIPConfig:
    """ViT-B/32 CLIP whose towers share attention and MLP (MS-CLIP style); text width 768."""
    return CLIPConfig(embed_dim=512, vision=_clip_vision(32), text=_clip_text(width=768, heads=12), share="attention_mlp")


@register("siglip-vit-b-16")
def _() -> CLIPConfig:
    """A SigLIP-style CLIP: sigmoid-loss scale ln 10 and bias -10."""
    cfg = CLIPConfig(embed_dim=512, vision=_clip_vision(16), text=_clip_text())
    return dataclasses.replace(cfg, init_logit_scale=math.log(10), init_logit_bias=-10.0)


def _timm_vit(patch_size: int, width: int, depth: int, heads: int, num_classes: int = 1000) -> VisionConfig:
    return VisionConfig(
        width=width, depth=depth, heads=heads, patch_size=patch_size, norm_eps=1e-6, act="gelu", init="timm",
        num_classes=num_classes, image_mean=HALF, image_std=HALF,
    )  # fmt: skip


register("vit-b-32", "timm ViT-B/32, 1000-class head")(lambda: _timm_vit(32, 768, 12, 12))
register("vit-b-16", "timm ViT-B/16, 1000-class head")(lambda: _timm_vit(16, 768, 12, 12))
register("vit-s-16", "timm ViT-S/16, 1000-class head")(lambda: _timm_vit(16, 384, 12, 6))
register("vit-ti-16", "timm ViT-Ti/16, 1000-class head")(lambda: _timm_vit(16, 192, 12, 3))


def _bert(width: int = 768, depth: int = 12, heads: int = 12, vocab_size: int = 30522, pool: str = "cls") -> TextConfig:
    return TextConfig(
        width=width, depth=depth, heads=heads, vocab_size=vocab_size, context_length=512, type_vocab_size=2,
        causal=False, pre_norm=False, embed_norm=True, final_norm=False, norm_eps=1e-12, act="gelu",
        pool=pool, pad_token_id=0, eot_token_id=102, mask_token_id=103, dropout=0.1, attn_dropout=0.1, init="bert",
    )  # fmt: skip


register("bert-base", "BERT-base uncased shapes, post-LN")(lambda: _bert())
register("bert-large", "BERT-large shapes, post-LN")(lambda: _bert(1024, 24, 16))
# sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT, width 384, mean pooling
register("minilm-l6", "all-MiniLM-L6-v2 shapes, mean pooling")(lambda: _bert(384, 6, 12, pool="mean"))


def _gpt2(width: int = 768, depth: int = 12, heads: int = 12, vocab_size: int = 50257) -> TextConfig:
    return TextConfig(
        width=width, depth=depth, heads=heads, vocab_size=vocab_size, context_length=1024, causal=True,
        act="gelu_tanh", norm_eps=1e-5, pool="last", pad_token_id=vocab_size - 1, eot_token_id=vocab_size - 1,
        dropout=0.1, attn_dropout=0.1, init="gpt2",
    )  # fmt: skip


register("gpt2", "GPT-2 small (124 M)")(lambda: _gpt2())
register("gpt2-medium", "GPT-2 medium (355 M)")(lambda: _gpt2(1024, 24, 16))

# ---- tiny presets: same code paths, seconds on a CPU (tests and demos)

_TINY = dict(width=64, depth=2, heads=4)


@register("clip-tiny")
def _() -> CLIPConfig:
    """test-size CLIP: 32 px, patch 8, width 64, 2 layers; the real CLIP BPE vocabulary"""
    vision = update(_clip_vision(8, image_size=32), **_TINY)
    text = update(_clip_text(context_length=32), **_TINY)
    return CLIPConfig(embed_dim=32, vision=vision, text=text)


@register("clip-shared-tiny")
def _() -> CLIPConfig:
    """clip-tiny with attention + MLP shared across the towers"""
    return update(PRESETS["clip-tiny"](), share="attention_mlp")


register("vit-tiny", "test-size ViT, 32 px, 10 classes")(lambda: update(_timm_vit(8, 64, 2, 4, num_classes=10), image_size=32))
register("bert-tiny", "test-size BERT")(lambda: update(_bert(vocab_size=1000), context_length=64, **_TINY))
register("minilm-tiny", "test-size MiniLM (mean pooling)")(lambda: update(_bert(vocab_size=1000, pool="mean"), context_length=64, **_TINY))
register("gpt2-tiny", "test-size GPT-2")(lambda: update(_gpt2(vocab_size=1000), context_length=64, **_TINY))


# ---- CoCa: OpenCLIP's coca_ViT-B-32 (GELU, no QuickGELU) and a test-size one


def _coca(vision: VisionConfig, text: TextConfig, embed_dim: int, pool_queries: int, **fields: Any) -> CoCaConfig:
    # the image tower's final norm is the pooler's (ln_post after attn_pool); the text tower gets a position for
    # the class token CoCa appends, and tokenises one token less
    vision = update(vision, act="gelu", final_norm=False)
    decoder = update(text, act="gelu")
    text = update(decoder, context_length=text.context_length + 1, max_seq_length=text.context_length)
    return CoCaConfig(
        embed_dim=embed_dim, vision=vision, text=text, decoder=decoder, pool_queries=pool_queries, **fields
    )


@register("coca-vit-b-32")
def _() -> CoCaConfig:
    """OpenCLIP coca_ViT-B-32 shapes (253.56 M parameters): ViT-B/32, 12-layer text tower and decoder"""
    return _coca(_clip_vision(32), _clip_text(context_length=76), 512, 256)


@register("coca-tiny")
def _() -> CoCaConfig:
    """test-size CoCa: 32 px, patch 8, width 64, 2 layers per tower and decoder; the CLIP BPE vocabulary"""
    vision = update(_clip_vision(8, image_size=32), **_TINY)
    text = update(_clip_text(context_length=32), **_TINY)
    return _coca(vision, text, 64, 16, pool_heads=4)
