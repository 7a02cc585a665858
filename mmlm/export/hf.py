"""mmlm -> a transformers folder that transformers' own classes and pipelines load offline.

A CLIP becomes a complete ``CLIPModel`` folder, so that ``CLIPModel`` / ``AutoProcessor`` /
``pipeline("zero-shot-image-classification", model=DIR)`` need nothing else:

- ``model.safetensors`` + ``config.json``: the weights and shapes (``mmlm.convert.hf_clip``);
- the tokenizer. The CLIP BPE (``tokenizer=None`` with CLIP's 49,408 tokens, or mmlm's CLIP
  tokenizer) is written as ``CLIPTokenizer`` files, ``vocab.json`` + ``merges.txt`` built from the
  vocabulary open_clip ships, with transformers' names for the two special tokens; any other mmlm
  tokenizer as its own ``tokenizer.json``. ``model_max_length`` is the text context, so
  ``tokenizer(texts, truncation=True)`` (or the processor's) cuts a long text as mmlm does, keeping
  its end-of-text token. transformers' zero-shot pipeline never asks a CLIP tokenizer to truncate
  (and drops ``tokenizer_kwargs``), so there a prompt must fit the context;
- ``preprocessor_config.json``: mmlm's eval transform (``mmlm.data.image_transform``) in
  ``CLIPImageProcessor`` terms: short side resized to ``image_size``, centre crop, the tower's
  interpolation, mean and std. With ``backend="pil"`` the processor gives mmlm's pixels, except where
  the crop starts half a pixel in (transformers floors the offset, torchvision rounds it); the default
  torchvision backend of transformers 5 resizes tensors, within one grey level of PIL.

``CLIPTokenizer`` has no ftfy / HTML clean-up, so its ids differ from mmlm's (open_clip's) only on text
that clean-up changes: curly quotes, ligatures, full-width letters, mojibake, entities such as ``&amp;``.

SigLIP (a CLIP with ``logit_bias``) exports as a ``CLIPModel`` too. ``CLIPModel`` has no bias: its
``logits_per_image`` are ``logit_scale * cos`` and transformers reports ``logit_bias`` in the weights
file as an unexpected key it leaves out. A bias shared by every image-text pair does not change a
softmax over classes, so the zero-shot pipeline ranks classes as mmlm does; sigmoid probabilities
need the bias added back. The tensor (and ``logit_bias_init_value`` in config.json) is there for
``mmlm.load_pretrained``, which restores the model exactly. transformers' ``SiglipModel`` cannot take
these weights: its towers differ (no class token or pre-norm, an attention-pooling vision head,
bidirectional text pooled at the last token through a biased head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from mmlm import checkpoint
from mmlm.config import TextConfig, VisionConfig
from mmlm.convert import hf_clip
from mmlm.convert.common import ConversionError
from mmlm.models import CLIP

if TYPE_CHECKING:
    import transformers

    from mmlm.data.tokenizers import Tokenizer

CLIP_VOCAB_SIZE = 49408
# transformers' (and OpenAI's) names for open_clip's <start_of_text> / <end_of_text>
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling


def export(model: nn.Module, folder: Path, *, tokenizer: Tokenizer | None = None, final: Path | None = None) -> Path:
    if isinstance(model, CLIP):
        return _clip(model, folder, tokenizer)
    from mmlm.export import hf_encoders

    return hf_encoders.export(model, folder, tokenizer=tokenizer)  # BERT / GPT-2 with their heads, ViT classifiers


def _clip(model: CLIP, folder: Path, tokenizer: Tokenizer | None) -> Path:
    import transformers

    cfg = model.cfg
    kwargs = hf_clip.config_to_hf(cfg)  # raises for what HF cannot express
    clip_bpe = _uses_clip_bpe(cfg.text, tokenizer)  # raises before anything is written
    if not clip_bpe:  # HF's default is CLIP's <|startoftext|>
        kwargs["text_config"]["bos_token_id"] = tokenizer.bos_token_id  # type: ignore[union-attr]
    hf_config = transformers.CLIPConfig(**kwargs)
    sd = hf_clip.mmlm_to_hf_clip(model.state_dict(), cfg)
    hf_config.architectures = ["CLIPModel"]
    hf_config.save_pretrained(folder)
    # the same file transformers' save_pretrained writes: safetensors with format "pt"
    checkpoint.save_safetensors(
        {k: v.detach().cpu().float().contiguous() for k, v in sd.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    if clip_bpe:
        _write_clip_tokenizer(folder, cfg.text.context_length)
    else:
        _write_tokenizer(tokenizer, folder, cfg.text.context_length)  # type: ignore[arg-type]
    _image_processor(cfg.vision).save_pretrained(folder)
    return folder


def _uses_clip_bpe(text: TextConfig, tokenizer: Tokenizer | None) -> bool:
    """True to write the CLIP BPE; raises when the tokenizer cannot drive this text tower."""
    from mmlm.data.tokenizers import clip_tokenizer

    if tokenizer is None:
        if text.vocab_size != CLIP_VOCAB_SIZE:
            raise ConversionError(
                f"the text tower has {text.vocab_size} tokens, not the CLIP BPE's {CLIP_VOCAB_SIZE}: give the "
                "tokenizer it was trained with (mmlm convert --tokenizer FOLDER, export(..., tokenizer=...))"
            )
        return True
    if tokenizer.vocab_size > text.vocab_size or tokenizer.eot_token_id != text.eot_token_id:
        raise ConversionError(
            f"the tokenizer ({tokenizer.vocab_size} tokens, end of text {tokenizer.eot_token_id}) does not fit the "
            f"text tower ({text.vocab_size} tokens, pooled at token {text.eot_token_id})"
        )
    # mmlm's own CLIP tokenizer (the one a `mmlm fit` checkpoint names) is written as transformers' CLIPTokenizer
    return (
        tokenizer.vocab_size == CLIP_VOCAB_SIZE
        and tokenizer.backend.get_vocab() == clip_tokenizer().backend.get_vocab()
    )


def _write_clip_tokenizer(folder: Path, context_length: int) -> None:
    """``CLIPTokenizer`` files for the CLIP BPE: ids equal ``mmlm.data.tokenizers.clip_tokenizer``'s."""
    from mmlm.data.tokenizers import CLIP_EOT, CLIP_SOT, clip_tokenizer

    bpe = json.loads(clip_tokenizer().backend.to_str())["model"]
    names = {CLIP_SOT: HF_SOT, CLIP_EOT: HF_EOT}
    vocab = {names.get(token, token): i for token, i in bpe["vocab"].items()}
    # tokenizers >= 0.20 serialises a merge as a pair, older versions as "a b"
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # CLIP pads with end-of-text in transformers (0 in open_clip): the mask hides padding either way
    specials = {"bos_token": HF_SOT, "eos_token": HF_EOT, "unk_token": HF_EOT, "pad_token": HF_EOT}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True, **specials}
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", specials)


def _write_tokenizer(tokenizer: Tokenizer, folder: Path, context_length: int) -> None:
    """``Tokenizer.save``, truncating at the model's context and padding with end-of-text if it has no pad token."""
    tokenizer.save(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model_max_length"] = context_length
    if "pad_token" not in config:  # the zero-shot pipeline pads its prompts
        config["pad_token"] = tokenizer.id_to_token(tokenizer.eot_token_id)  # type: ignore[arg-type]
    _write_json(path, config)


def _image_processor(vision: VisionConfig) -> transformers.CLIPImageProcessor:
    """``CLIPImageProcessor`` doing ``mmlm.data.image_transform(vision, train=False)``."""
    import transformers

    size = vision.image_size
    return transformers.CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=RESAMPLE[vision.interpolation],
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(vision.image_mean), image_std=list(vision.image_std), do_convert_rgb=True,
    )  # fmt: skip


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
