"""mmlm CLIP or CoCa -> a folder that ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")`` load offline.

``open_clip_config.json`` holds ``model_cfg`` (``open_clip.CLIP``'s arguments) and ``preprocess_cfg``
(size, mean, std, interpolation); the weights are ``open_clip_model.safetensors``. The CLIP BPE is
OpenCLIP's default tokenizer, so a CLIP BPE model needs no tokenizer files. Any other tokenizer is
saved beside the weights as a transformers folder and named by ``hf_tokenizer_name``, which makes
open_clip read it (through ``AutoTokenizer``) from the local-dir folder itself; set it to the repo id
when uploading the folder to the Hugging Face hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mmlm import checkpoint
from mmlm.config import TextConfig
from mmlm.convert import openclip, openclip_coca
from mmlm.convert.common import ConversionError
from mmlm.data.tokenizers import CLIP_EOT, CLIP_SOT, CLIP_VOCAB_SIZE, Tokenizer, clip_tokenizer
from mmlm.models import CLIP, CoCa


def export(model: nn.Module, folder: Path, *, tokenizer: Tokenizer | None = None, final: Path | None = None) -> Path:
    cfg = model.cfg
    if isinstance(model, CoCa):  # open_clip builds a CoCa from the multimodal_cfg in its config
        config = openclip_coca.config_to_openclip_coca(cfg)  # raises for what OpenCLIP cannot express
        own = _own_tokenizer(cfg.text, tokenizer)
        sd = openclip_coca.mmlm_to_openclip_coca(model.state_dict(), cfg)
    elif isinstance(model, CLIP):
        config = openclip.config_to_openclip(cfg)
        own = _own_tokenizer(cfg.text, tokenizer)
        sd = openclip.mmlm_to_openclip(model.state_dict(), cfg)
    else:
        raise ConversionError(f"--to open_clip writes CLIP and CoCa models only, not a {type(model).__name__}")
    if own is not None:
        # where the folder will be, not where it is written
        config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = str((final or folder).resolve())
        own.save(folder)
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    checkpoint.save_safetensors(
        {k: v.detach().cpu().float().contiguous() for k, v in sd.items()}, folder / "open_clip_model.safetensors"
    )
    return folder


def _is_clip_bpe(tok: Tokenizer) -> bool:
    return (tok.vocab_size, tok.token_to_id(CLIP_SOT), tok.token_to_id(CLIP_EOT)) == (CLIP_VOCAB_SIZE, 49406, 49407)


def _own_tokenizer(text: TextConfig, tokenizer: Tokenizer | None) -> Tokenizer | None:
    """The tokenizer to save beside the weights; None for the CLIP BPE, open_clip's default.

    Checked against the text tower: its ids fit the vocabulary, it ends each text with the token
    the tower pools, and it can pad (open_clip pads every text to the context length).
    """
    if tokenizer is None:
        if text.vocab_size != CLIP_VOCAB_SIZE:
            raise ConversionError(
                f"the text tower has {text.vocab_size} tokens, not the CLIP BPE's {CLIP_VOCAB_SIZE}: "
                "give the tokenizer it was trained with (--tokenizer DIR)"
            )
        tokenizer = clip_tokenizer(text.context_length)
    problems = []
    if tokenizer.vocab_size > text.vocab_size:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens, the text tower only {text.vocab_size}")
    if tokenizer.eot_token_id != text.eot_token_id:
        problems.append(
            f"the tokenizer ends a text with id {tokenizer.eot_token_id}, the text tower pools id {text.eot_token_id}"
        )
    clip = _is_clip_bpe(tokenizer)
    if not clip and "pad" not in tokenizer.special_tokens:
        problems.append("the tokenizer has no pad token, which open_clip's HFTokenizer needs to pad to the context")
    if problems:
        raise ConversionError("this tokenizer does not fit the model:\n  " + "\n  ".join(problems))
    return None if clip else tokenizer
