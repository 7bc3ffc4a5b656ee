"""Data-parallel training with PyTorch's own engine: ``torchrun --nproc_per_node N -m aace train ...``.

Every rank builds the same global batches (the loader is seeded) and trains on its own slice of each;
DistributedDataParallel averages the gradients. For SAM this gives, by default, the update one process
would make on the global batch: both passes' gradients are averaged across ranks, so every rank takes the
same perturbation. With ``m_sharpness=True`` the perturbation pass runs under ``no_sync()``: each rank
perturbs along its own shard's gradient (the m-sharpness of Foret et al., with m = the per-rank batch),
and only the update pass's gradients are averaged.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK), or a world of one."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on the CPU); returns this rank's device."""
    if not world.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard(x: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous slice of a global batch."""
    return torch.tensor_split(x, world.size)[world.rank] if world.active else x


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def perturbation_context(model: torch.nn.Module, m_sharpness: bool):
    """``no_sync()`` for the perturbation pass under m-sharpness: each rank keeps its own gradient."""
    if m_sharpness and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
