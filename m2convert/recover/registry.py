"""The recovery stages, one registered entry per kind: everything ``distill`` and the configs know of a stage.

A stage kind names its objective factory, its defaults (learning rate, what trains, KD weight), what
it reads each step (:class:`TeacherInputs`: the teacher's recorded module inputs/outputs or its
end-to-end outputs; and whether it uses the batches' labels), a validation hook for its StageConfig
and its place in the run order. :class:`~.config.StageConfig` and :class:`~.config.DistillConfig`
validate against this registry and the distill loop runs whatever entry a stage names, so a new stage
is one :func:`register_stage` call next to its objective. The built-in ``transfer``, ``kd`` and
``task`` stages register themselves in :mod:`.stages`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError

TRAIN_CHOICES = ("replaced", "all")        # a stage's default train= (a StageConfig also takes regexes)

# The ``stage`` arguments below are StageConfigs, typed Any because config.py imports this module.


@dataclass(frozen=True)
class TeacherInputs:
    """What a stage's objective is fed from the teacher each step, and how the loop feeds it.

    ``loss(model, objective, teacher, batch, stage)`` runs the teacher on ``batch`` (no grad) and
    returns the scalar loss of ``model`` (the objective, possibly wrapped in DDP / FSDP) on what the
    teacher gave. ``objective`` is the unwrapped module, for what the feed reads off it (the module
    paths to record, for instance). The two kinds, :data:`.stages.MODULE_IO` and
    :data:`.stages.TEACHER_OUTPUTS`, live beside the objectives that take them.

    ``layerwise(objective, teacher, batch, stage)``, where a kind has one, is the form that
    ``StageConfig(layerwise=True)`` runs: it back-propagates as it goes, holding one layer's
    activations at a time, and returns the loss detached (the loop then calls no ``backward``).
    """

    name: str
    loss: Callable[[Callable, nn.Module, nn.Module, dict, Any], torch.Tensor]
    layerwise: Callable[[nn.Module, nn.Module, dict, Any], torch.Tensor] | None = None


@dataclass(frozen=True)
class StageKind:
    """One kind of recovery stage.

    Args:
        name: the stage's name in configs, checkpoints and results.
        objective: ``objective(student, teacher, stage) -> nn.Module``, the module whose forward
            returns the scalar loss (DDP wraps it, so it must hold the student parameters it trains).
        inputs: what the objective is fed from the teacher each step (:class:`TeacherInputs`).
        order: place among the stages; a run's stages must come in non-decreasing order.
        lr: default learning rate. train: default parameter selection, "replaced" (the M2 modules)
            or "all". kd_weight: default weight of the KD term.
        labels: the objective reads the batches' labels (the student is run with them).
        validate: ``validate(stage)`` raising ConfigError for settings this kind cannot train on;
            it runs after StageConfig's own checks.

    Example:
        >>> stage_kind("transfer").train, stage_kind("kd").kd_weight
        ('replaced', 1.0)
    """

    name: str
    objective: Callable[[nn.Module, nn.Module, Any], nn.Module]
    inputs: TeacherInputs
    order: float
    lr: float
    train: str
    kd_weight: float = 0.0
    labels: bool = False
    validate: Callable[[Any], None] | None = None


_KINDS: dict[str, StageKind] = {}


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def register_stage(name: str, objective: Callable, *, inputs: TeacherInputs, order: float, lr: float,
                   train: str, kd_weight: float = 0.0, labels: bool = False,
                   validate: Callable | None = None) -> StageKind:
    """Register a stage kind under ``name`` (arguments as :class:`StageKind`); returns the entry.

    Raises ConfigError when ``name`` is taken or a default is invalid.

    Example:
        >>> from m2convert.recover.stages import TEACHER_OUTPUTS, end_to_end_objective
        >>> kind = register_stage("kd-long", end_to_end_objective, inputs=TEACHER_OUTPUTS, order=25,
        ...                       lr=3e-5, train="all", kd_weight=1.0)
        >>> "kd-long" in stage_names()
        True
        >>> unregister_stage("kd-long")
    """
    if not isinstance(name, str) or not name or "," in name or name != name.strip():
        raise ConfigError(f"stage name {name!r} must be a non-empty string without commas or outer spaces")
    if name in _KINDS:
        raise ConfigError(f"stage {name!r} is already registered; unregister_stage({name!r}) first")
    if not callable(objective) or (validate is not None and not callable(validate)):
        raise ConfigError(f"stage {name!r}: objective (and validate, if given) must be callable")
    if not isinstance(inputs, TeacherInputs):
        raise ConfigError(f"stage {name!r}: inputs={inputs!r} must be a TeacherInputs "
                          "(m2convert.recover.stages.MODULE_IO or TEACHER_OUTPUTS)")
    for field_name, value, ok in (("order", order, _finite(order)), ("lr", lr, _finite(lr) and lr > 0),
                                  ("kd_weight", kd_weight, _finite(kd_weight) and kd_weight >= 0)):
        if not ok:
            raise ConfigError(f"stage {name!r}: {field_name}={value!r} is not a valid default")
    if train not in TRAIN_CHOICES:
        raise ConfigError(f"stage {name!r}: default train={train!r}; use one of {list(TRAIN_CHOICES)}")
    kind = StageKind(name, objective, inputs, float(order), float(lr), train, float(kd_weight), bool(labels),
                     validate)
    _KINDS[name] = kind
    return kind


def unregister_stage(name: str) -> None:
    """Remove the stage kind ``name`` (ConfigError when none is registered under it)."""
    if name not in _KINDS:
        raise ConfigError(f"no stage {name!r} is registered; registered: {list(stage_names())}")
    del _KINDS[name]


def stage_names() -> tuple[str, ...]:
    """The registered stage names in run order.

    Example:
        >>> stage_names()[:3]
        ('transfer', 'kd', 'task')
    """
    return tuple(k.name for k in sorted(_KINDS.values(), key=lambda k: k.order))


def stage_kind(name: str) -> StageKind:
    """The registered entry of stage ``name``; ConfigError listing the registered names otherwise."""
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ConfigError(f"stage name={name!r} is not valid; choose one of {list(stage_names())}")
    return kind
