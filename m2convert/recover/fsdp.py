"""FSDP2 for recovery: the student's parameters, gradients and AdamW state split over the ranks.

``distributed="fsdp"`` trains a sharded copy of the student (``torch.distributed.fsdp.fully_shard``,
per-parameter DTensor sharding): one FSDP unit per replaced module, one per transformer block that
holds replaced modules (the element of the model's layer list), and a root over the whole student.
Both kinds of stage run through that root, so FSDP sees one root for the whole run: ``transfer``
calls the replaced modules directly (each all-gathers its own parameters), ``kd`` / ``task`` run the
whole student. The teacher is not sharded: it stays whole, frozen and in eval mode on every rank.

Checkpoints gather the full weights and AdamW state to rank 0 and are written in the same
safetensors + JSON format as a single-process or DDP run. When training ends the full weights are
loaded back into the caller's student, a plain module, on every rank.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .stages import replaced_modules


class _Root(nn.Module):
    """The FSDP root: holds the student and runs any objective over it inside the root's forward."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, objective, *args):
        return objective(*args)


def shard_units(student: nn.Module) -> list[str]:
    """Paths to ``fully_shard`` before the root, innermost first: each replaced module, then each
    layer-list element (``bert.encoder.layer.0``, ``transformer.h.3``) that holds one.

    Example:
        >>> shard_units(student)[:2]                                        # doctest: +SKIP
        ['bert.encoder.layer.0.attention.self', 'bert.encoder.layer.0.intermediate.dense']
    """
    lists = {path for path, m in student.named_modules() if isinstance(m, nn.ModuleList)}
    replaced = [path for path, _ in replaced_modules(student)]
    blocks = []
    for path in replaced:
        parts = path.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i - 1]) in lists and re.fullmatch(r"\d+", parts[i - 1]):
                block = ".".join(parts[:i])
                if block != path and block not in blocks:
                    blocks.append(block)
                break
    return replaced + blocks


class ShardedStudent:
    """A sharded training copy of ``student`` on the ranks of the default process group.

    ``module`` is the copy (same parameter names as ``student``; its parameters are DTensor shards);
    ``bind(objective)`` returns a callable that runs ``objective`` through the FSDP root.
    The copy starts from rank 0's weights on every rank (as DDP does). Every method but ``bind`` and
    ``module`` is a collective: all ranks call it.

    Example (under torchrun, 2 processes):
        >>> sharded = ShardedStudent(student, torch.device("cpu"), rank, 2)          # doctest: +SKIP
        >>> loss = sharded.bind(EndToEndObjective(sharded.module, stage))(batch, t_out)  # doctest: +SKIP
        >>> loss.backward(); opt.step()                                               # doctest: +SKIP
        >>> sharded.copy_into(student)                  # full weights, every rank    # doctest: +SKIP
    """

    def __init__(self, student: nn.Module, device: torch.device, rank: int, world: int):
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:
            raise ConfigError(f"distributed='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                              f"this torch {torch.__version__} has none ({e}); use distributed='ddp'") from None
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        self.rank = rank
        mesh = init_device_mesh(device.type, (world,))
        self.root = _Root(copy.deepcopy(student))
        for path in shard_units(self.module):
            fully_shard(self.module.get_submodule(path), mesh=mesh)
        fully_shard(self.root, mesh=mesh)                         # every parameter no unit took
        set_model_state_dict(self.module, student.state_dict() if rank == 0 else {},
                             options=self._options(broadcast_from_rank0=True))

    @property
    def module(self) -> nn.Module:
        return self.root.student

    def bind(self, objective: nn.Module):
        return lambda *args: self.root(objective, *args)

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, **kw)

    def full_state(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The full (unsharded) weights on CPU: on rank 0 only ({} elsewhere) or on every rank. Collective."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        if rank0_only:
            return get_model_state_dict(self.module, options=self._options(cpu_offload=True))
        return {k: v.cpu() for k, v in get_model_state_dict(self.module, options=self._options()).items()}

    def copy_into(self, student: nn.Module, rank0_only: bool = False) -> None:
        """Load the full trained weights into the plain ``student`` (every rank, or rank 0 only). Collective."""
        state = self.full_state(rank0_only)
        if state:
            with torch.no_grad():
                student.load_state_dict(state)

    def optimizer_state(self, optimizer, names: list[str]) -> dict | None:
        """The optimizer's full state on rank 0, keyed by parameter index as ``optimizer.state_dict()``
        is (``names`` = the parameter names in optimizer order); None on other ranks. Collective."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        osd = get_optimizer_state_dict(self.module, optimizer, options=self._options(cpu_offload=True))
        if self.rank != 0:
            return None
        index = {n: i for i, n in enumerate(names)}
        return {"state": {index[n]: s for n, s in osd["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}

    def load_optimizer_state(self, optimizer, names: list[str], state: dict, where) -> None:
        """Shard an index-keyed full optimizer state (every rank passes the whole of it) into ``optimizer``."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        try:
            groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
            osd = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
            set_optimizer_state_dict(self.module, optimizer, osd, options=self._options())
        except (IndexError, KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{where} does not fit this stage's optimizer: {e}") from None

