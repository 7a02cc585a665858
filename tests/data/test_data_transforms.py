import open_clip
import pytest
import torch
from PIL import Image

from mmlm.config import HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, from_name
from mmlm.data import image_transform


@pytest.fixture(scope="module")
def open_clip_transforms():
    # no pretrained weights; on the meta device the 151M-parameter model costs nothing to build
    with torch.device("meta"):
        _, train, val = open_clip.create_model_and_transforms("ViT-B-32", device="meta")
    return train, val


@pytest.mark.parametrize("name", ["coffee.jpg", "rocket_closeup.jpg", "camera.jpg"])  # wide, tall, greyscale
def test_clip_eval_transform_equals_open_clip(assets, open_clip_transforms, name):
    image = Image.open(assets / "images" / name)
    ours = image_transform(from_name("clip-vit-b-32"), train=False)(image)
    ref = open_clip_transforms[1](image)
    assert ours.shape == ref.shape == (3, 224, 224)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_clip_train_transform_equals_open_clip_without_flip(assets, open_clip_transforms):
    image = Image.open(assets / "images" / "chelsea.jpg")
    ours_t = image_transform("clip-vit-b-32", train=True, scale=(0.9, 1.0), hflip=0.0)
    torch.manual_seed(3)
    ours = ours_t(image)
    torch.manual_seed(3)
    ref = open_clip_transforms[0](image)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_train_transform_flips_and_crops(assets):
    image = Image.open(assets / "images" / "coffee.jpg")
    t = image_transform("clip-tiny", train=True, hflip=1.0, scale=(1.0, 1.0))
    out = t(image)
    assert out.shape == (3, 32, 32)
    torch.manual_seed(0)
    no_flip = image_transform("clip-tiny", train=True, hflip=0.0, scale=(1.0, 1.0))
    torch.manual_seed(0)
    flipped = t(image)
    torch.manual_seed(0)
    torch.testing.assert_close(flipped, no_flip(image).flip(-1))


@pytest.mark.parametrize(
    "preset, mean, std",
    [("clip-vit-b-32", OPENAI_MEAN, None), ("vit-b-16", HALF, HALF), ("clip-tiny", OPENAI_MEAN, None)],
)
def test_normalisation_comes_from_the_preset(preset, mean, std):
    # a mid-grey image comes out as (0.5 - mean) / std per channel
    cfg = from_name(preset)
    vision = cfg.vision if hasattr(cfg, "vision") else cfg
    out = image_transform(cfg, train=False)(Image.new("RGB", (50, 40), (128, 128, 128)))
    std = std or vision.image_std
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(mean, std)])
    assert out.shape == (3, vision.image_size, vision.image_size)
    torch.testing.assert_close(out[:, 5, 5], expected, rtol=0, atol=1e-5)


def test_imagenet_constants_for_a_custom_vision_config():
    from mmlm.config import VisionConfig

    cfg = VisionConfig(image_size=64, interpolation="bilinear")
    out = image_transform(cfg, train=False)(Image.new("RGB", (64, 64), (255, 0, 0)))
    expected = torch.tensor([(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1]])
    torch.testing.assert_close(out[:2, 0, 0], expected, rtol=0, atol=1e-5)
