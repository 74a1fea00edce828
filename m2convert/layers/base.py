"""The marker base class of every module m2convert puts in place of an original one."""

from __future__ import annotations

import sympy
import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

from ..kernels.tracing import traced  # noqa: F401  (the layers' eager-only paths read it from here)


class M2Block(nn.Module):
    """Base of the M2 replacement modules (MonarchLinear, M2SequenceMixer, attention adapters).

    Recovery finds the modules to train by this class; the plan reads their cost from :meth:`flops`.

    Example:
        >>> from m2convert.layers import MonarchLinear
        >>> layer = MonarchLinear(64, 64, nblocks=4)
        >>> isinstance(layer, M2Block), layer.num_parameters(), layer.flops()
        (True, 2112, 4160*B*N)
    """

    def flops(self, seq_len=None, batch=None) -> sympy.Expr:
        """Forward FLOPs as a sympy expression in the symbols ``N`` (tokens per sequence) and ``B``."""
        raise NotImplementedError(f"{type(self).__name__} does not report its FLOPs")

    def num_parameters(self) -> int:
        """Number of trainable and frozen parameters of this module."""
        return sum(p.numel() for p in self.parameters())


def hooked(*modules: nn.Module) -> bool:
    """True when a forward hook, forward pre-hook or parametrization sits on any of ``modules`` or their
    submodules, or a global module hook is registered.

    The CPU fast paths that read a submodule's weights instead of calling it step aside then, so pruning
    masks, quantization observers, steering and attribution hooks see (and change) every call.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> hooked(lin)
        False
        >>> handle = lin.register_forward_hook(lambda module, args, out: out)
        >>> hooked(nn.Sequential(lin))
        True
    """
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    for root in modules:
        for sub in root.modules():
            if sub._forward_hooks or sub._forward_pre_hooks or parametrize.is_parametrized(sub):
                return True
    return False
