"""The analysis of mixture-of-experts MLPs: experts modules whose weights are stacked (E, out, in) parameters.

HF MoE blocks (transformers 5: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) keep every expert's gate_up and
down weights in one 3-D parameter each, inside one experts module that the block calls with the router's
choice, ``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``. Found here
without family names:

1. the graph: a module whose computation multiplies by two or more 3-D parameters holding the same number
   of experts E > 1 (conv kernels and converted M2 layers aside);
2. its call: the values it reads from outside are tokens (T, H), an integer (T, k) and a float (T, k);
3. its parameters: a pair (E, 2I or I, H) / (E, H, I) (or both stored transposed), optional (E, out)
   biases, and nothing else;
4. numerically: the module, run on random tokens routed to every expert, equals the dense experts formula
   (:func:`m2convert.layers.experts.dense_experts`) on its own weights. The first layout (gated or not,
   transposed or not, which parameter-free child is the activation) that matches is the site's
   :class:`ExpertsLayout`; a module computing something else is skipped, saying so.
"""

from __future__ import annotations

import math
from itertools import permutations

import torch
from torch import nn

from m2convert.layers.base import M2Block
from m2convert.layers.experts import ACTIVATIONS, dense_experts
from m2convert.passes.graph import ACTIVATIONS as GRAPH_ACTIVATIONS
from m2convert.passes.graph import MOVES, GraphIndex, module_path, op_name, users, within
from m2convert.passes.site import DIMENSION, ExpertsLayout, Site

PATTERN = "experts-mlp"
FORMULA = "sum over the routed experts of weight * down(act(gate(x)) * up(x)) (or down(act(up(x))))"


def _stacked_readers(index: GraphIndex) -> dict[str, dict[str, int]]:
    """{module path: {3-D parameter name: experts}} for modules that multiply by two or more 3-D
    parameters holding the same number of experts (> 1)."""
    stacked: dict[str, dict[str, int]] = {}                  # reading module -> {param name: experts}
    for node in index.nodes:
        name = index.param_names.get(node.name)
        val = node.meta.get("val")
        owner = index.captured.modules.get(name.rpartition(".")[0]) if name else None
        # conv kernels and the factors of already converted M2 layers are 3-D too, but are no experts
        if name is None or getattr(val, "ndim", 0) != 3 or isinstance(owner, (nn.modules.conv._ConvNd, M2Block)):
            continue
        frontier, readers = [node], []
        while frontier:                                    # through transposes/views to what computes with it
            for user in users(frontier.pop()):
                (frontier if op_name(user) in MOVES else readers).append(user)
        for reader in (r for r in readers if any(k in op_name(r) for k in ("mm", "matmul", "linear", "einsum"))):
            stacked.setdefault(module_path(reader), {})[name.rpartition(".")[2]] = val.shape[0]
    return {fqn: names for fqn, names in stacked.items()
            if len(names) >= 2 and len(set(names.values())) == 1 and min(names.values()) > 1}


def _call_inputs(index: GraphIndex, fqn: str) -> tuple[int, int] | None:
    """(H, k) of the experts call: the values module ``fqn`` reads from outside itself are tokens (T, H),
    an integer (T, k) and a float (T, k); None when they are not."""
    inside = {n for n in index.nodes if n.op == "call_function" and within(module_path(n), fqn)}
    outside = {a for n in inside for a in index.data_inputs(n) if a not in inside}
    vals = [v for v in (a.meta.get("val") for a in outside) if isinstance(v, torch.Tensor)]
    ints = [v for v in vals if v.dim() == 2 and not v.dtype.is_floating_point]
    floats = [v for v in vals if v.dim() == 2 and v.dtype.is_floating_point]
    if len(ints) != 1 or len(floats) != 2:
        return None
    tokens = [v for v in floats if v.shape != ints[0].shape]                 # (T, H); the other is (T, k)
    if len(tokens) != 1:
        return None
    hidden, k = tokens[0].shape[1], ints[0].shape[1]
    return (hidden, k) if isinstance(hidden, int) and isinstance(k, int) else None


def _bias_for(module: nn.Module, experts: int, weight: str, out: int, taken: set) -> str | None:
    """The (E, out) parameter that biases ``weight``: named after it if several fit."""
    fits = [n for n, p in module.named_parameters(recurse=False)
            if n not in taken and p.dim() == 2 and tuple(p.shape) == (experts, out)]
    named = [n for n in fits if n.startswith(weight)]
    return (named or fits or [None])[0]


def _candidate_layouts(module: nn.Module, names: list[str], hidden: int, top_k: int) -> list[ExpertsLayout]:
    """Every layout of the stacked parameters ``names`` consistent with their shapes and the input width."""
    found = []
    for first, second in permutations(names, 2):
        a, b = getattr(module, first), getattr(module, second)
        for transposed in (False, True):
            (a_out, a_in), (b_out, b_in) = (a.shape[1:], b.shape[1:]) if not transposed else \
                (a.shape[:0:-1], b.shape[:0:-1])
            if a_in != hidden or b_out != hidden:
                continue
            for gated in (True, False):
                if a_out != b_in * (2 if gated else 1):
                    continue
                experts = a.shape[0]
                gb = _bias_for(module, experts, first, a_out, set())
                db = _bias_for(module, experts, second, hidden, {gb})
                found.append(ExpertsLayout(experts, hidden, b_in, first, second, gated=gated, transposed=transposed,
                                           gate_up_bias=gb, down_bias=db, top_k=top_k))
    return found


def _acts(module: nn.Module, index: GraphIndex, fqn: str) -> list[tuple[str | None, str | None]]:
    """(attribute, name) of each activation to try: the module's parameter-free children, then the
    activation op its graph runs, by name."""
    ops = [GRAPH_ACTIVATIONS[op_name(n)] for n in index.nodes
           if n.op == "call_function" and op_name(n) in GRAPH_ACTIVATIONS and within(module_path(n), fqn)]
    name = ops[0] if ops else None
    children = [(attr, name) for attr, child in module.named_children() if not any(True for _ in child.parameters())]
    return children + ([(None, name)] if name in ACTIVATIONS else [])


def routing(experts: int, hidden: int, top_k: int, like: torch.Tensor):
    """Random tokens routed so that every expert gets some: (T, H), (T, k) indices, (T, k) weights.

    Seeded (the same every call), in the dtype and on the device of ``like``; k = min(top_k, experts).

    Example:
        >>> x, index, weights = routing(experts=4, hidden=8, top_k=2, like=torch.zeros(1))
        >>> x.shape, index.tolist(), weights.shape
        (torch.Size([3, 8]), [[0, 1], [2, 3], [0, 1]], torch.Size([3, 2]))
    """
    k = min(top_k, experts)
    tokens = math.ceil(experts / k) + 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(like.device, like.dtype)
    index = (torch.arange(tokens * k) % experts).reshape(tokens, k).to(like.device)
    weights = (0.1 + torch.rand(tokens, k, generator=gen)).to(like.device, like.dtype)
    return x, index, weights


def _layout_error(module: nn.Module, layout: ExpertsLayout, act, out: torch.Tensor, inputs) -> float:
    """max |module output - dense experts formula| / max |formula| on ``inputs``."""
    def param(name):
        return None if name is None else getattr(module, name)

    gate_up, down = param(layout.gate_up), param(layout.down)
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    compute = torch.promote_types(down.dtype, torch.float32)
    ref = dense_experts(*inputs, gate_up, down, act, param(layout.gate_up_bias), param(layout.down_bias),
                        gated=layout.gated, compute_dtype=compute)
    return ((out.to(compute) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check_experts(module: nn.Module, layouts: list[ExpertsLayout], acts) -> tuple[ExpertsLayout | None, str]:
    """(the first layout whose formula the module computes, "") or (None, why none does)."""
    like = getattr(module, layouts[0].down)
    inputs = routing(layouts[0].experts, layouts[0].hidden, layouts[0].top_k, like)
    call = ("experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))")
    try:
        with torch.no_grad():
            out = module(*inputs)
    except Exception as exc:  # noqa: BLE001  any failure of the module's own code is the reason to give
        return None, f"calling it as {call} raised {type(exc).__name__}: {str(exc)[:200]}"
    if not isinstance(out, torch.Tensor) or out.shape != inputs[0].shape:
        return None, f"{call} returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, not (T, H)"
    tol = max(1e-4, 16 * torch.finfo(like.dtype).eps)
    best = math.inf
    for layout in layouts:
        for attr, name in acts:
            fn = getattr(module, attr) if attr else ACTIVATIONS[name]
            with torch.no_grad():
                err = _layout_error(module, layout, fn, out, inputs)
            if err <= tol:
                layout.act, layout.activation = attr, name
                return layout, ""
            best = min(best, err)
    return None, (f"its output differs from the experts formula {FORMULA} on its stacked weights (relative "
                  f"error {best:.3g} on random tokens routed to every expert, tolerance {tol:.1g}): it computes "
                  "something else, which MonarchExperts does not reproduce; the block stays dense")


def _experts_site(index: GraphIndex, fqn: str, names: dict[str, int]) -> Site:
    """The experts site of module ``fqn``, which the graph shows multiplying by the 3-D parameters ``names``
    ({name: experts}, names relative to the module that holds them)."""
    site = Site(fqn=fqn, kind=DIMENSION, pattern=PATTERN, replaces=[fqn])
    module = index.captured.modules[fqn]
    stacked = sorted(names)
    where = f"mixture-of-experts MLP: the experts' weights are stacked 3-D parameters {stacked} (a matrix per expert)"
    own = dict(module.named_parameters(recurse=False))
    if any(n not in own for n in stacked):
        return site.skip(f"{where}, which '{fqn}' multiplies by but does not hold; the block stays dense")
    if index.captured.calls.get(fqn, 1) > 1:
        return site.skip(f"{where}; the module runs more than once per forward (shared modules); converting it "
                         "would change every call")
    inputs = _call_inputs(index, fqn)
    if inputs is None:
        site.pattern = "stacked-weights"
        return site.skip(f"'{fqn}' multiplies by stacked 3-D parameters {stacked} but is not called as "
                         "mixture-of-experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)): not "
                         "an MLP the experts pattern converts (a recurrence such as RG-LRU, relative-attention "
                         "weights, or experts routed another way); it stays dense")
    if len(stacked) != 2:
        return site.skip(f"{where}: {len(stacked)} of them, where the experts formula reads two (gate_up and "
                         "down); the block stays dense")
    layouts = _candidate_layouts(module, stacked, *inputs)
    if not layouts:
        shapes = {n: tuple(getattr(module, n).shape) for n in stacked}
        return site.skip(f"{where}, shaped {shapes}: no (E, 2I or I, H) / (E, H, I) pair for the input width "
                         f"H={inputs[0]}; the block stays dense")
    used = {n for lay in layouts for n in (lay.gate_up, lay.down, lay.gate_up_bias, lay.down_bias) if n}
    extra = sorted(n for n, _ in module.named_parameters() if n not in used)
    if extra:
        return site.skip(f"{where}, and also parameters {extra} that the experts formula {FORMULA} does not "
                         "read; the block stays dense")
    acts = _acts(module, index, fqn)
    if not acts:
        return site.skip(f"{where}, but no activation was found (no parameter-free submodule, no activation op "
                         "by a known name); the block stays dense")
    layout, why = _check_experts(module, layouts, acts)
    if layout is None:
        return site.skip(f"{where}; {why}")
    site.layout = layout
    return site


def expert_sites(index: GraphIndex) -> list[Site]:
    """Sites for the mixture-of-experts modules of the graph: converted when the layout is confirmed,
    else skipped with the reason (see the module docstring).

    Example:
        >>> from m2convert.passes.capture import capture
        >>> config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        ...     num_experts_per_tok=2)
        >>> [site] = expert_sites(GraphIndex(capture(transformers.MixtralModel(config))))
        >>> site.fqn, site.status, site.layout.experts, site.layout.top_k, site.layout.activation
        ('layers.0.mlp.experts', 'convert', 4, 2, 'silu')
    """
    return [_experts_site(index, fqn, names) for fqn, names in _stacked_readers(index).items()]
