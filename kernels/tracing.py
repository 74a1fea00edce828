"""Whether a tensor is being traced: the eager-only CPU kernels and fast paths step aside when it is.

Example:
    >>> traced(torch.ones(2))
    False
"""

from __future__ import annotations

import torch
from torch import nn


def traced(t: torch.Tensor) -> bool:
    """True under torch.compile / torch.export: a compiling frame, or a fake / functional tensor (those are
    subclasses, so ``type(t)`` is not a plain Tensor or Parameter). Eager-only fast paths check this."""
    return torch.compiler.is_compiling() or type(t) not in (torch.Tensor, nn.Parameter)
