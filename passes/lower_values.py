"""What the lowering rules read of a captured node: its recorded value, whether it holds data, its shape.

Example:
    >>> show((2, 3))
    '(2, 3)'
"""

from __future__ import annotations

import sympy
import torch
from torch import fx


def val(node):
    """The fake value export recorded for ``node`` (None for constants and unannotated nodes)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor(node) -> bool:
    return isinstance(val(node), torch.Tensor)


def is_data(node) -> bool:
    """True for nodes holding tensors (or a list of them, as split does); False for sizes and scalars."""
    v = val(node)
    return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor)
                                                                                for t in v))


def shape(node) -> tuple:
    """The shape of a tensor node as sympy expressions (symbolic sizes compare by expression)."""
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d)) for d in val(node).shape)


def show(dims: tuple) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"
