"""Where a CLIP looks: one (H, W) map in [0, 1] per text, at the image's resolution.

==============  =========================================================================================
method          what the map is
==============  =========================================================================================
``similarity``  cosine of each projected patch token with the text (MaskCLIP, Zhou et al. 2022): the last
                block's attention is replaced by its value path, so each patch token keeps its own content
                instead of the mix the class token needs
``rollout``     attention rollout (Abnar & Zuidema 2020) of the class token; the same for every text
``gradcam``     Grad-CAM (Selvaraju et al. 2017) of the image-text cosine on the normalised patch tokens
                the last block attends to (captum's ``LayerGradCam``)
``occlusion``   how much the image-text cosine drops when a window of 2 x 2 patches is painted in the
                image's mean colour, slid by one patch (Zeiler & Fergus 2014; captum's ``Occlusion``)
==============  =========================================================================================

``occlusion`` is the default: it is the method that finds the right digit in the pointing game
(``scripts/pointing_game.py``: 85% against 53% for random weights; the others stay below 60%).
Maps are computed on the model's patch grid, upsampled bilinearly and scaled to [0, 1]; a map with no
contrast (every patch the same) is all zeros rather than noise stretched to fill the range.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from mmlm.explain.attention import record_attention, rollout, tower_attentions
from mmlm.models.clip import CLIP
from mmlm.models.vision import VisionTransformer

if TYPE_CHECKING:
    from mmlm.data.tokenizers import Tokenizer

Method = Literal["similarity", "rollout", "gradcam", "occlusion"]
METHODS: tuple[str, ...] = ("similarity", "rollout", "gradcam", "occlusion")
FLAT = 1e-5  # a map whose range is below this fraction of its largest magnitude has no contrast: float noise


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) for the ``with`` body, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def image_tensor(vit: VisionTransformer, image: Image.Image | torch.Tensor) -> torch.Tensor:
    """(1, 3, h, w) normalised pixels: a tensor as given (already normalised), a PIL image resized so that
    its short side is the model's ``image_size`` and each side a multiple of the patch size, aspect kept
    (no centre crop: the map covers the whole picture)."""
    if isinstance(image, torch.Tensor):
        return image[None] if image.dim() == 3 else image
    cfg = vit.cfg
    p, scale = cfg.patch_size, cfg.image_size / min(image.size)
    width, height = (max(p, round(side * scale / p) * p) for side in image.size)
    transform = v2.Compose([
        v2.RGB(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Resize((height, width), interpolation=getattr(v2.InterpolationMode, cfg.interpolation.upper()), antialias=True),
        v2.Normalize(mean=list(cfg.image_mean), std=list(cfg.image_std)),
    ])  # fmt: skip
    return transform(image)[None]


def text_embeddings(model: CLIP, texts: Sequence[str], tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """(N, embed_dim) L2-normalised text embeddings; ``tokenizer`` defaults to the model's (CLIP BPE)."""
    if tokenizer is None:
        from mmlm.factory import tokenizer_for

        tokenizer, _ = tokenizer_for(model, model)
        if tokenizer is None:
            raise ValueError("the text tower does not use the CLIP BPE: give its tokenizer")
    batch = tokenizer(list(texts))
    device = model.logit_scale.device
    with torch.no_grad():
        return model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))


def _patch_grid(vit: VisionTransformer, pixels: torch.Tensor) -> tuple[int, int]:
    vit.check_images(pixels)
    return pixels.shape[-2] // vit.cfg.patch_size, pixels.shape[-1] // vit.cfg.patch_size


def _patch_tokens(vit: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, width) -> the patch tokens as the pooled token is normalised: ``forward_features`` already
    normalised every token for class-token pooling, a gap model normalises (its mean) in ``pool``."""
    patches = tokens[:, vit.num_prefix_tokens :]
    return patches if vit.cfg.pool == "cls" else vit.norm(patches)


def _cosine(model: CLIP, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B,) cosine of each image with the (1, embed_dim) unit text embedding: what captum attributes."""
    return (model.encode_image(images) * text).sum(-1)


def similarity_maps(model: CLIP, pixels: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N, gh, gw) cosine of each projected patch token with each text, last attention on its value path."""
    vit = model.visual
    gh, gw = _patch_grid(vit, pixels)

    def value_path(attn: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        B, T, C = x.shape
        v = attn.qkv(x).view(B, T, 3, C)[:, :, 2]  # (B, T, C): heads concatenated, as SDPA's output is
        return attn.proj_drop(attn.proj(v))

    handle = tower_attentions(vit.blocks, vit.modality)[-1].register_forward_hook(value_path)
    try:
        with torch.no_grad():
            patches = _patch_tokens(vit, vit.forward_features(pixels[:1]))
            embeds = F.normalize(model.visual_projection(patches[0]), dim=-1)  # (N_patches, embed_dim)
    finally:
        handle.remove()
    return (text_embeds @ embeds.T).view(-1, gh, gw)


def rollout_maps(vit: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """(1, gh, gw): how much each patch reaches the pooled token through the attention of every block
    (the class token's row; the mean row for a model pooled by averaging)."""
    gh, gw = _patch_grid(vit, pixels)
    with torch.no_grad(), record_attention(vit.blocks, vit.modality) as maps:
        vit.forward_features(pixels[:1])
    flow = rollout(maps)[0]  # (T, T)
    n = vit.num_prefix_tokens
    pooled = flow[0] if vit.cfg.pool == "cls" else flow[n:].mean(0)
    return pooled[n:].view(1, gh, gw)


def gradcam_maps(model: CLIP, pixels: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N, gh, gw) Grad-CAM of each text's cosine on the patch tokens the last attention reads.

    The layer is the last block's ``norm1`` output, as pytorch-grad-cam takes for ViTs: the block's input
    would not do, since everything after a LayerNorm is blind to a token's scale, so its gradient is
    orthogonal to the token and gradient x activation sums to nothing. captum's ``LayerGradCam`` averages
    gradients over a layer's dims 2..; a ViT layer gives (B, T, C), so a hook routes the patch tokens
    through an ``nn.Identity`` as a (B, C, gh, gw) grid: the layer captum reads, values passing unchanged.
    """
    from captum.attr import LayerGradCam

    vit = model.visual
    gh, gw = _patch_grid(vit, pixels)
    n, grid = vit.num_prefix_tokens, nn.Identity()

    def through_grid(norm: nn.Module, args: tuple, x: torch.Tensor) -> torch.Tensor:
        B, _, C = x.shape
        patches = grid(x[:, n:].transpose(1, 2).reshape(B, C, gh, gw))  # (B, C, gh, gw)
        return torch.cat([x[:, :n], patches.flatten(2).transpose(1, 2)], dim=1)

    norm1 = vit.blocks[-1].norm1
    norm1 = norm1[vit.modality] if isinstance(norm1, nn.ModuleDict) else norm1
    cam = LayerGradCam(partial(_cosine, model), grid)
    handle = norm1.register_forward_hook(through_grid)
    try:
        with torch.enable_grad():
            maps = [cam.attribute(pixels[:1], additional_forward_args=(t[None],), relu_attributions=True)
                    for t in text_embeds]  # fmt: skip
    finally:
        handle.remove()
    return torch.cat(maps)[:, 0].detach()


def occlusion_maps(model: CLIP, pixels: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N, gh, gw) drop of each text's cosine when 2 x 2 patches around a patch are occluded, averaged
    over the windows covering it (captum's ``Occlusion``, all windows of one text in one batch).

    The window is painted in the image's own mean colour: the normalised zero (the training set's mean)
    would paint a grey blob that is itself a feature on a white page; the pointing game measures it.
    """
    from captum.attr import Occlusion

    vit = model.visual
    gh, gw = _patch_grid(vit, pixels)
    p = vit.cfg.patch_size
    window = (pixels.shape[1], min(2 * p, pixels.shape[2]), min(2 * p, pixels.shape[3]))
    windows = (gh - window[1] // p + 1) * (gw - window[2] // p + 1)

    occlusion = Occlusion(partial(_cosine, model))
    mean_colour = pixels[:1].mean((2, 3), keepdim=True).expand_as(pixels[:1])
    with torch.no_grad():
        maps = [occlusion.attribute(pixels[:1], window, strides=(window[0], p, p), baselines=mean_colour,
                                    additional_forward_args=(t[None],), perturbations_per_eval=windows)
                for t in text_embeds]  # fmt: skip
    return F.avg_pool2d(torch.cat(maps).mean(1, keepdim=True), p)[:, 0]  # channels alike; pixels -> patches


def to_image(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, gh, gw) grid maps -> (N, H, W) in [0, 1]: bilinear upsampling, then min-max per map
    (after upsampling, so that each map reaches both 0 and 1); a map without contrast -> zeros."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    low = up.amin((1, 2), keepdim=True)
    span = up.amax((1, 2), keepdim=True) - low
    flat = span <= FLAT * up.abs().amax((1, 2), keepdim=True)
    return torch.where(flat, torch.zeros_like(up), (up - low) / span.clamp(min=torch.finfo(up.dtype).tiny))


def heatmaps(
    model: CLIP,
    image: Image.Image | torch.Tensor,
    texts: Sequence[str],
    method: Method = "occlusion",
    tokenizer: Tokenizer | None = None,
) -> torch.Tensor:
    """(N, H, W) maps in [0, 1], one per text, at the resolution of ``image`` (a PIL image, or
    (3, H, W) / (1, 3, H, W) normalised pixels whose sides are multiples of the patch size)."""
    if not isinstance(model, CLIP):
        raise TypeError(f"heatmaps explain an image-text (CLIP) model, not a {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown heatmap method {method!r}; use one of {', '.join(METHODS)}")
    if not texts:
        raise ValueError("give at least one text to explain the image against")
    device = model.logit_scale.device
    with evaluating(model):
        pixels = image_tensor(model.visual, image).to(device)
        size = (image.height, image.width) if isinstance(image, Image.Image) else tuple(pixels.shape[-2:])
        text_embeds = text_embeddings(model, texts, tokenizer)
        if method == "similarity":
            maps = similarity_maps(model, pixels, text_embeds)
        elif method == "rollout":
            maps = rollout_maps(model.visual, pixels).expand(len(texts), -1, -1)
        elif method == "gradcam":
            maps = gradcam_maps(model, pixels, text_embeds)
        else:
            maps = occlusion_maps(model, pixels, text_embeds)
    return to_image(maps, size).cpu()


def heatmap(
    model: CLIP,
    image: Image.Image | torch.Tensor,
    text: str,
    method: Method = "occlusion",
    tokenizer: Tokenizer | None = None,
) -> torch.Tensor:
    """(H, W) map in [0, 1] of where ``model`` finds ``text`` in ``image`` (see ``heatmaps``)."""
    return heatmaps(model, image, [text], method, tokenizer)[0]


def attention_maps(model: CLIP | VisionTransformer, image: Image.Image | torch.Tensor) -> torch.Tensor:
    """(layers, heads, H, W): where the class token (the mean patch query of a model pooled by averaging)
    attends in each block and head, each map scaled to [0, 1] as ``heatmap``'s are."""
    vit = model.visual if isinstance(model, CLIP) else model
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"attention maps need an image tower (a CLIP or a VisionTransformer), not a {type(model).__name__}")
    with evaluating(vit):
        pixels = image_tensor(vit, image).to(vit.pos_embed.device)
        gh, gw = _patch_grid(vit, pixels)
        size = (image.height, image.width) if isinstance(image, Image.Image) else tuple(pixels.shape[-2:])
        with torch.no_grad(), record_attention(vit.blocks, vit.modality) as maps:
            vit.forward_features(pixels[:1])
    probs = torch.stack([m[0] for m in maps])  # (layers, heads, T, T)
    n = vit.num_prefix_tokens
    rows = probs[:, :, 0, n:] if vit.cfg.pool == "cls" else probs[:, :, n:, n:].mean(2)  # (layers, heads, N)
    layers, heads = rows.shape[:2]
    return to_image(rows.reshape(-1, gh, gw), size).view(layers, heads, *size).cpu()
