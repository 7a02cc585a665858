"""mmlm.generate on a random coca-tiny: the KV cache changes nothing, beam search with one beam and top-k 1
sampling are greedy decoding, sampling is reproducible, and captions stop at the end token."""

from __future__ import annotations

import pytest
import torch

import mmlm
from mmlm.generate import filter_logits

SOT, EOT, PAD = 998, 999, 0
VOCAB = {"vocab_size": 1000, "eot_token_id": EOT}  # a small vocabulary keeps each step cheap


@pytest.fixture(scope="module")
def model() -> mmlm.CoCa:
    torch.manual_seed(0)
    return mmlm.create_model("coca-tiny", text=VOCAB, decoder=VOCAB, sot_token_id=SOT).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_cache_gives_the_same_tokens(model, images):
    greedy = model.generate(images, max_new_tokens=12)
    assert greedy.shape == (3, 13) and (greedy[:, 0] == SOT).all()
    assert torch.equal(greedy, model.generate(images, max_new_tokens=12, use_cache=False))
    beams = model.generate(images, max_new_tokens=8, num_beams=3)
    assert torch.equal(beams, model.generate(images, max_new_tokens=8, num_beams=3, use_cache=False))


def test_one_beam_and_top_k_1_are_greedy(model, images):
    greedy = model.generate(images, max_new_tokens=10)
    assert torch.equal(model.generate(images, max_new_tokens=10, num_beams=1), greedy)
    assert torch.equal(model.generate(images, max_new_tokens=10, num_beams=1, length_penalty=0.0), greedy)
    sampled = model.generate(
        images, max_new_tokens=10, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(sampled, greedy)


def _log_prob(model, images, ids) -> torch.Tensor:
    with torch.no_grad():
        state = model.start_decoding(images, use_cache=False)
        steps = [model.next_token_logits(ids[:, :t], state).log_softmax(-1) for t in range(1, ids.shape[1])]
    return sum(s.gather(1, ids[:, t + 1, None]).squeeze(1) for t, s in enumerate(steps))


def test_beam_search_finds_likelier_captions(model, images):
    greedy = model.generate(images, max_new_tokens=6)
    beams = model.generate(images, max_new_tokens=6, num_beams=4, length_penalty=0.0)
    assert beams.shape == greedy.shape  # no end token in 6 steps of a random model: full length both
    assert (_log_prob(model, images, beams) >= _log_prob(model, images, greedy) - 1e-5).all()


def test_sampling_is_reproducible(model, images):
    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.generate(images, max_new_tokens=10, do_sample=True, top_p=0.9, temperature=1.5, generator=g)

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_stops_at_the_end_token(model, images, monkeypatch):
    """Row 0 is pushed to its end token at the third step: it pads from there on; once every row has ended
    the loop stops early."""
    original = model.next_token_logits

    def push(input_ids, state):
        logits = original(input_ids, state)
        step = input_ids.shape[1]
        if step >= 3:
            logits[0 if step == 3 else slice(None), EOT] = 1e4
        return logits

    monkeypatch.setattr(model, "next_token_logits", push)
    for num_beams in (1, 2):
        ids = model.generate(images, max_new_tokens=20, num_beams=num_beams)
        assert ids[0, 3] == EOT and (ids[0, 4:] == PAD).all(), (num_beams, ids)
        assert (ids[1:, 4] == EOT).all() and ids.shape[1] == 5


def test_min_new_tokens_and_filters(model, images):
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # softmax: 0.64, 0.24, 0.09, 0.03: top_p 0.7 keeps the first two, top_p 0.5 the first alone
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(images, max_new_tokens=40)


@pytest.mark.parametrize("share", ["attention", "all"])
def test_towers_sharing_blocks_still_caption(share, images):
    """With shared towers the text tower's cache lives in the CoCa's shared blocks, used with modality "text"."""
    torch.manual_seed(0)
    model = mmlm.create_model("coca-tiny", text=VOCAB, decoder=VOCAB, sot_token_id=SOT, share=share).eval()
    assert "blocks.0.attn.qkv.weight" in model.state_dict()
    out = model(images, torch.tensor([[SOT, 5, 6, EOT]] * 3))
    assert out.logits.shape == (3, 3, 1000) and out.image_embeds.shape == (3, 64)
    ids = model.generate(images, max_new_tokens=5)
    assert torch.equal(ids, model.generate(images, max_new_tokens=5, use_cache=False))
