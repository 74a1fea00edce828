"""Where an attention's queries come from: the module's own input, over the model's whole sequences.

The M2 adapters mix the replaced module's input over each row of the batch. Two layouts break that:
Q read from something the module computes first (a LayerNorm inside the attention module), and windowed
attention (Swin), whose rows are windows cut out of the model's sequences by reshapes.
"""

from __future__ import annotations

from torch import fx

from m2convert.passes.graph import MOVES, GraphIndex, module_path, op_name, within


def input_reason(index: GraphIndex, fqn: str, q) -> str | None:
    """Why the M2 adapter cannot take the place of attention module ``fqn`` given its Q projection ``q``
    (a :class:`~m2convert.passes.graph.ProjCall`), or None when Q reads the module's input over whole rows.

    Example:
        >>> from m2convert.passes.capture import capture
        >>> index = GraphIndex(capture(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32,
        ...                                                                          n_head=2))))
        >>> input_reason(index, "h.0.attn", next(p for p in index.projections if p.fqn == "h.0.attn.c_attn"))
    """
    inner = _computed_inside(q.input, fqn)
    if inner is not None:
        return (f"Q's input is computed inside '{fqn}' ('{inner.name}', {op_name(inner)} in "
                f"'{module_path(inner)}'), which the M2 adapters do not reproduce (they mix the module's input "
                "itself)")
    return _windowed(index, fqn, q)


# Ops a module may apply to its input before the projections without changing what they read.
INPUT_COPIES = ("aten.to", "aten._to_copy", "aten.contiguous", "aten.clone", "aten.alias", "aten.dropout")
# Ops that regroup tokens without computing: what lies between a model's hidden states and windows of them.
WINDOW_MOVES = MOVES | {"aten.pad", "aten.constant_pad_nd", "aten.roll"}


def _computed_inside(node: fx.Node, fqn: str) -> fx.Node | None:
    """The node computing ``node`` inside module ``fqn`` (past copies and casts), or None when it comes in."""
    while within(module_path(node), fqn) and node.op == "call_function":
        if op_name(node) not in INPUT_COPIES or not node.all_input_nodes:
            return node
        node = node.all_input_nodes[0]
    return None


def _windowed(index: GraphIndex, fqn: str, q) -> str | None:
    """Why the attention's rows are windows of the model's sequences (Swin), or None.

    Walks back from Q's input through data movement only (views, permutes, pads, rolls) to the hidden
    states it was cut from; when that changes the number of rows, tokens of one sequence were moved
    into the batch dim: each query sees the keys of its window only.
    """
    cur = q.input
    while op_name(cur) in WINDOW_MOVES and len(index.data_inputs(cur)) == 1:
        cur = index.data_inputs(cur)[0]
    mine, source = q.input.meta.get("val"), cur.meta.get("val")
    if cur is q.input or mine is None or source is None or mine.dim() < 2 or source.dim() < 2:
        return None
    if mine.shape[0] == source.shape[0] or mine.shape[-1] != source.shape[-1]:
        return None
    n = mine.numel() // (mine.shape[0] * mine.shape[-1])                            # tokens per row
    total = source.numel() // (source.shape[0] * source.shape[-1])
    return (f"windowed attention: the queries of '{fqn}' are {mine.shape[0]} rows of {n} tokens regrouped from "
            f"{source.shape[0]} rows of {total} tokens ('{cur.name}', {op_name(cur)} in "
            f"'{module_path(cur) or 'the model'}'), so keys are limited to a window of {n} tokens; the M2 mixers "
            "model only full or causal attention")
