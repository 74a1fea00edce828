"""Data parallelism for recovery: torchrun + DDP or FSDP2 (gloo on CPU, nccl on GPU).

Every rank runs the same stages on its own shard of the batches; DDP averages gradients, so all
ranks hold the same weights after every step. Rank 0 writes checkpoints and shows progress.
FSDP2 (``distributed="fsdp"``, see :mod:`.fsdp`) averages the same gradients but keeps only a shard
of each parameter, gradient and optimizer state per rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


@dataclass
class Group:
    """This process's place in the run: ``rank`` of ``world`` (1 = single process)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False
    fsdp: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small float64 tensor over ranks (returns it unchanged on one process)."""
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def broadcast(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers of ``module`` to every rank (what DDP does when it wraps one)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of ``params`` over ranks (what DDP does, for modules run outside it)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in DDP on more than one rank (gradients averaged), else as is."""
        if not self.active or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(mode: str, device: torch.device) -> Group:
    """Join the torchrun process group when asked to (``mode`` "ddp" or "fsdp", or "auto" with WORLD_SIZE > 1).

    "fsdp" needs more than one rank: with one there is nothing to shard over, so it is refused
    (ConfigError) rather than silently run unsharded.

    Example:
        >>> setup("none", torch.device("cpu")).world
        1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none" or (mode == "auto" and world <= 1):
        return Group()
    if not dist.is_available():
        raise ConfigError("distributed training was asked for but torch.distributed is not available")
    if world <= 1 and not dist.is_initialized():
        raise ConfigError(f"distributed={mode!r} needs a torchrun launch (WORLD_SIZE > 1, found "
                          f"{os.environ.get('WORLD_SIZE', 'unset')}); run `torchrun --nproc_per_node N ...` "
                          "or use distributed='none'")
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend=backend)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"distributed={mode!r}: cannot join the {backend} process group ({e}); launch with "
                              "`torchrun --nproc_per_node N ...`, which sets RANK, WORLD_SIZE, MASTER_ADDR and "
                              "MASTER_PORT, or use distributed='none'") from None
        owns = True
    group = Group(dist.get_rank(), dist.get_world_size(), owns, fsdp=mode == "fsdp")
    if group.fsdp and group.world <= 1:
        group.close()
        raise ConfigError("distributed='fsdp' shards the student over ranks, but the process group has 1; "
                          "launch with `torchrun --nproc_per_node N ...` (N > 1) or use distributed='none'")
    return group
