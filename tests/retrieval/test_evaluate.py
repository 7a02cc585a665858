import json

import pytest
import torch
import torch.nn.functional as F
from open_clip_train.train import get_clip_metrics

from mmlm.eval.retrieval import retrieval_metrics


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


def _manifest(tmp_path, present: int, missing: int):
    from PIL import Image

    rows = ["filepath,title"]
    for i in range(present):
        Image.new("RGB", (40, 40), (60 * i, 100, 200)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a square of colour {i}")
    rows += [f"gone{i}.png,a photo that is not there" for i in range(missing)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "m.csv")


def test_result_counts_used_and_skipped_samples(tmp_path):
    """2 of 3 images missing: the perfect recall of the one left is reported with the counts that explain it."""
    from mmlm.cli import eval_retrieval

    out = tmp_path / "r.json"
    result = eval_retrieval("clip-tiny", dataset=_manifest(tmp_path, 1, 2), ks=[1], output=out)
    assert result["samples"] == {"used": 1, "skipped": {"missing_file": 2}}
    assert result["metrics"]["text_retrieval_recall@1"] == 1.0  # one image, one caption
    assert json.loads(out.read_text()) == result
    json.dumps(result, allow_nan=False)


def test_no_usable_sample_is_a_clear_error(tmp_path):
    from mmlm.cli import eval_retrieval

    with pytest.raises(ValueError, match=r"all 2 samples of the epoch were bad.*missing_file.*gone0.png"):
        eval_retrieval("clip-tiny", dataset=_manifest(tmp_path, 0, 2))


@pytest.mark.parametrize(("ks", "chunk_size", "message"), [
    ([0], 1024, r"ks \[0\]: recall@k needs integers k >= 1"),
    ([], 1024, r"ks \[\]"),
    ([1, 5], 0, "chunk_size 0"),
])  # fmt: skip
def test_impossible_ks_and_chunks_are_refused(ks, chunk_size, message):
    img, txt = noisy_pairs(8)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(img, txt, ks=tuple(ks), chunk_size=chunk_size)
