"""The one Block with cross-attention and a KV cache: decoding piece by piece equals one causal pass, and a
cross-attention block's cached image keys and values are its own."""

from __future__ import annotations

import torch

from mmlm.config import TransformerConfig
from mmlm.layers import AttentionalPooler, Transformer


def test_cached_decoding_in_pieces_equals_one_causal_pass():
    torch.manual_seed(0)
    cfg = TransformerConfig(width=32, depth=2, heads=4)
    decoder = Transformer(cfg, ("text",), cross_attention=True, context_dim=24).eval()
    assert [b.cross_attention for b in decoder] == [False, True, False, True]
    x, image = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    with torch.no_grad():
        full = decoder(x, "text", None, True, context=image)
        cache = [{} for _ in decoder]
        pieces = [
            decoder(x[:, a:b], "text", None, True, context=image, cache=cache) for a, b in ((0, 3), (3, 4), (4, 7))
        ]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    assert cache[0]["k"].shape == (2, 4, 7, 8) and cache[1]["k"].shape == (2, 4, 5, 8)  # text grows, image stays


def test_pooler_is_multihead_attention_over_normalised_tokens():
    torch.manual_seed(0)
    pool = AttentionalPooler(width=16, context_dim=24, heads=2, n_queries=3)
    ref = torch.nn.MultiheadAttention(16, 2, kdim=24, vdim=24, batch_first=True)
    with torch.no_grad():
        ref.q_proj_weight.copy_(pool.attn.q.weight)
        k, v = pool.attn.kv.weight.chunk(2)
        ref.k_proj_weight.copy_(k)
        ref.v_proj_weight.copy_(v)
        ref.in_proj_bias.copy_(torch.cat([pool.attn.q.bias, pool.attn.kv.bias]))
        ref.out_proj.load_state_dict(pool.attn.proj.state_dict())
        x = torch.randn(2, 9, 24)
        q = pool.norm_q(pool.query).expand(2, -1, -1)
        expected = ref(q, pool.norm_kv(x), pool.norm_kv(x), need_weights=False)[0]
        torch.testing.assert_close(pool(x), expected, atol=1e-5, rtol=0)
