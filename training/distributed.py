"""One run in several processes: PyTorch DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node N -m training.train ...`` starts N copies of the same command and tells each its place
(torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``); a plain ``python -m training.train`` is one process of
one. Each process holds its shard of the training cases and draws its share of every batch from them; the
gradients are averaged across processes at each step, so the processes keep identical weights. Only the main
process (rank 0) writes the run's files, validates and saves checkpoints. CUDA processes talk over NCCL, CPU ones
over gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Ranks", "from_launcher", "start", "barrier", "mean", "agree", "shard", "finish"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: its rank, the number of processes, its rank on this machine."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_launcher() -> Ranks:
    """The place torchrun gave this process (one process of one without torchrun)."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def start(ranks: Ranks, device: torch.device) -> None:
    """Join the run's process group (nothing for a single process)."""
    if ranks.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def mean(ranks: Ranks, value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the processes."""
    if ranks.world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / ranks.world


def agree(ranks: Ranks, flag: bool) -> bool:
    """The main process's ``flag``, for every process (e.g. to stop after an epoch)."""
    if ranks.world == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This process's share of ``items`` (every ``world``-th from its rank)."""
    return list(items[ranks.rank::ranks.world])


def finish(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
