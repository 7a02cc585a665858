"""mmlm's zero-shot classifier equals open_clip's build_zero_shot_classifier on the same ViT-B-32 weights."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import mmlm
from mmlm.data import get_tokenizer, image_transform
from mmlm.eval.zeroshot import OPENAI_IMAGENET_TEMPLATES, build_classifier, fill

open_clip = pytest.importorskip("open_clip")
skimage_data = pytest.importorskip("skimage.data")

CLASSNAMES = ["astronaut", "tabby cat", "cup of coffee", "rocket", "dog", "horse"]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]  # real photographs shipped with scikit-image


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random-init open_clip ViT-B-32 (GELU, open_clip's default) and the same weights loaded by mmlm."""
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32").eval()
    with torch.no_grad():  # shake LayerNorms and biases off 1 / 0, so a dropped one would show
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("openclip") / "vit_b_32.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    return ref, mmlm.load_pretrained(path, act="gelu")


def test_templates_are_open_clips_80():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as REF

    assert len(OPENAI_IMAGENET_TEMPLATES) == len(REF) == 80
    assert [fill(t, "tabby cat") for t in OPENAI_IMAGENET_TEMPLATES] == [t("tabby cat") for t in REF]
    assert fill("a photo of a {c}.", "dog") == fill("a photo of a {}.", "dog") == "a photo of a dog."


@pytest.mark.slow
def test_classifier_and_predictions_equal_open_clip(models):
    ref, model = models
    templates = OPENAI_IMAGENET_TEMPLATES[::16]  # 5 of the 80 keep the 151M-parameter towers quick on a CPU
    ref_templates = open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES[::16]  # open_clip's own lambdas
    with torch.no_grad():
        expected = open_clip.build_zero_shot_classifier(
            ref, open_clip.get_tokenizer("ViT-B-32"), CLASSNAMES, ref_templates, num_classes_per_batch=10, device="cpu"
        )
    ours = build_classifier(model, get_tokenizer("clip"), CLASSNAMES, templates)
    gap = (ours - expected).abs().max().item()
    print(f"[zero-shot] ViT-B-32 classifier vs open_clip.build_zero_shot_classifier: max|diff| = {gap:.2e}")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

    # each library with its own preprocessing, from the PIL photographs on
    photos = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in PHOTOS]
    ref_preprocess = open_clip.image_transform(ref.visual.image_size, is_train=False)
    ours_preprocess = image_transform(model.cfg.vision, train=False)
    with torch.no_grad():
        ref_features = ref.encode_image(torch.stack([ref_preprocess(p) for p in photos]), normalize=True)
        ref_logits = 100.0 * ref_features @ expected
        logits = 100.0 * model.encode_image(torch.stack([ours_preprocess(p) for p in photos])) @ ours
    gap = (logits - ref_logits).abs().max().item()
    print(f"[zero-shot] ViT-B-32 logits on {len(photos)} photos: max|diff| = {gap:.2e}")
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=0)
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    assert torch.equal(logits.topk(3).indices, ref_logits.topk(3).indices)
