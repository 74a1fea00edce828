"""The marker base class of every module m2convert puts in place of an original one."""

from __future__ import annotations

import sympy
import torch
from torch import nn

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
