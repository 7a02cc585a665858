import math

import pytest
import torch
import torch.nn.functional as F

from mmlm.config import TransformerConfig
from mmlm.layers import Attention, Block, build_attn_mask


def reference_attention(attn: Attention, x, keep=None):
    """Hand-written softmax attention; ``keep`` is a boolean (B, T, T) mask, True = attend."""
    B, T, C = x.shape
    h = attn.heads
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(B, T, h, C // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // h)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None], float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_softmax_reference_with_padding(causal):
    attn = Attention(32, 4).eval()
    x = torch.randn(3, 7, 32)
    pad = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    keep = pad.bool()[:, None, :].expand(3, 7, 7)
    if causal:
        keep = keep & torch.ones(7, 7, dtype=torch.bool).tril()
    mask, is_causal = build_attn_mask(pad, causal, 7)
    out = attn(x, mask, is_causal)
    ref = reference_attention(attn, x, keep)
    real = pad.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=1e-5)


def test_unpadded_batch_uses_fused_causal_flag():
    mask, is_causal = build_attn_mask(torch.ones(2, 5, dtype=torch.long), True, 5)
    assert mask is None and is_causal


def test_post_norm_block_matches_bert_layer_formula():
    cfg = TransformerConfig(width=32, heads=4, pre_norm=False, norm_eps=1e-12)
    blk = Block(cfg, ("text",)).eval()
    x = torch.randn(2, 5, 32)
    h = F.layer_norm(x + reference_attention(blk.attn, x), (32,), blk.norm1.weight, blk.norm1.bias, 1e-12)
    expected = F.layer_norm(h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(h))), (32,), blk.norm2.weight, blk.norm2.bias, 1e-12)
    torch.testing.assert_close(blk(x), expected, atol=1e-5, rtol=1e-5)


def test_pre_norm_block_with_layer_scale_and_quick_gelu():
    cfg = TransformerConfig(width=32, heads=4, act="quick_gelu", layer_scale=0.1)
    blk = Block(cfg).eval()
    x = torch.randn(2, 5, 32)
    h = x + 0.1 * reference_attention(blk.attn, F.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias, 1e-5))
    z = blk.mlp.fc1(F.layer_norm(h, (32,), blk.norm2.weight, blk.norm2.bias, 1e-5))
    expected = h + 0.1 * blk.mlp.fc2(z * torch.sigmoid(1.702 * z))
    torch.testing.assert_close(blk(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "share, own",
    [
        ("none", {"norm1", "attn", "norm2", "mlp"}),
        ("attention", {"norm2", "mlp"}),
        ("attention_mlp", {"norm1", "norm2"}),
        ("all", set()),
    ],
)
def test_block_keeps_unshared_parts_per_modality(share, own):
    blk = Block(TransformerConfig(width=16, heads=2), ("image", "text"), share)
    per_modality = {k.split(".")[0] for k in blk.state_dict() if ".image." in k}
    assert per_modality == own
    # and the per-modality copies are distinct tensors with the same shapes
    for name in own:
        a, b = getattr(blk, name)["image"], getattr(blk, name)["text"]
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(a.parameters(), b.parameters()))
