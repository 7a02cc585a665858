"""Captions, token by token: greedy, beam search, and top-k / top-p sampling, batched, with a KV cache.

Written for mmlm rather than borrowed from transformers' generation API, whose changes keep breaking
OpenCLIP's CoCa (``BeamSearchScorer``, gone in transformers 5). The model supplies three methods
(``mmlm.models.CoCa`` has them); nothing here knows what it is::

    state = model.start_decoding(images, use_cache)     # image tokens, empty per-block caches
    logits = model.next_token_logits(input_ids, state)  # (B, vocab) for the next token
    model.reorder_state(state, index)                   # beam search: keep cache rows ``index``

Every caption starts with the start token and ends at the end token; rows that ended are padded with
the pad token while the others go on, and decoding stops when every row has ended.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _special(model: Any, sot: int | None, eot: int | None, pad: int | None) -> tuple[int, int, int]:
    """The start, end and pad ids: given, else the model's config (CLIP's 49406 / 49407 / 0 for its presets)."""
    cfg = model.cfg
    return (
        cfg.sot_token_id if sot is None else sot,
        cfg.text.eot_token_id if eot is None else eot,
        cfg.text.pad_token_id if pad is None else pad,
    )


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` largest (0: no limit) and outside the smallest set whose
    probability reaches ``top_p`` (nucleus sampling; 1.0: no limit). The most likely token always stays."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (so the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: Any,
    images: torch.Tensor,
    *,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    length_penalty: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    sot_token_id: int | None = None,
    eot_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Caption ids (B, 1 + L): the start token, then up to ``max_new_tokens`` tokens, the end token included.

    Args:
        num_beams: > 1 for beam search (scores are summed log-probabilities divided by length ** length_penalty);
            1 for greedy decoding or sampling.
        do_sample: draw each token from the softmax of logits / ``temperature``, restricted by ``top_k`` /
            ``top_p`` (``filter_logits``); ``generator`` makes the draws reproducible.
        min_new_tokens: the end token is forbidden before this many tokens.
        use_cache: keep each block's keys and values between steps (the image tokens' once); False
            recomputes the whole caption at every step, as OpenCLIP's ``generate`` does.
    """
    sot, eot, pad = _special(model, sot_token_id, eot_token_id, pad_token_id)
    limit = model.cfg.max_text_length - 1  # the start token takes one position
    if not 1 <= max_new_tokens <= limit:
        raise ValueError(f"max_new_tokens must be in 1..{limit} for this model, got {max_new_tokens}")
    if num_beams < 1 or temperature <= 0:
        raise ValueError(f"num_beams must be >= 1 and temperature > 0, got {num_beams} and {temperature}")
    if num_beams > 1 and do_sample:
        raise ValueError("choose beam search (num_beams > 1) or sampling (do_sample), not both")
    was_training = model.training
    model.eval()
    try:
        state = model.start_decoding(images, use_cache)
        if num_beams > 1:
            return _beam_search(model, state, len(images), num_beams, max_new_tokens, min_new_tokens,
                                length_penalty, sot, eot, pad)  # fmt: skip
        ids = torch.full((len(images), 1), sot, dtype=torch.long, device=images.device)
        ended = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        for step in range(max_new_tokens):
            logits = model.next_token_logits(ids, state).float()  # (B, vocab)
            if step < min_new_tokens:
                logits[:, eot] = float("-inf")
            if do_sample:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(-1)
            token = token.masked_fill(ended, pad)
            ids = torch.cat([ids, token[:, None]], 1)
            ended |= token == eot
            if bool(ended.all()):
                break
        return ids
    finally:
        model.train(was_training)


def _beam_search(
    model: Any, state: Any, B: int, K: int, max_new: int, min_new: int, length_penalty: float, sot: int, eot: int,
    pad: int,
) -> torch.Tensor:  # fmt: skip
    """Beam search over B images with K beams each, rows b*K .. b*K + K - 1 belonging to image b.

    Each step ranks the 2K best continuations of an image's beams: an end token among the first K
    finishes a hypothesis, the best K others go on. An image is done once it holds K finished
    hypotheses and no running beam can beat the worst of them (transformers' rule without early stopping).
    """
    device = state.image_tokens.device
    state.image_tokens = state.image_tokens.repeat_interleave(K, 0)  # (B*K, S, D); caches start empty
    ids = torch.full((B * K, 1), sot, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: let the first step expand beam 0 only
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new):
        logp = F.log_softmax(model.next_token_logits(ids, state).float(), -1)  # (B*K, V)
        if step < min_new:
            logp[:, eot] = float("-inf")
        V = logp.shape[-1]
        top, flat = (scores.reshape(-1, 1) + logp).view(B, K * V).topk(2 * K, dim=1)  # (B, 2K)
        rows, tokens, new_scores = [], [], []
        norm = (step + 1) ** length_penalty
        for b in range(B):
            kept: list[tuple[int, int, float]] = []
            for rank, (s, f) in enumerate(zip(top[b].tolist(), flat[b].tolist())):
                row, token = b * K + f // V, f % V
                if done[b] or s == float("-inf"):
                    break
                if token == eot:
                    if rank < K:
                        finished[b].append((s / norm, torch.cat([ids[row], ids.new_tensor([eot])])))
                else:
                    kept.append((row, token, s))
                if len(kept) == K:
                    break
            if not done[b]:
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                best_running = kept[0][2] / norm if kept else float("-inf")
                done[b] = len(finished[b]) == K and best_running <= finished[b][-1][0]
            kept = kept if kept and not done[b] else []
            kept += [(b * K, pad, float("-inf"))] * (K - len(kept))  # a done image's rows idle on padding
            for row, token, s in kept:
                rows.append(row)
                tokens.append(token)
                new_scores.append(s)
        if all(done):
            break
        index = torch.tensor(rows, device=device)
        model.reorder_state(state, index)
        ids = torch.cat([ids[index], torch.tensor(tokens, device=device)[:, None]], 1)
        scores = torch.tensor(new_scores, device=device).view(B, K)
    best = []
    for b in range(B):
        hyps = finished[b]
        if not done[b]:  # out of steps: the running beams compete too
            norm = (ids.shape[1] - 1) ** length_penalty
            hyps = hyps + [(float(scores[b, k]) / norm, ids[b * K + k]) for k in range(K)]
        best.append(max(hyps, key=lambda h: h[0])[1])
    out = torch.full((B, max(len(h) for h in best)), pad, dtype=torch.long, device=device)
    for b, h in enumerate(best):
        out[b, : len(h)] = h
    return out
