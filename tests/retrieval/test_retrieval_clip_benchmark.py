"""Several captions per image: mmlm's retrieval recalls equal CLIP_benchmark's, on embeddings and end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader

import mmlm
from mmlm.cli import eval_retrieval, main
from mmlm.data import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, digits_image_text, load_image
from mmlm.eval.clip_benchmark import load_clip_benchmark
from mmlm.eval.retrieval import retrieval_metrics

zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
KS = (1, 5, 10)


def multi_caption_embeddings(n_img: int = 150, d: int = 16, noise: float = 0.4, seed: int = 0):
    """Images with 1 to 5 captions each (noisy copies of the image embedding), texts in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    counts = torch.randint(1, 6, (n_img,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n_img), counts)
    owner = owner[torch.randperm(len(owner), generator=g)]
    txt = F.normalize(img[owner] + noise * torch.randn(len(owner), d, generator=g), dim=-1)
    return img, txt, owner


def test_recalls_equal_clip_benchmark_recall_at_k():
    """CLIP_benchmark's recall_at_k (through its batchify) on the same embeddings; its rule: hit if any positive in the top k."""
    img, txt, owner = multi_caption_embeddings()
    scores = txt @ img.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    ours = retrieval_metrics(img, txt, owner, ks=KS, chunk_size=37)
    for k in KS:
        ref_img = (zsr.batchify(zsr.recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean().item()
        ref_txt = (zsr.batchify(zsr.recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(ref_img, abs=1e-6)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(ref_txt, abs=1e-6)
    assert 0.05 < ours["text_retrieval_recall@1"] < 0.95  # neither trivial nor hopeless


def numpy_ranks(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor) -> dict[str, np.ndarray]:
    """0-based rank of each query's first positive in a full stable numpy argsort (OpenCLIP ranks by argsort)."""
    scores, owners = (txt @ img.T).numpy(), owner.numpy()
    order = np.argsort(-scores, axis=1, kind="stable")  # text queries, image keys
    image_rank = np.array([np.nonzero(order[j] == owners[j])[0][0] for j in range(len(owners))])
    order = np.argsort(-scores.T, axis=1, kind="stable")  # image queries: the first of its captions
    text_rank = np.array([np.isin(order[i], np.nonzero(owners == i)[0]).argmax() for i in range(len(img))])
    return {"image_retrieval": image_rank, "text_retrieval": text_rank}


def _assert_ranks(ours: dict[str, float], ref: dict[str, np.ndarray]) -> None:
    for prefix, ranks in ref.items():
        for k in KS:
            assert ours[f"{prefix}_recall@{k}"] == pytest.approx((ranks < k).mean(), abs=1e-12)
        assert ours[f"{prefix}_mean_rank"] == pytest.approx(ranks.mean() + 1, abs=1e-9)
        assert ours[f"{prefix}_median_rank"] == np.floor(np.median(ranks)) + 1


def test_ranks_equal_numpy_argsort():
    """Recall, mean and median rank of the best positive, from a full numpy argsort."""
    img, txt, owner = multi_caption_embeddings(seed=1)
    _assert_ranks(retrieval_metrics(img, txt, owner, chunk_size=50), numpy_ranks(img, txt, owner))


def test_exact_ties_break_as_a_stable_sort():
    """Duplicated images and captions tie exactly; a collapsed model ties everything. Ranks then follow a
    stable sort, so a constant embedding scores chance level instead of a perfect recall."""
    img, txt, owner = multi_caption_embeddings(n_img=60, seed=3)
    img[1::3] = img[0::3][: len(img[1::3])]  # duplicated images
    txt[5:15] = txt[0]  # duplicated captions, of different images
    _assert_ranks(retrieval_metrics(img, txt, owner, chunk_size=7), numpy_ranks(img, txt, owner))

    collapsed = F.normalize(torch.ones(40, 16), dim=-1)
    ours = retrieval_metrics(collapsed, collapsed.clone(), chunk_size=16)
    _assert_ranks(ours, numpy_ranks(collapsed, collapsed.clone(), torch.arange(40)))
    assert ours["image_retrieval_recall@1"] == ours["text_retrieval_recall@1"] == 1 / 40


class _Lookup(torch.nn.Module):
    """A "model" whose images are their embeddings and whose texts are row numbers of a text table."""

    def __init__(self, texts: torch.Tensor) -> None:
        super().__init__()
        self.texts = texts

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.texts[ids]


def test_recalls_equal_clip_benchmark_evaluate():
    """CLIP_benchmark's whole retrieval ``evaluate`` (batching, caption bookkeeping, recall) on the same embeddings."""
    img, txt, owner = multi_caption_embeddings(seed=2)
    items = [(img[i], [str(j) for j in torch.nonzero(owner == i).flatten().tolist()]) for i in range(len(img))]
    loader = DataLoader(items, batch_size=32, collate_fn=zsr_collate())
    ref = zsr.evaluate(_Lookup(txt), loader, _row_numbers, "cpu", amp=False, recall_k_list=list(KS))
    ours = retrieval_metrics(img, txt, owner, ks=KS)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def _row_numbers(texts: list[str]) -> torch.Tensor:
    return torch.tensor([int(t) for t in texts])


def zsr_collate():
    from clip_benchmark.datasets.builder import image_captions_collate_fn

    return image_captions_collate_fn


# ------------------------------------------------------------------------------ end to end, real images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = mmlm.create_model("clip-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mmlm.save(model, tmp_path_factory.mktemp("ckpt") / "clip-tiny")


@pytest.fixture(scope="module")
def captioned_digits(tmp_path_factory):
    """120 real digit scans with 1 to 3 captions each, as a CSV (one row per caption, the path repeated)
    and as CLIP_benchmark retrieval shards (``txt``: one caption per line)."""
    root = tmp_path_factory.mktemp("captioned")
    ds = digits_image_text("test")
    rng = np.random.default_rng(0)
    rows, samples = ["filepath,title"], []
    for i in range(120):
        path = root / f"{i:03d}.png"
        ds.image(i).save(path)
        label = int(ds.labels[i])
        # unique per image: exact ties between identical captions would be broken arbitrarily by CLIP_benchmark's topk
        captions = [t.format(rng.choice([DIGIT_CLASSNAMES[label], str(label)])) + f" scan {i}"
                    for t in rng.choice(DIGIT_TEMPLATES, size=rng.integers(1, 4), replace=False)]  # fmt: skip
        rows += [f'{path.name},"{c}"' for c in captions]
        samples.append({"__key__": f"s{i:03d}", "png": path.read_bytes(), "txt": "\n".join(captions)})
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    wds_root = root / "wds"
    (wds_root / "test").mkdir(parents=True)
    for shard in range(2):
        with wds.TarWriter(str(wds_root / "test" / f"{shard}.tar")) as sink:
            for s in samples[shard::2]:
                sink.write(s)
    (wds_root / "test" / "nshards.txt").write_text("2")
    (wds_root / "dataset_type.txt").write_text("retrieval")
    return root


@pytest.mark.slow
def test_eval_retrieval_equals_clip_benchmark_end_to_end(checkpoint, captioned_digits, tmp_path):
    """CLIP_benchmark's evaluate through mmlm's loader, on the images and captions of the manifest, against
    `mmlm eval-retrieval` on the manifest and on CLIP_benchmark's retrieval shards of the same data."""
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn

    model, transform, tokenizer = load_clip_benchmark(str(checkpoint))
    grouped: dict[str, list[str]] = {}
    for line in (captioned_digits / "captions.csv").read_text().splitlines()[1:]:
        name, caption = line.split(",", 1)
        grouped.setdefault(name, []).append(caption.strip('"'))
    items = [(transform(load_image(captioned_digits / name)), caps) for name, caps in grouped.items()]
    loader = DataLoader(items, batch_size=32, collate_fn=image_captions_collate_fn)
    ref = zsr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=list(KS))
    print(f"[CLIP_benchmark] retrieval, {len(items)} images, {sum(map(len, grouped.values()))} captions: {ref}")

    shards = build_dataset("wds/digits", root=str(captioned_digits / "wds"), transform=transform, split="test",
                           task="zeroshot_retrieval")  # fmt: skip
    ref_shards = zsr.evaluate(model, DataLoader(shards, batch_size=32, collate_fn=image_captions_collate_fn),
                              tokenizer, "cpu", amp=False, recall_k_list=list(KS))  # fmt: skip

    out = tmp_path / "retrieval.json"
    ours = eval_retrieval(str(checkpoint), dataset=str(captioned_digits / "captions.csv"), output=out, chunk_size=17)
    ours_shards = eval_retrieval(str(checkpoint), dataset=str(captioned_digits / "wds"), batch_size=25)
    for key in ref:  # CLIP_benchmark averages in float32: equal fractions agree to ~1e-8
        assert ours["metrics"][key] == pytest.approx(ref[key], abs=1e-6), key
        assert ours_shards["metrics"][key] == pytest.approx(ref_shards[key], abs=1e-6), key
        assert ref_shards[key] == pytest.approx(ref[key], abs=1e-6), key
    assert json.loads(out.read_text()) == ours
    assert set(ours) == {"dataset", "model", "pretrained", "task", "metrics", "language", "samples"}
    assert ours["task"] == "zeroshot_retrieval"
    assert ours["samples"] == ours_shards["samples"] == {"used": len(items), "skipped": {}}


def test_eval_retrieval_command_on_digits(tmp_path, capsys):
    """`mmlm eval-retrieval PRESET --dataset digits` runs through the command line and prints the JSON."""
    out = tmp_path / "digits.json"
    main(["eval-retrieval", "clip-tiny", "--dataset", "digits", "--output", str(out), "--ks", "[1, 5]"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["pretrained"] == "random-init-seed0" and printed["dataset"] == "digits"
    assert set(printed["metrics"]) == {f"{d}_retrieval_{m}" for d in ("image", "text")
                                       for m in ("recall@1", "recall@5", "mean_rank", "median_rank")}  # fmt: skip
    assert all(0 <= v <= 1 for k, v in printed["metrics"].items() if "recall" in k)
