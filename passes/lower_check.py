"""The check before a rewrite: does a subgraph compute what the fused op computes?

:func:`region` collects the nodes between a candidate's operands and its output and refuses a
subgraph whose intermediates are read outside it (fusing would lose them). :func:`check` evaluates
those nodes and the fused op on the same random operands, shaped like the captured example (symbolic
sizes take their example value), and compares the outputs within ``TOLERANCE`` for the output dtype.

Example:
    >>> TOLERANCE[torch.float32]
    0.0001
"""

from __future__ import annotations

import torch
from torch import fx

from m2convert.kernels.numerics import rel_err
from m2convert.passes.graph import users
from m2convert.passes.lower_rules import Candidate, Emit, GraphView, is_data, val

# Agreement needed between a subgraph and its fused op on random operands, by output dtype.
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _hint(value):
    """The example value behind a symbolic size (the probes take the captured example's shapes)."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        return hint if hint is not None else value.node.shape_env.size_hint(value.node.expr)
    return value


def _probe(node: fx.Node, gen: torch.Generator) -> torch.Tensor:
    v = val(node)
    dims = [int(_hint(d)) for d in v.shape]
    if v.is_floating_point() or v.is_complex():
        work = v.dtype if v.dtype in (torch.float64, torch.complex64, torch.complex128) else torch.float32
        return torch.randn(dims, generator=gen, dtype=work).to(device=v.device, dtype=v.dtype)
    return torch.randint(0, 2, dims, generator=gen).to(device=v.device, dtype=v.dtype)


def region(cand: Candidate, g: GraphView):
    """(nodes computing ``cand.out`` from ``cand.inputs``, in graph order; None) or (None, why not)."""
    inputs, seen, stack = set(cand.inputs), set(), [cand.out]
    while stack:
        n = stack.pop()
        if n in seen or n in inputs or not is_data(n) or g.is_const(n):
            continue
        if n.op != "call_function":
            return None, f"it reads the graph input '{n.name}' besides its operands"
        seen.add(n)
        stack.extend(n.all_input_nodes)
    nodes = sorted(seen, key=g.order.__getitem__)
    dep: set = set()
    for n in nodes:
        if any(a in inputs or a in dep for a in n.all_input_nodes):
            dep.add(n)
    for n in nodes:
        outside = [u for u in users(n) if u not in seen]
        if n is not cand.out and n in dep and outside:
            return None, f"its intermediate '{n.name}' is also used by '{outside[0].name}' outside the subgraph"
    return nodes, None


def check(cand: Candidate, nodes: list, g: GraphView, seed: int):
    """None if the subgraph and the fused op agree on random operands, else why not."""
    gen = torch.Generator().manual_seed(seed)
    env = {n: _probe(n, gen) for n in cand.inputs}

    def value(a):
        if a in env:
            return env[a]
        if g.is_const(a):
            return g.constant(a)
        if isinstance(val(a), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
            return _hint(val(a))
        env[a] = a.target(*fx.node.map_arg(a.args, value), **fx.node.map_arg(a.kwargs, value))
        return env[a]

    def arg(a):
        if isinstance(a, Emit):
            return a.target(*(arg(x) for x in a.args))
        return value(a) if isinstance(a, fx.Node) else a

    try:
        with torch.no_grad():
            for n in nodes:
                value(n)
            want = cand.op(*(arg(a) for a in cand.args))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        return f"{cand.op.name()} cannot take these operands: {str(exc).splitlines()[0][:200]}"
    err = rel_err(env[cand.out], want)
    if err > TOLERANCE.get(val(cand.out).dtype, 1e-4):
        return f"it computes something other than {cand.op.name()} (relative error {err:.2g} on random operands)"
    return None
