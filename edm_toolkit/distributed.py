"""Multi-process runs through torch.distributed as launched by torchrun (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_from_env(device_type: str) -> ProcessGroup:
    """Joins the torchrun process group when WORLD_SIZE > 1; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_batches(seeds: list[int], max_batch_size: int, group: ProcessGroup) -> list[list[int]]:
    """EDM's split: seeds cut into a multiple of world_size near-equal batches; rank r takes r::world_size."""
    num_batches = ((len(seeds) - 1) // (max_batch_size * group.world_size) + 1) * group.world_size
    batches = torch.as_tensor(seeds).tensor_split(num_batches)
    return [b.tolist() for b in batches[group.rank::group.world_size]]
