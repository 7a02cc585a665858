import pytest
import timm
import torch
from _text import random_text

import mmlm
from mmlm.config import from_name
from mmlm.convert import timm_vit
from mmlm.layers import Transformer

EOT = from_name("clip-tiny").text.eot_token_id


def test_clip_text_embedding_is_independent_of_padding_length():
    model = mmlm.create_model("clip-tiny").eval()
    eot = model.cfg.text.eot_token_id
    ids12, mask12 = random_text(3, [5, 12, 8], 12, 1000, eot)
    ids32 = torch.cat([ids12, torch.zeros(3, 20, dtype=torch.long)], 1)  # tiny context is 32
    mask32 = torch.cat([mask12, torch.zeros(3, 20, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model.encode_text(ids12, mask12)
        b = model.encode_text(ids32, mask32)
        c = model.encode_text(ids32)  # OpenAI style: zero padding, no mask, pooled at eot
    assert (a - b).abs().max() <= 1e-6 and (a - c).abs().max() <= 1e-6


@pytest.mark.parametrize("preset", ["clip-vit-b-32", "bert-tiny"])
def test_token_states_do_not_depend_on_padding_12_vs_77(preset):
    """The un-trimmed path: masked attention over 12 or 77 columns gives the same states."""
    cfg = from_name(preset)
    cfg = cfg.text if hasattr(cfg, "text") else cfg
    cfg = mmlm.config.update(cfg, width=64, depth=2, heads=4, context_length=77, dropout=0.0, attn_dropout=0.0)
    enc = mmlm.TextEncoder(cfg).eval()
    ids, mask = random_text(3, [5, 12, 9], 77, 1000, eot=cfg.eot_token_id)
    with torch.no_grad():
        full = enc.forward_features(ids, mask)
        short = enc.forward_features(ids[:, :12], mask[:, :12])
        pooled77, pooled12 = enc(ids, mask), enc(ids[:, :12], mask[:, :12])
    real = mask[:, :12].bool()
    # float32 softmax over 12 or 77 columns rounds differently (a few ulps of unit-sized states);
    # attending to padding moves them by order 1
    assert (full[:, :12][real] - short[real]).abs().max() <= 1e-5
    assert (pooled77 - pooled12).abs().max() <= 1e-5


def test_causal_state_at_t_ignores_later_tokens():
    enc = mmlm.create_model("gpt2-tiny", dropout=0.0, attn_dropout=0.0).eval()
    ids = torch.randint(0, 1000, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        a, b = enc.forward_features(ids), enc.forward_features(changed)
    assert (a[:, :9] - b[:, :9]).abs().max() <= 1e-6
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # and later positions do see the change


def test_last_token_pooling_is_the_same_for_left_and_right_padding():
    """GPT-2 pools its last real token; left padding must not move it or shift the positions."""
    enc = mmlm.create_model("gpt2-tiny", dropout=0.0, attn_dropout=0.0).eval()
    with torch.no_grad():
        enc.pos_embed.normal_()  # positions as large as the tokens: a shifted position cannot hide
    texts = [torch.randint(1, 1000, (3,)), torch.randint(1, 1000, (6,))]
    right = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
    left = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
    for i, t in enumerate(texts):
        right[0][i, : len(t)], right[1][i, : len(t)] = t, 1
        left[0][i, 6 - len(t) :], left[1][i, 6 - len(t) :] = t, 1
    with torch.no_grad():
        alone = torch.cat([enc(t[None]) for t in texts])  # no padding, no mask: the reference
        from_right, from_left = enc(*right), enc(*left)
    torch.testing.assert_close(from_right, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_left, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_left, from_right, rtol=0, atol=1e-5)


def test_bidirectional_state_sees_later_tokens():
    enc = mmlm.create_model("bert-tiny", dropout=0.0, attn_dropout=0.0).eval()
    ids = torch.randint(0, 1000, (1, 10))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 1000
    with torch.no_grad():
        assert (enc.forward_features(ids)[:, 0] - enc.forward_features(changed)[:, 0]).abs().max() > 1e-4


def shared_size(cfg, share: str) -> int:
    """Parameters one tower's copy of the shared parts would have had, from the shapes alone."""
    w, m = cfg.vision.width, cfg.vision.mlp_dim
    norm = 2 * w
    attn = (w * 3 * w + 3 * w) + (w * w + w)
    mlp = (w * m + m) + (m * w + w)
    per_layer = {"attention": norm + attn, "attention_mlp": attn + mlp, "all": 2 * norm + attn + mlp}[share]
    start, stop = cfg.shared_range
    return per_layer * (stop - start)


@pytest.mark.parametrize("share", ["none", "attention", "attention_mlp", "all"])
@pytest.mark.parametrize("layers", [None, (1, 2)])
def test_every_share_mode_saves_and_reloads_identically(tmp_path, share, layers):
    model = mmlm.create_model("clip-shared-tiny", share=share, share_layers=layers if share != "none" else None).eval()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = random_text(2, [6, 9], 9, 1000, eot=EOT)
    mmlm.save(model, tmp_path / "ckpt")
    loaded = mmlm.load(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(model(images, ids, mask).logits_per_image, loaded(images, ids, mask).logits_per_image)
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))


@pytest.mark.parametrize("share", ["attention", "attention_mlp", "all"])
@pytest.mark.parametrize("layers", [None, (0, 1)])
def test_parameter_saving_equals_size_of_shared_parts(share, layers):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    separate = count(mmlm.create_model("clip-shared-tiny", share="none"))
    shared = mmlm.create_model("clip-shared-tiny", share=share, share_layers=layers)
    assert separate - count(shared) == shared_size(shared.cfg, share)
    assert count(shared) == sum(t.numel() for t in shared.state_dict().values())  # nothing stored twice


@pytest.mark.parametrize("share", ["attention", "attention_mlp", "all"])
def test_shared_parameters_get_gradients_from_both_modalities(share):
    model = mmlm.create_model("clip-shared-tiny", share=share)
    qkv = model.blocks[0].attn.qkv.weight
    model.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    g_image = qkv.grad.clone()
    model.zero_grad()
    ids, mask = random_text(2, [4, 6], 6, 1000, eot=EOT)
    model.encode_text(ids, mask).sum().backward()
    assert g_image.abs().sum() > 0 and qkv.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["clip-tiny", "clip-shared-tiny"])
def test_gradient_checkpointing_gives_the_same_gradients(preset, monkeypatch):
    model = mmlm.create_model(preset).train()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = random_text(2, [4, 6], 6, 1000, eot=EOT)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout draws in both runs; checkpoint replays them in its recompute
        model(images, ids, mask).logits_per_image.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.set_grad_checkpointing()
    transformers = [m for m in model.modules() if isinstance(m, Transformer)]
    assert len(transformers) == (1 if model.cfg.share != "none" else 2)
    assert all(t.grad_checkpointing for t in transformers)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    checkpointed = gradients()
    assert len(calls) == model.cfg.vision.depth + model.cfg.text.depth  # every block of both towers recomputed
    torch.testing.assert_close(checkpointed, plain)
    model.set_grad_checkpointing(False)
    assert not any(t.grad_checkpointing for t in transformers)


def test_vit_resamples_positions_for_other_resolutions():
    """A 32 px model run at 48 px resamples its position grid as timm's ``dynamic_img_size`` does."""
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
        num_classes=10, dynamic_img_size=True,
    ).eval()  # fmt: skip
    with torch.no_grad():
        ref.pos_embed.normal_()  # positions as large as the patch features: a resampling error cannot hide
    cfg = timm_vit.config_from_timm(ref)
    vit = mmlm.VisionTransformer(cfg).eval()
    vit.load_state_dict(timm_vit.timm_vit_to_mmlm(ref.state_dict(), cfg))
    images = torch.randn(2, 3, 48, 48)  # a 6 x 6 grid for a model trained on 4 x 4
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), ref.forward_features(images))
        torch.testing.assert_close(vit(images), ref(images))


def test_patch_dropout_drops_tokens_only_in_training():
    vit = mmlm.create_model("vit-tiny", patch_dropout=0.5)
    images = torch.randn(2, 3, 32, 32)  # 4x4 = 16 patches
    assert vit.train().forward_features(images).shape[1] == 1 + 8
    assert vit.eval().forward_features(images).shape[1] == 1 + 16


def test_logit_scale_is_capped_at_100():
    model = mmlm.create_model("clip-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


@pytest.mark.parametrize("preset", ["clip-tiny", "clip-shared-tiny", "vit-tiny", "bert-tiny", "minilm-tiny", "gpt2-tiny"])
def test_every_family_runs_forward_and_backward(preset):
    model = mmlm.create_model(preset).train()
    if isinstance(model, mmlm.CLIP):
        ids, mask = random_text(4, [5, 7, 3, 8], 8, 1000, eot=EOT)
        out = model(torch.randn(4, 3, 32, 32), ids, mask).logits_per_image
        assert out.shape == (4, 4)
    elif isinstance(model, mmlm.VisionTransformer):
        out = model(torch.randn(4, 3, 32, 32))
        assert out.shape == (4, model.cfg.num_classes)
    else:
        ids, mask = random_text(4, [5, 7, 3, 8], 8, 1000, eot=model.cfg.eot_token_id)
        out = model(ids, mask)
        assert out.shape == (4, model.cfg.width)
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_text_without_a_real_token_is_refused_by_name():
    model = mmlm.create_model("clip-tiny")
    ids = torch.randint(1, 100, (2, 5))
    with pytest.raises(ValueError, match=r"no real token in 2 of 2 texts; each text needs at least one 1"):
        model.encode_text(ids, torch.zeros_like(ids))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"no real token in 1 of 2 texts"):
        model.text.forward_features(ids, mask)


def test_one_dimensional_ids_are_refused_with_the_fix():
    model = mmlm.create_model("clip-tiny")
    ids = torch.randint(1, 100, (5,))
    with pytest.raises(ValueError, match=r"shape \(batch, length\), got shape \(5,\); wrap .* as ids\[None\]"):
        model.encode_text(ids)
    with pytest.raises(TypeError, match=r"integers .* got torch.float32"):
        model.encode_text(ids[None].float())


@pytest.mark.parametrize("preset", ["clip-tiny", "bert-tiny"])
def test_ids_outside_the_vocabulary_are_named(preset):
    model = mmlm.create_model(preset)
    text = model.text if isinstance(model, mmlm.CLIP) else model
    vocab = text.cfg.vocab_size
    ids = torch.randint(1, 100, (2, 6))
    ids[1, 3] = vocab
    named = rf"token id {vocab} is outside the vocabulary \(vocab_size {vocab}: ids 0..{vocab - 1}\)"
    with pytest.raises(ValueError, match=named):
        text(ids, torch.ones_like(ids))
    ids[1, 3] = -1
    with pytest.raises(ValueError, match=r"token id -1 is outside the vocabulary"):
        text.forward_features(ids)


@pytest.mark.parametrize(
    "shape, dtype, error, message",
    [
        ((3, 32, 32), torch.float32, ValueError, r"\(batch, 3, height, width\), got \(3, 32, 32\); .* images\[None\]"),
        ((2, 1, 32, 32), torch.float32, ValueError, r"\(batch, 3, height, width\), got \(2, 1, 32, 32\)$"),
        ((2, 3, 30, 32), torch.float32, ValueError, r"30x32 is not a multiple of the patch size 8.*image_size is 32x32"),
        ((2, 3, 32, 32), torch.uint8, TypeError, r"floating point .* got torch.uint8"),
    ],
)
def test_images_the_model_cannot_take_are_named(shape, dtype, error, message):
    model = mmlm.create_model("clip-tiny")
    with pytest.raises(error, match=message):
        model.encode_image(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("bias", [None, -10.0], ids=["clip", "siglip"])
def test_clip_output_logits_are_scaled_embedding_products_as_in_transformers(tmp_path, bias):
    import transformers

    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, vocab_size=1000, max_position_embeddings=24, bos_token_id=998, eos_token_id=999)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=48, patch_size=8)  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    torch.manual_seed(0)
    ref = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # off the init values (unit norms, zero biases), so a dropped weight cannot hide
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    model = mmlm.load_pretrained(tmp_path)
    if bias is not None:  # SigLIP-style: HF's CLIPModel has no bias, so it is checked against the formula only
        model.logit_bias = torch.nn.Parameter(torch.tensor(bias))
    ids, mask = random_text(3, [5, 9, 7], 9, 998, eot=999)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = model(images, ids, mask)
        hf = ref(input_ids=ids, attention_mask=mask, pixel_values=images)
        image_only, text_only = model(images=images), model(input_ids=ids, attention_mask=mask)
    scale = ref.logit_scale.exp()  # HF's own temperature, not ours
    expected = scale * out.image_embeds @ out.text_embeds.T + (0.0 if bias is None else bias)
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.T)
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(hf.image_embeds, dim=-1))
    torch.testing.assert_close(out.text_embeds, torch.nn.functional.normalize(hf.text_embeds, dim=-1))
    if bias is None:
        torch.testing.assert_close(out.logits_per_image, hf.logits_per_image)
    assert image_only.text_embeds is None and text_only.image_embeds is None
    torch.testing.assert_close(image_only.image_embeds, out.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(text_only.text_embeds, out.text_embeds, rtol=0, atol=0)
    with pytest.raises(ValueError, match="without input_ids"):
        image_only.logits_per_image
    with pytest.raises(ValueError, match="got neither"):
        model()
