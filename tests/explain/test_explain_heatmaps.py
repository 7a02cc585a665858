"""Heatmaps of a tiny random CLIP: each method checked against its definition computed another way
(torch's SDPA, plain autograd, a loop over occlusion windows, the block run by hand), plus shape,
range and the flat map of an image without content or position."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmlm.data.tokenizers import get_tokenizer
from mmlm.explain import attention_maps, heatmap, heatmap_png
from mmlm.explain.attention import record_attention, rollout, tower_attentions
from mmlm.explain.heatmaps import METHODS, gradcam_maps, occlusion_maps, similarity_maps, text_embeddings
from mmlm.explain.render import overlay
from mmlm.models import create_model
from mmlm.paths import ASSETS

TEXTS = ["a photo of a cat", "a rocket on its launch pad"]


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("clip", context_length=32)


@pytest.fixture(scope="module")
def clip():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model("clip-tiny").eval()


@pytest.fixture(scope="module")
def no_position_clip():
    """clip-tiny whose patch tokens all get the same position embedding: they carry content only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("clip-tiny").eval()
    with torch.no_grad():
        model.visual.pos_embed[:, 1:] = model.visual.pos_embed[:, 1:2]
    return model


def pixels(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
def test_shape_and_range(clip, tokenizer, method):
    heat = heatmap(clip, pixels(32, 48), TEXTS[0], method, tokenizer)  # a 4 x 6 patch grid, not square
    assert heat.shape == (32, 48) and torch.isfinite(heat).all()
    assert heat.min() == 0 and heat.max() == 1  # an image with content has a map with contrast
    photo = Image.fromarray(torch.randint(0, 256, (37, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy())
    heat = heatmap(clip, photo, TEXTS[1], method, tokenizer)
    assert heat.shape == (37, 50)  # PIL images: the map at the picture's own size
    assert heat.min() == 0 and heat.max() == 1


@pytest.mark.parametrize("method", METHODS)
def test_constant_image_without_positions_gives_a_flat_map(no_position_clip, clip, tokenizer, method):
    grey = torch.full((3, 32, 48), 0.3)
    assert (heatmap(no_position_clip, grey, TEXTS[0], method, tokenizer) == 0).all()
    assert (attention_maps(no_position_clip, grey) == 0).all()
    if method != "occlusion":  # painting a grey image grey changes nothing, positions or not
        # the check can fail: the same image through the model *with* positions is not flat
        assert heatmap(clip, grey, TEXTS[0], method, tokenizer).max() == 1


def test_recorded_attention_times_values_is_what_sdpa_returned(clip, tokenizer):
    """Vision blocks (no mask) and text blocks (causal + padding mask) of the same CLIP."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module, args, output):
        seen.append((args[0], output))

    batch = tokenizer(["a cat", "a photo of a rocket on the pad"])  # padded: causal + key-padding mask
    for tower, run in ((clip.visual, lambda: clip.visual.forward_features(pixels(32, 32)[None])),
                       (clip.text, lambda: clip.text.forward_features(batch["input_ids"], batch["attention_mask"]))):  # fmt: skip
        modules = tower_attentions(tower.blocks, tower.modality)
        seen.clear()
        handles = [m.register_forward_hook(keep) for m in modules]
        with torch.no_grad(), record_attention(tower.blocks, tower.modality) as maps:
            run()
        for h in handles:
            h.remove()
        assert len(maps) == len(modules) == len(seen)
        for attn, probs, (x, output) in zip(modules, maps, seen):
            B, T, C = x.shape
            v = attn.qkv(x).view(B, T, 3, attn.heads, C // attn.heads)[:, :, 2].transpose(1, 2)  # (B, heads, T, hd)
            mixed = (probs @ v).transpose(1, 2).reshape(B, T, C)
            torch.testing.assert_close(attn.proj(mixed), output, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(probs.sum(-1), torch.ones(B, attn.heads, T))


def test_rollout_of_known_attention():
    T = 4
    identity = torch.eye(T).expand(1, 2, T, T)
    torch.testing.assert_close(rollout([identity, identity]), torch.eye(T)[None])
    uniform = torch.full((1, 2, T, T), 1 / T)
    # one layer: (A + I) / 2 -> 1/8 off the diagonal, 1/8 + 1/2 on it; two layers: its square
    one = torch.full((T, T), 1 / 8) + torch.eye(T) / 2
    torch.testing.assert_close(rollout([uniform])[0], one)
    torch.testing.assert_close(rollout([uniform, uniform])[0], one @ one)


def _last_block_input(clip, image: torch.Tensor) -> torch.Tensor:
    """The tokens entering the image tower's last block."""
    held = {}
    handle = clip.visual.blocks[-1].register_forward_pre_hook(lambda block, args: held.update(x=args[0]))
    try:
        with torch.no_grad():
            clip.encode_image(image)
    finally:
        handle.remove()
    return held["x"]


def test_gradcam_is_grad_cam_of_the_cosine(clip, tokenizer):
    """Selvaraju et al.'s formula on the last block's normalised tokens (its norm1 output), by plain autograd."""
    image = pixels(32, 48, seed=2)[None]
    texts = text_embeddings(clip, TEXTS, tokenizer)
    held = {}

    def leaf(norm, args, out):
        held["a"] = out.detach().requires_grad_()
        return held["a"]

    expected = []
    for text in texts:
        handle = clip.visual.blocks[-1].norm1.register_forward_hook(leaf)
        try:
            score = (clip.encode_image(image) * text).sum()
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(score, held["a"])
        weights = grad[0, 1:].mean(0)  # (C,): gradient averaged over the patches
        expected.append(F.relu(held["a"][0, 1:].detach() @ weights).view(4, 6))
    torch.testing.assert_close(gradcam_maps(clip, image, texts), torch.stack(expected), atol=1e-6, rtol=1e-5)


def test_similarity_is_the_value_path_of_the_last_block(clip, tokenizer):
    """MaskCLIP: the last block with attention replaced by its value projection, run here by hand."""
    image = pixels(32, 48, seed=3)[None]
    texts = text_embeddings(clip, TEXTS, tokenizer)
    x = _last_block_input(clip, image)
    block = clip.visual.blocks[-1]
    C = x.shape[-1]
    v = block.attn.qkv(block.norm1(x))[..., 2 * C :]  # the value third of the fused projection
    h = x + block.ls1(block.attn.proj(v))
    h = h + block.ls2(block.mlp(block.norm2(h)))
    patches = F.normalize(clip.visual_projection(clip.visual.norm(h)[0, 1:]), dim=-1)
    torch.testing.assert_close(similarity_maps(clip, image, texts), (texts @ patches.T).view(2, 4, 6))


def test_occlusion_is_the_mean_drop_over_covering_windows(clip, tokenizer):
    image = pixels(32, 32, seed=4)[None]
    texts = text_embeddings(clip, TEXTS, tokenizer)
    mean_colour = image.mean((2, 3), keepdim=True)
    with torch.no_grad():
        full = clip.encode_image(image) @ texts.T  # (1, 2)
        drop, count = torch.zeros(2, 32, 32), torch.zeros(32, 32)
        for top in range(0, 17, 8):  # 16-pixel windows (2 x 2 patches) every 8 pixels
            for left in range(0, 17, 8):
                occluded = image.clone()
                occluded[..., top : top + 16, left : left + 16] = mean_colour[..., 0, 0][..., None, None]
                drop[:, top : top + 16, left : left + 16] += (full - clip.encode_image(occluded) @ texts.T)[0][:, None, None]
                count[top : top + 16, left : left + 16] += 1
    expected = F.avg_pool2d((drop / count)[:, None], 8)[:, 0]
    torch.testing.assert_close(occlusion_maps(clip, image, texts), expected, atol=1e-5, rtol=1e-4)


def test_attention_maps_shape_and_range(clip):
    maps = attention_maps(clip, pixels(32, 48))
    assert maps.shape == (2, 4, 32, 48)  # clip-tiny: 2 layers x 4 heads
    assert (maps.amin((2, 3)) == 0).all() and (maps.amax((2, 3)) == 1).all()


def test_heatmap_png_for_a_server(clip, tokenizer):
    """What a server calls with the bytes it holds: the photo at its own size, the map blended over it."""
    photo = ASSETS / "images" / "coffee.jpg"
    data = heatmap_png(clip, tokenizer, photo.read_bytes(), "a cup of coffee", "occlusion")
    picture, original = Image.open(io.BytesIO(data)), Image.open(photo)
    assert picture.format == "PNG" and picture.size == original.size
    expected = overlay(original.convert("RGB"), heatmap(clip, original.convert("RGB"), "a cup of coffee", "occlusion", tokenizer))
    assert (np.asarray(picture.convert("RGB")) == np.asarray(expected)).all()


def test_errors(clip, tokenizer):
    with pytest.raises(ValueError, match="unknown heatmap method 'nope'"):
        heatmap(clip, pixels(32, 32), "a cat", "nope", tokenizer)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CLIP"):
        heatmap(create_model("vit-tiny"), pixels(32, 32), "a cat", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        heatmap(clip, pixels(30, 32), "a cat", tokenizer=tokenizer)
