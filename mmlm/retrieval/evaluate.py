"""Image-text retrieval metrics computed in row chunks, never as the full N x M matrix.

Memory is ``chunk_size x max(N, M)`` scores at a time, so 50k x 50k (10 GB as one
float32 matrix) runs in a few hundred MB. Several captions per image are allowed: a
query hits at k when *any* of its positives is among the top k (CLIP_benchmark's rule).
"""

from __future__ import annotations

import torch


def _ranks(queries: torch.Tensor, keys: torch.Tensor, positive, chunk_size: int) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive key among all keys.

    ``positive(rows)`` gives the (len(rows), K) boolean positive mask for a chunk of queries.
    """
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, queries.shape[0]), device=queries.device)
        scores = queries[rows] @ keys.T  # (chunk, K)
        pos = positive(rows)
        best = scores.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append((scores.masked_fill(pos, float("-inf")) > best).sum(dim=1))  # negatives ranked above it
    return torch.cat(ranks)


def _summary(ranks: torch.Tensor, prefix: str, ks: tuple[int, ...]) -> dict[str, float]:
    ranks = ranks.double()
    out = {f"{prefix}_recall@{k}": (ranks < k).double().mean().item() for k in ks}
    out[f"{prefix}_mean_rank"] = ranks.mean().item() + 1
    out[f"{prefix}_median_rank"] = ranks.quantile(0.5).floor().item() + 1  # OpenCLIP: floor(np.median) + 1
    return out


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
    Returns:
        ``image_retrieval_*`` (text queries, image keys) and ``text_retrieval_*`` (image
        queries, text keys), the names CLIP_benchmark uses.
    """
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(f"{n_img} images and {n_txt} texts: pass text_to_image for several captions per image")
        text_to_image = torch.arange(n_txt)
    text_to_image = text_to_image.to(image_features.device)
    image_ids = torch.arange(n_img, device=image_features.device)

    image_ranks = _ranks(
        text_features, image_features, lambda rows: text_to_image[rows, None] == image_ids[None, :], chunk_size
    )
    text_ranks = _ranks(
        image_features, text_features, lambda rows: rows[:, None] == text_to_image[None, :], chunk_size
    )
    return {**_summary(image_ranks, "image_retrieval", ks), **_summary(text_ranks, "text_retrieval", ks)}
