"""The analysis pass that finds dense MLP ("dimension") sites, and the registry of MLP patterns.

For every projection (the "down" linear), walk back from its input through elementwise ops only; the
projections where that walk stops are its sources. Each registered pattern reads that region:

    one source with an activation on the way       linear -> act -> linear          ("gelu-mlp", ...)
    two sources, act on one, multiplied together   act(gate(x)) * up(x) -> down     ("gated-mlp")
    one source split in two halves, act on one     gate, up = gate_up(x).chunk(2)   ("fused-gated-mlp")

Splits of the last dimension may sit on the way (a fused gate_up projection); anything else (a norm, a
residual add, a reshape, attention) means it is not an MLP, and an MLP maps the model width back to itself
(H -> I -> H), which leaves task heads (pooler -> classifier) alone.
A new MLP shape is one matcher plus :func:`register_mlp_pattern`. Mixture-of-experts modules, whose experts
are stacked parameters rather than linears, are found by :mod:`m2convert.passes.experts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from m2convert.layers.monarch import ACTIVATIONS as FOLDABLE

from m2convert.passes.experts import expert_sites
from m2convert.passes.graph import (ACTIVATIONS, GraphIndex, elementwise, common_prefix, feature_ranges, within,
                                   module_entry, op_name, projection_dims, users)
from m2convert.passes.registry import Pattern, PatternRegistry
from m2convert.passes.site import DIMENSION, MLPLayout, Role, Site


@dataclass
class MLPMatch:
    """What an MLP matcher found: role -> projection (``index.projections`` items), activation, name."""

    roles: dict
    activation: str | None
    pattern: str
    rows: dict = field(default_factory=dict)
    act_nodes: tuple = ()                    # the activation's nodes, between ``act_role``'s output and down
    act_role: str | None = None


MLPPattern = Pattern
MLP_PATTERNS = PatternRegistry("MLP pattern")
"""The MLP patterns :func:`find_mlps` tries for each projection, in order; the first match wins. A matcher
is ``match(index, down, region, sources) -> MLPMatch | None``, where ``region`` holds the elementwise nodes
between the ``sources`` projections and ``down``."""

register_mlp_pattern = MLP_PATTERNS.register
unregister_mlp_pattern = MLP_PATTERNS.unregister


def _region(index: GraphIndex, down) -> tuple[set, list, bool]:
    """(elementwise nodes between the sources and ``down``, source projections, clean)."""
    region, sources, stack = set(), [], [down.input]
    while stack:
        node = stack.pop()
        if node in region:
            continue
        proj = index.proj_of.get(node)
        if proj is not None:
            if proj not in sources:
                sources.append(proj)
            continue
        if node.op != "call_function" or not (elementwise(node) or op_name(node) in SPLITS):
            return region, sources, False
        region.add(node)
        stack.extend(index.data_inputs(node))
    sources.sort(key=lambda p: index.order[p.output])
    return region, sources, True


def _forward_reach(start: fx.Node, region: set) -> set:
    seen, stack = set(), [start]
    while stack:
        for user in users(stack.pop()):
            if user in region and user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def activation_name(index: GraphIndex, nodes) -> str | None:
    """'gelu', 'silu', 'relu'... for the activation among ``nodes`` (module class names win); for another
    nonlinear elementwise function, its activation module's class name ('xielu' for XIELUActivation, else
    'elementwise'); None when ``nodes`` compute nothing nonlinear."""
    classes = " ".join((module_entry(n) or ("", "", 0))[1].lower() for n in nodes)
    for name in ("gelu", "silu", "swish", "relu", "mish"):
        if name in classes:
            return "silu" if name == "swish" else name
    names = [ACTIVATIONS[op_name(n)] for n in nodes if op_name(n) in ACTIVATIONS]
    owners = [e[1].lower().removesuffix("activation") for e in map(module_entry, nodes)
              if e and e[1].lower().endswith("activation")]
    if owners and owners[0]:
        return owners[0]                          # an activation module of its own kind: XIELUActivation
    return names[0] if names else None


# Ops that make an elementwise region a nonlinear activation (not just a scale, a cast or dropout).
NONLINEAR = frozenset(f"aten.{op}" for op in ("where", "expm1", "exp", "log", "min", "max", "minimum", "maximum",
                                                "clamp", "clamp_min", "clamp_max", "abs", "pow", "square"))


# Ops that cut a fused projection's output into its parts (HF Phi3's gate_up_proj, ModernBERT's Wi).
SPLITS = frozenset(("aten.chunk", "aten.split", "aten.split_with_sizes", "aten.slice", "aten.unbind", "getitem"))


@register_mlp_pattern("fused-gated-mlp")
def match_fused_gated_mlp(index: GraphIndex, down, region, sources) -> MLPMatch | None:
    # HF Phi3 MLP: gate, up = gate_up_proj(x).chunk(2, -1); down(up * act(gate))
    # HF ModernBERT MLP: input, gate = Wi(x).chunk(2, -1); Wo(act(input) * gate)
    if len(sources) != 1:
        return None
    pieces = [n for n in region if op_name(n) in SPLITS and not any(op_name(u) in SPLITS for u in users(n))]
    if len(pieces) != 2:
        return None
    reach = [_forward_reach(p, region) | {p} for p in pieces]
    acts = [activation_name(index, r - reach[1 - i]) for i, r in enumerate(reach)]
    if sum(a is not None for a in acts) != 1 or not any(op_name(n) == "aten.mul" for n in reach[0] & reach[1]):
        return None
    gate = 0 if acts[0] else 1
    orders = [index.feature_order(sources[0], p) for p in pieces]
    if None in orders:
        return None
    return MLPMatch({"gate": sources[0], "up": sources[0], "down": down}, acts[gate], "fused-gated-mlp",
                    rows={"gate": feature_ranges(orders[gate]), "up": feature_ranges(orders[1 - gate])})


@register_mlp_pattern("act-mlp")
def match_act_mlp(index: GraphIndex, down, region, sources) -> MLPMatch | None:
    # HF BERT / GPT-2 MLP: fc1 -> act -> fc2 (named after its activation: "gelu-mlp", "relu-mlp"...)
    if len(sources) != 1:
        return None
    act = activation_name(index, region)
    if act is None:
        return None
    return MLPMatch({"fc1": sources[0], "fc2": down}, act, f"{act}-mlp", act_nodes=tuple(region), act_role="fc1")


@register_mlp_pattern("gated-mlp")
def match_gated_mlp(index: GraphIndex, down, region, sources) -> MLPMatch | None:
    # HF Llama MLP: down(act(gate(x)) * up(x)); gate and up read the same input
    if len(sources) != 2 or sources[0].input is not sources[1].input:
        return None
    reach = [_forward_reach(s.output, region) for s in sources]
    acts = [activation_name(index, r - reach[1 - i]) for i, r in enumerate(reach)]
    if sum(a is not None for a in acts) != 1 or not any(op_name(n) == "aten.mul" for n in reach[0] & reach[1]):
        return None
    gate = 0 if acts[0] else 1
    return MLPMatch({"gate": sources[gate], "up": sources[1 - gate], "down": down}, acts[gate], "gated-mlp",
                    act_nodes=tuple(reach[gate] - reach[1 - gate]), act_role="gate")


def match_elementwise_mlp(index: GraphIndex, down, region, sources) -> MLPMatch | None:
    """The fallback after every registered pattern: fc1 -> a nonlinear elementwise function no pattern
    names (a where / expm1 / min chain, an unnamed product like h * |h|) -> fc2, as "elementwise-mlp"."""
    if len(sources) != 1 or not any(op_name(n) in NONLINEAR for n in region):
        return None
    return MLPMatch({"fc1": sources[0], "fc2": down}, None, "elementwise-mlp", act_nodes=tuple(region), act_role="fc1")


def mlp_site(index: GraphIndex, down) -> Site | None:
    """The MLP site ending at projection ``down``, or None if ``down`` does not end an MLP."""
    region, sources, clean = _region(index, down)
    if not clean or not region or not sources:
        return None
    found = next((m for p in MLP_PATTERNS if (m := p.match(index, down, region, sources)) is not None), None)
    found = found or match_elementwise_mlp(index, down, region, sources)
    if found is None:
        return None
    roles = found.roles
    if projection_dims(sources[0].module)[0] != projection_dims(down.module)[1]:
        return None                                   # not H -> I -> H (e.g. pooler -> classifier head)
    fqn = common_prefix([p.fqn for p in roles.values()])
    site = Site(fqn=fqn, kind=DIMENSION, pattern=found.pattern,
                replaces=list(dict.fromkeys(p.fqn for p in roles.values())),
                roles={r: Role(p.fqn, found.rows.get(r)) for r, p in roles.items()}, layout=MLPLayout(found.activation))
    cap = index.captured
    shared = [p.fqn for p in roles.values() if p.call > 0 or cap.calls.get(p.fqn, 1) > 1]
    if shared:
        return site.skip(f"{shared} run more than once per forward (shared modules); converting them would "
                         "change every call")
    allowed = region | down.nodes
    for node in [*region, *(s.output for s in sources)]:
        outside = [u for u in users(node) if u not in allowed]
        if outside:
            where = sorted({(module_entry(u) or ("the model output",))[0] or "the model" for u in outside})
            return site.skip(f"the intermediate value '{node.name}' ({op_name(node)}) is also used outside the "
                             f"MLP by {where}; converting would change what they read")
    fold = foldable_activation(index, found)
    if fold is not None:
        site.layout.fold_module, site.layout.fold = fold
        site.layout.fold_role = found.act_role
    return site


def foldable_activation(index: GraphIndex, found: MLPMatch) -> tuple[str, str] | None:
    """(module path, ``MonarchLinear.activation``) when the MLP's activation can run inside its projection.

    It can when every node of the activation runs in one parameter-free module of its own (not the MLP's
    parent, not shared with another path, called once) whose values equal one of MonarchLinear's
    activations within 1e-6 on [-8, 8]: then the projection applies it to its output as it writes it
    (no second (..., I) tensor, no extra pass) and the module becomes the identity.
    """
    if found.act_role is None or not found.act_nodes:
        return None
    entries = {module_entry(n) for n in found.act_nodes}
    if len(entries) != 1 or None in entries:
        return None
    fqn, _, call = entries.pop()
    cap = index.captured
    module = cap.modules.get(fqn)
    if (module is None or call or cap.calls.get(fqn, 1) != 1 or len(cap.shared.get(fqn, (fqn,))) > 1
            or any(True for _ in module.parameters()) or any(within(p.fqn, fqn) for p in found.roles.values())):
        return None
    name = matching_activation(module, found.activation)
    return None if name is None else (fqn, name)


def matching_activation(module, hint: str | None) -> str | None:
    """The MonarchLinear activation whose values ``module`` reproduces within 1e-6 on [-8, 8] (the one named
    like ``hint`` tried first), or None."""
    t = torch.linspace(-8, 8, 4001)
    try:
        with torch.no_grad():
            want = module(t.clone())
    except Exception:                              # an activation module that does not take a plain tensor
        return None
    if not isinstance(want, torch.Tensor) or want.shape != t.shape:
        return None
    for name in sorted(FOLDABLE, key=lambda k: not (hint and k.startswith(hint))):
        if torch.allclose(FOLDABLE[name].apply(t), want, rtol=0, atol=1e-6):
            return name
    return None


def find_mlps(ctx):
    """Pass: linear -> act -> linear and gated MLP sites (projections already in attention sites excluded)."""
    # HF BERT / GPT-2 MLP: dense -> GELU -> dense;  HF Llama MLP: down(silu(gate(x)) * up(x))
    claimed = {r.path for s in ctx.sites for r in s.roles.values()}
    count = 0
    for down in ctx.index.projections:
        site = mlp_site(ctx.index, down)
        if site is None or any(r.path in claimed for r in site.roles.values()):
            continue
        count += 1
        ctx.add(site, f"{site.pattern} fired at '{site.fqn or '(model)'}' ({', '.join(site.replaces)})")
    for site in expert_sites(ctx.index):             # mixture-of-experts modules (passes/experts.py)
        count += 1
        ctx.add(site, f"{site.pattern} found at '{site.fqn}'")
    return count
