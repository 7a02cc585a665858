"""Token batches for the model tests."""

import torch


def random_text(batch: int, lengths: list[int], pad_to: int, vocab: int, eot: int | None = None, pad: int = 0):
    """Right-padded random token ids and their attention mask; ``eot`` ends each text."""
    ids = torch.full((batch, pad_to), pad, dtype=torch.long)
    mask = torch.zeros(batch, pad_to, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab - 2, (n,))
        if eot is not None:
            ids[i, n - 1] = eot
        mask[i, :n] = 1
    return ids, mask
