"""HF GPT2LMHeadModel -> mmlm TextWithHeads(clm), against transformers' logits."""

from __future__ import annotations

import torch
import transformers
from _parity import assert_parity, randomize_
from safetensors.torch import load_file

import mmlm

VOCAB = 300
CONFIG = dict(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=3, n_positions=32, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)  # fmt: skip


def test_gpt2_lm_logits(tmp_path):
    ref = randomize_(transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))).eval()
    ref.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: saved once, as wte
    model = mmlm.load_pretrained(tmp_path)
    assert isinstance(model, mmlm.TextWithHeads) and model.cfg.heads == ("clm",)
    assert model.cfg.text.act == "gelu_tanh"

    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert_parity(model(ids)["clm_logits"], ref(input_ids=ids).logits, what="GPT-2 logits")

    # tied head: nothing shares memory, so mmlm's safetensors checkpoint round-trips
    mmlm.save(model, tmp_path / "mmlm")
    with torch.no_grad():
        again = mmlm.load(tmp_path / "mmlm").eval()
        assert_parity(again(ids)["clm_logits"], ref(input_ids=ids).logits, what="GPT-2 logits after mmlm.save/load")
