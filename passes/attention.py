"""The analysis pass that finds attention ("sequence") sites from the cores of the registered patterns.

Each registered pattern (:mod:`m2convert.passes.attention_patterns`, re-exported here) is one matcher,
``match(index) -> list[AttentionCore]``, that finds attention cores (``aten.scaled_dot_product_attention``,
or a QK product -> elementwise chain -> softmax -> product with V). One analysis turns every core into a
typed site: Q, K, V traced back to their projections (the rows of each role in a fused QKV projection),
O found after the core, the owning module (the deepest module holding all four), causality read from
``is_causal`` or from which keys each query may see, sliding windows read from the model config, and what
the module does after O (nothing, dropout, or BERT's residual LayerNorm) so an adapter can reproduce it.
A new way of writing attention is one matcher plus :func:`register_attention_pattern`; nothing else changes.
"""

from __future__ import annotations

import inspect

import torch
from torch import fx, nn

from m2convert.passes.attention_patterns import (ATTENTION_PATTERNS, AttentionCore, AttentionPattern,  # noqa: F401
                                                attention_pattern, register_attention_pattern,
                                                unregister_attention_pattern)
from m2convert.passes.attention_bias import offset_bias
from m2convert.passes.attention_mask import causality, chunk_size, chunked, sliding_window
from m2convert.passes.attention_rows import input_reason
from m2convert.passes.graph import (RESHAPES, GraphIndex, common_prefix, feature_ranges, module_path, op_name,
                                   projection_dims, users, within)
from m2convert.passes.site import SEQUENCE, AttentionLayout, NormLayout, Role, Site


def _output_projection(index: GraphIndex, node: fx.Node):
    """The projection the core's output reaches through reshapes only (O), or None."""
    cur = node
    for _ in range(16):
        nxt = [u for u in users(cur) if u in index.proj_of or op_name(u) in RESHAPES]
        if len(nxt) != 1:
            return None
        proj = index.proj_of.get(nxt[0])
        if proj is not None:
            return proj if proj.input is cur else None
        cur = nxt[0]
    return None


def _output_roles(index: GraphIndex, core, projs: dict, owner: str):
    """(O, the output gate or None) of a core, added to ``projs`` as roles "o" and "gate"; or why not."""
    o, gate = _output_projection(index, core.node), None
    if o is None:
        gate = _gated_output(index, core.node, owner.rpartition(".")[0] if owner.count(".") else owner)
        if gate is None:
            return _before_output(index, core.node, owner)
        o, projs["gate"] = gate[0], gate[1]
        if gate[1].input is not projs["q"].input:
            return f"the attention output is gated by '{gate[1].fqn}', which reads another input than Q's"
    projs["o"] = o
    return o, gate


def _fused_rows(index: GraphIndex, site: Site, projs: dict, targets: dict) -> str | None:
    """Set the rows of each role whose projection also feeds another role (a fused QKV, Q with its gate);
    returns why they cannot be told apart, or None."""
    roles = [r for r in targets if r in projs]
    for role in roles:
        if sum(projs[r] is projs[role] for r in roles) > 1:
            order = index.feature_order(projs[role], targets[role])
            if order is None:
                return (f"fused projection '{projs[role].fqn}': cannot tell which outputs feed {role.upper()} "
                        "(they do not reach it through reshapes, splits and selects)")
            site.roles[role].rows = feature_ranges(order)
    return None


def _latent_chains(index: GraphIndex, projs: dict, owner: str) -> str | None:
    """Why Q and K/V read different tensors when both are low-rank projections of the same input (multi-head
    latent attention: x -> q_a -> norm -> q_b, x -> kv_a -> norm -> kv_b), or None (cross-attention)."""
    def first(role):
        ups = index.nearest_projections(projs[role].input, owner)
        return ups[0] if len(ups) == 1 else None
    chains = {r: first(r) for r in "qkv"}
    sources = {(chains[r] or projs[r]).input for r in "qkv"}
    if len(sources) != 1 or not any(chains.values()):
        return None
    shown = "; ".join(dict.fromkeys(f"'{chains[r].fqn}' -> '{projs[r].fqn}'" if chains[r] else f"'{projs[r].fqn}'"
                                    for r in "qkv"))
    return (f"multi-head latent attention: Q, K and V are low-rank projections of the same input ({shown}), "
            "which the mixer's one in_proj does not factor yet")


GATES = {"aten.sigmoid": "sigmoid"}


def _gated_output(index: GraphIndex, node: fx.Node, scope: str):
    """(O, gate projection, the node the gate's activation reads, activation name) when the core's output
    reaches O through reshapes and one product with sigmoid(a projection): an output gate (Qwen3-Next's);
    else None."""
    cur, gate = node, None
    for _ in range(16):
        nxt = [u for u in users(cur) if u in index.proj_of or op_name(u) in RESHAPES or op_name(u) == "aten.mul"]
        if len(nxt) != 1:
            return None
        step = nxt[0]
        if step in index.proj_of:
            proj = index.proj_of[step]
            return (proj, *gate) if gate is not None and proj.input is cur else None
        if op_name(step) == "aten.mul":
            others = [a for a in step.args if isinstance(a, fx.Node) and a is not cur]
            act = others[0] if gate is None and len(others) == 1 else None
            while act is not None and op_name(act) in RESHAPES:
                act = act.args[0]
            if act is None or op_name(act) not in GATES:
                return None
            found = index.nearest_projections(act.args[0], scope)
            if len(found) != 1:
                return None
            gate = (found[0], act.args[0], GATES[op_name(act)])
        cur = step
    return None


def _before_output(index: GraphIndex, node: fx.Node, owner: str, steps: int = 12) -> str:
    """Why no output projection follows the core: the ops (other than reshapes) on its way to the first
    projection inside the attention module, and the projections their other operands come from (an output
    gate, a differential pair of cores, a mixture of heads), or that no projection follows at all."""
    scope = owner.rpartition(".")[0] if owner.count(".") else owner
    parents, frontier, proj = {node: None}, [node], None
    for _ in range(steps):
        reached = []
        for n in frontier:
            for u in users(n):
                if u not in parents and within(module_path(u), scope):
                    parents[u] = n
                    reached.append(u)
        frontier = reached
        proj = next((index.proj_of[u] for u in frontier if u in index.proj_of), None)
        if proj is not None or not frontier:
            break
    if proj is None or proj.input not in parents:
        return (f"no output projection follows the attention core in '{owner}' (only reshapes may sit between "
                "them, and no projection follows within a few ops)")
    path, cur = [], proj.input
    while cur is not None and cur is not node:
        path.append(cur)
        cur = parents.get(cur)
    ops = [op_name(n) for n in reversed(path) if op_name(n) not in RESHAPES]
    sources = sorted({p.fqn for n in path for a in index.data_inputs(n) if a not in parents
                      for p in index.nearest_projections(a, scope)})
    with_what = f", with {sources}" if sources else ""
    return (f"the attention output reaches the output projection '{proj.fqn}' through {ops}{with_what} (an "
            f"output gate or other arithmetic between the core and O, in '{owner}'), which the M2 adapters do not "
            "reproduce")


def _tail(index: GraphIndex, fqn: str, o, hidden: fx.Node, site_nodes: set, outputs: list):
    """What the module does after O: (kind, final node, dropout p, extra) or a reason.

    kind is 'plain' (O, maybe dropout, is the output), 'post-norm' (BERT: LayerNorm(O + hidden); extra
    is the norm node) or 'residual' (Bloom: O + a tensor the module is given; extra is that tensor).
    """
    cur, dropout = o.output, 0.0
    while cur not in outputs:
        nxt = [u for u in users(cur) if u in site_nodes]
        if len(nxt) != 1 or op_name(nxt[0]) not in PASS_THROUGH:
            break
        cur = nxt[0]
        if op_name(cur) == "aten.dropout":
            dropout = float(cur.args[1])
    if cur in outputs:
        return "plain", cur, dropout, None
    # HF BERT sdpa/eager path: BertSelfOutput = LayerNorm(dropout(dense(x)) + hidden_states)
    add = users(cur)[0] if len(users(cur)) == 1 else None
    if add is not None and op_name(add) == "aten.add" and hidden in add.args and len(users(add)) == 1:
        norm = users(add)[0]
        if op_name(norm) == "aten.layer_norm" and norm in outputs and isinstance(
                index.captured.modules.get(module_path(norm)), nn.LayerNorm):
            return "post-norm", norm, dropout, norm
    residual = _residual_operand(add, cur, site_nodes, outputs)
    if residual is not None:
        return "residual", add, dropout, residual
    after = sorted({op_name(u) for u in users(cur)})
    return (f"the output projection '{o.fqn}' is followed inside '{fqn}' by {after}, which the "
            "M2 adapters do not reproduce (they handle none, dropout, a residual LayerNorm, or adding one of "
            "the module's inputs)")


def _residual_operand(add, cur: fx.Node, site_nodes: set, outputs: list) -> fx.Node | None:
    """The tensor from outside the module that ``add`` (the module's output) adds to O, else None.

    HF Bloom: ``dropout_add(dense(x), residual, p, training)`` = residual + dropout(O); the residual
    may itself pass through dropout or a copy inside the module.
    """
    if add is None or op_name(add) != "aten.add" or add not in outputs or len(add.args) != 2:
        return None
    if add.kwargs.get("alpha", 1) != 1 or cur not in add.args:
        return None
    other = add.args[1] if add.args[0] is cur else add.args[0]
    while isinstance(other, fx.Node) and other in site_nodes and op_name(other) in PASS_THROUGH:
        other = other.args[0]
    if not isinstance(other, fx.Node) or other in site_nodes or other is cur:
        return None
    return other


def _residual_arg(index: GraphIndex, fqn: str, node: fx.Node, hidden: fx.Node, names: list[str]):
    """(the forward parameter of ``fqn`` that passes ``node`` in, None) or (None, why not).

    The graph holds the value, not the parameter: the one forward input equal to ``node``'s value on
    the example inputs (the hidden states themselves when ``node`` is Q's input) names it.
    """
    if node is hidden:
        return names[0], None
    try:
        value = index.evaluate([node])[node]
        given = index.captured.module_inputs(fqn)
    except Exception as exc:                                    # a value we cannot rerun
        return None, f"could not evaluate the residual '{node.name}': {type(exc).__name__}: {exc}"
    same = [name for name, t in given.items() if name != names[0] and isinstance(t, torch.Tensor)
            and isinstance(value, torch.Tensor) and t.shape == value.shape and t.dtype == value.dtype
            and torch.allclose(t, value, rtol=1e-5, atol=1e-6)]
    if len(same) != 1 or same[0] not in names:
        found = "none" if not same else same
        return None, (f"the output of '{fqn}' adds '{node.name}' ({op_name(node)} in "
                      f"'{module_path(node) or 'the model'}'), but which of its forward inputs that is cannot be "
                      f"told (matching inputs: {found}); the M2 adapters add a residual only from a named input")
    return same[0], None


# Ops that pass O through unchanged on the way to the module's output (eval-mode dropout, copies).
PASS_THROUGH = ("aten.dropout", "aten.clone", "aten.alias")


def _arg_names(module: nn.Module) -> list[str]:
    params = inspect.signature(type(module).forward).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in
            (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def attention_site(index: GraphIndex, core: AttentionCore) -> Site:
    """Analyse one attention core into a Site (status "skip" with a reason when it cannot convert)."""
    cap = index.captured
    owner = module_path(core.node)
    site = Site(fqn=owner, kind=SEQUENCE, pattern=core.pattern, replaces=[owner])
    found = {}
    for scope in (owner, owner.rpartition(".")[0]):
        found = {r: index.nearest_projections(a, scope) for r, a in (("q", core.q), ("k", core.k), ("v", core.v))}
        if all(len(f) == 1 for f in found.values()):
            break
    bad = [r for r, f in found.items() if len(f) != 1]
    if bad:
        return site.skip(f"could not trace {'/'.join(bad).upper()} back to one projection inside '{owner}'")
    projs = {r: f[0] for r, f in found.items()}
    out = _output_roles(index, core, projs, owner)
    if isinstance(out, str):
        return site.skip(out)
    o, gate = out
    fqn = common_prefix([p.fqn for p in projs.values()] + [owner])
    site.fqn, site.replaces = fqn, [fqn]
    site.roles = {r: Role(p.fqn) for r, p in projs.items()}
    if not fqn:
        site.replaces = list(dict.fromkeys(p.fqn for p in projs.values()))
        return site.skip("the attention projections share no module below the model itself")
    if len({projs[r].input for r in "qkv"}) != 1:
        latent = _latent_chains(index, projs, owner)
        if latent:
            return site.skip(latent)
        site.pattern = "cross-attention"
        return site.skip("cross-attention: keys/values come from another sequence than the queries")
    rows = input_reason(index, fqn, projs["q"])
    if rows:
        return site.skip(rows)
    if cap.calls.get(fqn, 1) > 1 or any(p.call > 0 for p in projs.values()):
        return site.skip(f"'{fqn}' runs {cap.calls.get(fqn)} times per forward (shared module); converting "
                         "it would change every call")
    fused = _fused_rows(index, site, projs, {"q": core.q, "k": core.k, "v": core.v, "gate": gate[2] if gate else None})
    if fused:
        return site.skip(fused)
    causal, window, why = causality(index, core)
    site.causal = causal
    if why:
        return site.skip(why)
    # A window (or chunk) wider than the capture is not in its mask: the module or config names it.
    if chunk := chunk_size(cap.modules.get(owner), cap.model):
        site.causal = None
        return site.skip(chunked(chunk, "model config"))
    window = window or sliding_window(cap.modules.get(owner), cap.model)
    after = _after_output(index, fqn, projs, o)
    if isinstance(after, str):
        return site.skip(after)
    *after, feeds = after
    site = _fill_layout(site, index, core, projs, *after)
    if site.layout is not None:
        site.layout.window, site.layout.feeds = window, feeds
        site.layout.output_gate = gate[3] if gate else None
    return site


def _after_output(index: GraphIndex, fqn: str, projs: dict, o):
    """(kind, dropout p, kept norm node, residual parameter) of what ``fqn`` does after O, or why the
    adapters cannot reproduce it (including values the site computes that are read outside it)."""
    site_nodes = {n for n in index.nodes if n.op == "call_function" and within(module_path(n), fqn)}
    outputs = [n for n in site_nodes if any(u not in site_nodes for u in users(n))]
    tail = _tail(index, fqn, o, projs["q"].input, site_nodes, outputs)
    if isinstance(tail, str):
        return tail
    kind, final, dropout, extra = tail
    norm, residual = (extra, None) if kind == "post-norm" else (None, None)
    if kind == "residual":
        names = _arg_names(index.captured.modules[fqn])
        residual, why = _residual_arg(index, fqn, extra, projs["q"].input, names)
        if why:
            return why
    reused = [n for n in outputs if n is not final]
    feeds = sorted({module_path(u) or "the model output" for n in reused for u in users(n) if u not in site_nodes})
    if reused and "the model output" in feeds:
        n = reused[0]
        return (f"'{n.name}' ({op_name(n)} in '{module_path(n)}') is also used outside the site by "
                f"{feeds}; converting would change that value")
    return kind, dropout, norm, residual, feeds


def _fill_layout(site: Site, index: GraphIndex, core, projs, kind, dropout, norm, residual=None) -> Site:
    cap = index.captured

    def width(role: str) -> int:
        return site.roles[role].width(projection_dims(projs[role].module)[1])

    hidden = projection_dims(projs["q"].module)[0]
    o_in, o_out = projection_dims(projs["o"].module)
    inner = width("q")                            # heads x head_dim: H, or wider / narrower heads
    if o_in != inner or o_out != hidden:
        return site.skip(f"Q outputs {inner} and O maps {o_in} -> {o_out}, but the model width is {hidden}; "
                         f"the mixer needs O to map Q's {inner} channels back to {hidden}")
    qval = core.q.meta.get("val")
    heads = qval.shape[1] if qval is not None and qval.dim() == 4 else 1
    sval = core.scores.meta.get("val") if core.scores is not None else None
    if heads == 1 and sval is not None and sval.dim() == 4 and inner % sval.shape[1] == 0:
        heads = sval.shape[1]                     # Bloom's (B * heads, N, d) queries, (B, heads, N, N) scores
    head_dim = inner // heads
    kv = width("k")
    if width("v") != kv or kv % head_dim or inner % kv:
        return site.skip(f"K/V widths {kv}/{width('v')} are not a whole number of {head_dim}-wide heads "
                         f"dividing Q's {inner} channels")
    structure = cap.outputs.get(site.fqn, {"type": "tensor"})
    if structure["type"] not in ("tensor", "tuple"):
        return site.skip(f"'{site.fqn}' returns {structure['type']}; adapters reproduce tensors and tuples")
    module = cap.modules[site.fqn]
    kept_norm = None
    if norm is not None:
        ln = cap.modules[module_path(norm)]
        kept_norm = NormLayout(module_path(norm), ln.eps, ln.elementwise_affine, ln.bias is not None)
    site.layout = AttentionLayout(
        adapter="M2PostNormAttention" if kind == "post-norm" else "M2Attention", hidden=hidden, heads=heads,
        kv_heads=kv // head_dim, head_dim=head_dim, arg_names=_arg_names(module),
        num_outputs=structure.get("len", 0), dropout=dropout, module_class=type(module).__name__,
        norm=kept_norm, residual=residual, inner=None if inner == hidden else inner,
        offset_bias=None if site.causal is None else offset_bias(index, core, heads, site.causal))
    return site


def find_attention(ctx) -> int:
    """Pass: attention sites from every registered pattern's cores. Returns the cores found.

    A core two patterns both find (the same output node) becomes one site, from the first pattern.
    """
    seen = set()
    for pattern in ATTENTION_PATTERNS:
        for core in pattern.match(ctx.index):
            if core.node in seen:
                continue
            seen.add(core.node)
            core.pattern = core.pattern or pattern.name
            ctx.add(attention_site(ctx.index, core), f"{core.pattern} fired at '{module_path(core.node)}'")
    return len(seen)
