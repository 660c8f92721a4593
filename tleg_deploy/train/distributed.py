"""Several processes under ``torchrun``: rank/world from the environment, DDP for the gradients.

``torchrun --nproc_per_node=N`` (one machine) or ``torchrun --nnodes=M --nproc_per_node=N
--rdzv-endpoint=HOST:PORT`` (several) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; we then join
the process group (gloo on CPU, nccl on CUDA) and wrap the model in
``torch.nn.parallel.DistributedDataParallel``, which broadcasts rank 0's parameters at construction
and averages the gradients in buckets during ``backward``. Every rank evaluates; only rank 0 writes
files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> DistInfo:
    """Join the process group if launched by torchrun (idempotent); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if cuda:
        if world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cuda")
    else:
        dev = torch.device(device or "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(rank, world, dev)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` itself in one process; under torchrun, ``model`` wrapped in DDP (on ``info.device``).

    Train through the returned module; save, evaluate and checkpoint ``model`` (the same parameters).
    The Aux-Net needs no DDP option: its ``base``/``slope`` and stem are registered parameters that
    every forward uses (``functional_call`` over the parameter-free meta templates, which are not
    submodules, so DDP never sees them), hence no ``find_unused_parameters`` and its extra graph walk.
    """
    if info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum plain numbers (loss sums, counts) over ranks."""
    if info.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun launch (works before ``setup``)."""
    return int(os.environ.get("RANK", "0")) == 0
