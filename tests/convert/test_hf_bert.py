"""HF BERT (BertForPreTraining, BertModel, the classifiers) -> mmlm TextEncoder / TextWithHeads,
against transformers."""

from __future__ import annotations

import pytest
import torch
import transformers
from _parity import assert_parity, randomize_
from safetensors.torch import load_file, save_file

import mmlm
from mmlm.convert import ConversionError

VOCAB = 500
# non-default everything: width 48, 3 heads of 16, 3 layers, MLP 80 (ratio 5/3), eps 1e-7
CONFIG = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=80, max_position_embeddings=40, layer_norm_eps=1e-7)  # fmt: skip


def batch() -> dict[str, torch.Tensor]:
    """Two right-padded sentence pairs with token types, as BERT's tokenizer would build them."""
    ids = torch.randint(5, VOCAB, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    types = torch.zeros(2, 14, dtype=torch.long)
    types[0, 7:], types[1, 5:9] = 1, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def test_bert_for_pretraining_mlm_and_nsp(tmp_path):
    ref = randomize_(transformers.BertForPreTraining(transformers.BertConfig(**CONFIG))).eval()
    ref.save_pretrained(tmp_path)
    model = mmlm.load_pretrained(tmp_path)
    assert isinstance(model, mmlm.TextWithHeads) and model.cfg.heads == ("pooler", "mlm", "nsp")
    b = batch()
    with torch.no_grad():
        expected = ref(**b)
        out = model(**b)
    real = b["attention_mask"].bool()
    assert_parity(out["mlm_logits"][real], expected.prediction_logits[real], what="BERT MLM logits")
    assert_parity(out["nsp_logits"], expected.seq_relationship_logits, what="BERT NSP logits")

    # an encoder with heads round-trips through mmlm's own safetensors checkpoint
    mmlm.save(model, tmp_path / "mmlm")
    again = mmlm.load_pretrained(tmp_path / "mmlm")
    with torch.no_grad():
        assert_parity(
            again(**b)["mlm_logits"][real], expected.prediction_logits[real], what="BERT MLM after mmlm.save/load"
        )


def test_bert_model_last_hidden_state_and_pooler(tmp_path):
    ref = randomize_(transformers.BertModel(transformers.BertConfig(**CONFIG))).eval()
    ref.save_pretrained(tmp_path)
    b = batch()
    real = b["attention_mask"].bool()
    with torch.no_grad():
        expected = ref(**b)
        out = mmlm.load_pretrained(tmp_path)(**b)
        bare = mmlm.load_pretrained(tmp_path, with_heads=False)
        states = bare.forward_features(**b)
    assert isinstance(bare, mmlm.TextEncoder)
    assert_parity(out["hidden_states"][real], expected.last_hidden_state[real], what="BertModel last_hidden_state")
    assert_parity(out["pooled"], expected.pooler_output, what="BertModel pooler_output")
    assert_parity(states[real], expected.last_hidden_state[real], what="BertModel -> bare TextEncoder")


@pytest.mark.parametrize(
    ("cls", "heads"),
    [
        ("BertForSequenceClassification", ("pooler", "classifier")),
        ("BertForTokenClassification", ("token_classifier",)),
    ],
)
def test_bert_classifiers_give_their_logits(cls, heads, tmp_path):
    config = transformers.BertConfig(**CONFIG, num_labels=5, classifier_dropout=0.2)
    ref = randomize_(getattr(transformers, cls)(config)).eval()
    ref.save_pretrained(tmp_path)
    model = mmlm.load_pretrained(tmp_path)
    assert (model.cfg.heads, model.cfg.num_labels, model.cfg.classifier_dropout) == (heads, 5, 0.2)
    b = batch()
    real = b["attention_mask"].bool() if cls == "BertForTokenClassification" else slice(None)
    with torch.no_grad():
        assert_parity(model(**b)["logits"][real], ref(**b).logits[real], atol=1e-5, what=f"{cls} logits")
    # the bare encoder leaves the classifier out on purpose
    assert isinstance(mmlm.load_pretrained(tmp_path, with_heads=False), mmlm.TextEncoder)


def test_legacy_gamma_beta_names_load(tmp_path):
    ref = randomize_(transformers.BertForMaskedLM(transformers.BertConfig(**CONFIG))).eval()
    ref.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    old = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in sd.items()
    }
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = mmlm.load_pretrained(tmp_path)
    assert model.cfg.heads == ("mlm",)
    b = batch()
    with torch.no_grad():
        assert_parity(model(**b)["mlm_logits"], ref(**b).logits, what="BertForMaskedLM with gamma/beta names")


def test_untied_decoder_is_refused(tmp_path):
    ref = transformers.BertForMaskedLM(transformers.BertConfig(**CONFIG)).eval()
    ref.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["cls.predictions.decoder.weight"] = torch.randn(VOCAB, 48)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="cls.predictions.decoder.weight"):
        mmlm.load_pretrained(tmp_path)
