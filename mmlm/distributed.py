"""Where this process sits among the ranks; shared by the losses and the data streams."""

from __future__ import annotations

import os

import torch.distributed as dist


def world(launcher_env: bool = False) -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one.

    launcher_env: without a group, read torchrun's RANK / WORLD_SIZE instead. A dataset is built
    before the trainer starts the group and must already know its share of the shards; a loss
    must not, as it can only gather over a group that exists.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launcher_env:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return 0, 1
