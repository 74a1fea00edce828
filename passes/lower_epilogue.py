"""What follows a Monarch product in a captured graph and ``m2::monarch_linear`` does itself.

The ``monarch-bmm`` rule (``lower_rules.py``) extends its match through ``[..., :out]`` cropping, a bias add
and an activation, so an MLP projection lowers to one op whose CPU kernel writes each chunk of the result
with the bias and activation applied (no extra passes, no second (..., I) tensor).
"""

from __future__ import annotations

from torch import fx

from m2convert.passes.graph import op_name, users
from m2convert.passes.lower_values import shape


# Elementwise ops a Monarch projection applies itself (m2::monarch_linear), by name in kernels/activations.py.
EPILOGUE_ACTIVATIONS = {"aten.relu": "relu", "aten.silu": "silu"}


def sole_user(node: fx.Node):
    found = users(node)
    return found[0] if len(found) == 1 else None


def crop_width(node, end: fx.Node, full: int) -> int | None:
    """The kept width if ``node`` is ``end[..., :width]`` with width < full, else None."""
    if node is None or op_name(node) != "aten.slice" or len(node.args) < 4 or node.args[0] is not end:
        return None
    rank = len(shape(end))
    _, dim, start, stop, *step = node.args
    last = int(dim) % rank == rank - 1
    if last and start in (0, None) and isinstance(stop, int) and stop < full and step in ([], [1]):
        return stop
    return None


def monarch_epilogue(out: fx.Node, full: int, g):
    """(last node, bias, kept outputs, activation name or "") of what follows a Monarch product and
    m2::monarch_linear does itself: ``[..., :out]`` cropping, a bias add, an activation; None if none follows."""
    end, bias, width, act = out, None, full, ""
    nxt = sole_user(end)
    cropped = crop_width(nxt, end, full)
    if cropped is not None:
        end, width = nxt, cropped
        nxt = sole_user(end)
    if nxt is not None and op_name(nxt) == "aten.add" and len(nxt.args) == 2 and not nxt.kwargs:
        other = nxt.args[1] if nxt.args[0] is end else nxt.args[0]
        if isinstance(other, fx.Node) and g.is_const(other) and tuple(shape(other)) == (width,):
            end, bias = nxt, other
            nxt = sole_user(end)
    name = op_name(nxt) if nxt is not None else ""
    if name == "aten.gelu" and nxt.args[0] is end:
        approximate = nxt.kwargs.get("approximate", nxt.args[1] if len(nxt.args) > 1 else "none")
        act = "gelu_tanh" if approximate == "tanh" else "gelu"
    elif name in EPILOGUE_ACTIVATIONS and nxt.args[0] is end and len(nxt.args) == 1:
        act = EPILOGUE_ACTIVATIONS[name]
    if act:
        end = nxt
    return None if end is out else (end, bias, width, act)
