"""The elementwise activations a Monarch projection can apply to its own output, by name.

Each has three forms: in place (the CPU kernels apply it to a chunk of the result while it is in cache,
``kernels.monarch.cpu.monarch_linear``), out of place (the reference and traced paths) and its backward
(``dy, pre -> d pre``, with ``pre`` the value before the activation), which is what the ``m2::monarch_linear``
op's autograd needs. The names are those of ``MonarchLinear.activation``.

Example:
    >>> t = torch.linspace(-3, 3, 7)
    >>> torch.equal(ACTIVATIONS["gelu"].inplace(t.clone()), ACTIVATIONS["gelu"].apply(t))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    """An activation's in-place, out-of-place and backward functions (see the module notes)."""

    inplace: Callable
    apply: Callable
    backward: Callable


ACTIVATIONS = {
    "gelu": Activation(torch._C._nn.gelu_, F.gelu, lambda dy, pre: aten.gelu_backward(dy, pre)),
    "gelu_tanh": Activation(lambda t: torch._C._nn.gelu_(t, approximate="tanh"),
                            lambda t: F.gelu(t, approximate="tanh"),
                            lambda dy, pre: aten.gelu_backward(dy, pre, approximate="tanh")),
    "relu": Activation(torch.relu_, torch.relu, lambda dy, pre: aten.threshold_backward(dy, pre, 0)),
    "silu": Activation(lambda t: F.silu(t, inplace=True), F.silu, lambda dy, pre: aten.silu_backward(dy, pre)),
}


def activation(name: str) -> Activation:
    """The activation called ``name``; ValueError naming the known ones otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
