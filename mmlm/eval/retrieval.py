"""Image-text retrieval metrics computed in row chunks, never as the full N x M matrix.

Memory is two reused buffers of ``chunk_size x max(N, M)`` floats, so 50k x 50k (10 GB
as one float32 matrix) runs in about 400 MB with the default chunk of 1024 rows.

Several captions per image are allowed: a query hits at k when *any* of its positives
is among the top k (CLIP_benchmark's rule); its rank is that of its best-scoring
positive. Exact ties are broken by index, as a stable sort would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def check_retrieval_args(ks: Sequence[int], chunk_size: int) -> None:
    """Raise for a recall@k that cannot exist or a chunk that scores nothing, before any work is done."""
    bad = [k for k in ks if not (isinstance(k, int) and k >= 1)]
    if not ks or bad:
        raise ValueError(f"ks {list(ks)}: recall@k needs integers k >= 1, e.g. [1, 5, 10]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size}: give the number of query rows scored at a time, >= 1 (e.g. 1024)")


def _ranks(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive key among all keys.

    ``positives`` is (Q, P): the key indices of each query's positives, a short row
    padded by repeating one of its own entries.
    """
    n = queries.shape[0]
    # Two buffers reused by every chunk: writing into fresh pages costs more than the matmul itself.
    scores_buffer = queries.new_empty(min(chunk_size, n), keys.shape[0])
    flags_buffer = torch.empty_like(scores_buffer)
    ranks = torch.empty(n, dtype=torch.long, device=queries.device)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        m = rows.stop - start
        scores = torch.matmul(queries[rows], keys.T, out=scores_buffer[:m])  # (chunk, K)
        ranks[rows] = _chunk_ranks(scores, positives[rows], flags_buffer[:m])
    return ranks


def _chunk_ranks(scores: torch.Tensor, positives: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Where a stable descending sort puts the best positive: after every key scoring higher and every
    key scoring the same with a lower index. (Counting only higher keys would give a collapsed model,
    whose scores all tie, a perfect recall.)"""
    positive_scores = scores.gather(1, positives)
    # The best positive is read from this very matmul: a dot product recomputed apart can
    # differ in the last bit and rank a positive above itself.
    best = positive_scores.amax(dim=1, keepdim=True)
    above = _count(torch.gt(scores, best, out=flags))
    tied = _count(torch.eq(scores, best, out=flags))  # the best positive itself, plus any exact tie
    rows = (tied > 1).nonzero().flatten()
    if len(rows):  # exact ties: duplicated images or captions, low precision, a collapsed model
        first = torch.where(positive_scores[rows] == best[rows], positives[rows], scores.shape[1]).amin(1, keepdim=True)
        before = torch.arange(scores.shape[1], device=scores.device)[None, :] < first
        above[rows] += ((scores[rows] == best[rows]) & before).sum(dim=1)  # no positive ties before the first
    return above


def _count(flags: torch.Tensor) -> torch.Tensor:
    """Row sums of a 0/1 float matrix. float32 sums are exact below 2**24 terms, and several times
    faster than bool or integer sums."""
    return sum(part.sum(dim=1, dtype=torch.float32).long() for part in flags.split(2**24, dim=1))


def _summary(ranks: torch.Tensor, prefix: str, ks: tuple[int, ...]) -> dict[str, float]:
    out = {f"{prefix}_recall@{k}": (ranks < k).double().mean().item() for k in ks}
    out[f"{prefix}_mean_rank"] = ranks.double().mean().item() + 1
    s = ranks.sort().values
    # OpenCLIP: floor(np.median) + 1, np.median averaging the two middle values of an even count
    out[f"{prefix}_median_rank"] = float((s[(len(s) - 1) // 2] + s[len(s) // 2]).item() // 2 + 1)
    return out


def _captions_of_images(text_to_image: torch.Tensor, n_img: int) -> torch.Tensor:
    """(N, P) text indices of each image's captions, P = most captions of one image, short rows padded."""
    counts = torch.bincount(text_to_image, minlength=n_img)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten()[:10].tolist()
        raise ValueError(f"{int((counts == 0).sum())} images have no text (e.g. {missing}): drop them first")
    order = torch.argsort(text_to_image, stable=True)  # texts grouped by image
    starts = counts.cumsum(0) - counts
    slot = torch.arange(int(counts.max()), device=counts.device)
    return order[starts[:, None] + torch.minimum(slot[None, :], counts[:, None] - 1)]


@torch.no_grad()
def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k, mean and median rank in both directions.

    Args:
        image_features: (N, D) L2-normalised image embeddings.
        text_features: (M, D) L2-normalised text embeddings.
        text_to_image: (M,) index of the image each text describes; None means 1:1 pairs.
            Every image needs at least one text.
        ks: the k of recall@k.
        chunk_size: query rows scored at a time; memory is 2 x chunk_size x max(N, M) floats.
    Returns:
        ``image_retrieval_*`` (text queries, image keys) and ``text_retrieval_*`` (image
        queries, text keys), the names CLIP_benchmark uses.
    """
    check_retrieval_args(ks, chunk_size)
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(f"{n_img} images and {n_txt} texts: pass text_to_image for several captions per image")
        text_to_image = torch.arange(n_txt)
    text_to_image = text_to_image.to(image_features.device).long()

    image_ranks = _ranks(text_features, image_features, text_to_image[:, None], chunk_size)
    text_ranks = _ranks(image_features, text_features, _captions_of_images(text_to_image, n_img), chunk_size)
    return {**_summary(image_ranks, "image_retrieval", ks), **_summary(text_ranks, "text_retrieval", ks)}


@torch.no_grad()
def embed_image_captions(
    model,
    tokenizer: Callable[[list[str]], dict[str, torch.Tensor]],
    batches: Iterable[dict[str, Any]],
    device: torch.device | str | None = None,
    text_batch_size: int = 256,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed every image and every caption: (N, D) images, (M, D) texts (L2-normalised, float32, CPU)
    and (M,) the index of each text's image.

    ``batches`` yields dicts with ``image`` (B, 3, H, W) and ``captions`` (B lists of strings).
    """
    device = device or next(model.parameters()).device
    images, texts, owners = [], [], []
    n = 0
    for batch in tqdm(batches, desc="images", unit="batch", disable=not progress):
        images.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        captions = [c for caps in batch["captions"] for c in caps]
        owners += [n + i for i, caps in enumerate(batch["captions"]) for _ in caps]
        n += len(batch["captions"])
        for start in range(0, len(captions), text_batch_size):
            tokens = tokenizer(captions[start : start + text_batch_size])
            emb = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device), normalize=True)
            texts.append(emb.float().cpu())
    if not images:
        raise ValueError("no images to evaluate")
    return torch.cat(images), torch.cat(texts), torch.tensor(owners, dtype=torch.long)


def evaluate_retrieval(
    model,
    tokenizer: Callable[[list[str]], dict[str, torch.Tensor]],
    batches: Iterable[dict[str, Any]],
    device: torch.device | str | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
    progress: bool = True,
) -> dict[str, float]:
    """Embed an image-captions set (see ``embed_image_captions``) and score it with ``retrieval_metrics``.

    Only the (N + M) x D embeddings are kept; scores are computed chunk by chunk on ``device``.
    """
    check_retrieval_args(ks, chunk_size)
    images, texts, text_to_image = embed_image_captions(model, tokenizer, batches, device, progress=progress)
    device = device or next(model.parameters()).device
    return retrieval_metrics(images.to(device), texts.to(device), text_to_image, ks, chunk_size)
