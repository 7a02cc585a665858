import pytest
import torch
import torch.nn.functional as F
from open_clip_train.train import get_clip_metrics

from mmlm.retrieval import retrieval_metrics


def noisy_pairs(n: int, d: int = 16, noise: float = 0.8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, F.normalize(img + noise * torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize("n, chunk", [(300, 64), (257, 1000)])
def test_one_to_one_metrics_equal_openclip(n, chunk):
    img, txt = noisy_pairs(n)
    ref = get_clip_metrics(img, txt, torch.tensor(1.0))
    ours = retrieval_metrics(img, txt, chunk_size=chunk)
    for k in (1, 5, 10):
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(ref[f"image_to_text_R@{k}"], abs=1e-12)
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(ref[f"text_to_image_R@{k}"], abs=1e-12)
    for ref_dir, our_dir in (("image_to_text", "text_retrieval"), ("text_to_image", "image_retrieval")):
        assert ours[f"{our_dir}_mean_rank"] == pytest.approx(ref[f"{ref_dir}_mean_rank"], abs=1e-9)
        assert ours[f"{our_dir}_median_rank"] == ref[f"{ref_dir}_median_rank"]
