"""The analysis pass that finds attention ("sequence") sites, and the registry of attention patterns.

Each registered pattern is one matcher, ``match(index) -> list[AttentionCore]``, that finds attention
cores written one way (``aten.scaled_dot_product_attention``, or matmul -> softmax -> matmul). One
analysis turns every core into a typed site: Q, K, V traced back to their projections, O found after the
core, the owning module (the deepest module holding all four), causality read from ``is_causal`` or by
evaluating the mask, and what the module does after O (nothing, dropout, or BERT's residual LayerNorm)
so an adapter can reproduce it. A new way of writing attention is one matcher plus
:func:`register_attention_pattern`; nothing else changes.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from m2convert.passes.graph import (RESHAPES, GraphIndex, common_prefix, module_path, op_name, projection_dims, users,
                    within)
from m2convert.passes.site import SEQUENCE, AttentionLayout, NormLayout, Role, Site

MATMULS = ("aten.matmul", "aten.bmm")
SOFTMAXES = ("aten.softmax", "aten._softmax", "aten._safe_softmax")
SCORE_OPS = ("aten.mul", "aten.div", "aten.to", "aten._to_copy", "aten.clone", "aten.view", "aten.reshape")
PROB_OPS = ("aten.to", "aten._to_copy", "aten.dropout", "aten.clone", "aten.type_as")
SPLITS = ("aten.split", "aten.split_with_sizes", "aten.chunk")


class AttentionCore:
    """The softmax(Q K^T) V core a matcher found.

    Args:
        node: the node computing the core's output (B, heads, N, d), e.g. the probs @ V matmul.
        pattern: the matching pattern's name (the registry sets it when a matcher leaves it empty).
        q, k, v: the nodes feeding the core as queries, keys and values (traced back to projections).
        mask: the attention mask node added to the scores, or None.
        is_causal: the core applies a causal mask by itself (SDPA's ``is_causal``).
    """

    def __init__(self, node, pattern, q, k, v, mask=None, is_causal=False):
        self.node, self.pattern = node, pattern
        self.q, self.k, self.v = q, k, v
        self.mask = mask if isinstance(mask, fx.Node) else None
        self.is_causal = bool(is_causal)


@dataclass(frozen=True)
class AttentionPattern:
    """A registered way of writing attention: its name and its matcher ``match(index) -> cores``."""

    name: str
    match: Callable[[GraphIndex], list]


ATTENTION_PATTERNS: list[AttentionPattern] = []
"""The attention patterns :func:`find_attention` runs, in order; a core found twice keeps the first match."""


def register_attention_pattern(name: str):
    """Decorator registering ``match(index) -> list[AttentionCore]`` as attention pattern ``name``.

    Example:
        >>> @register_attention_pattern("my-attention")
        ... def match_mine(index):
        ...     return []
        >>> [p.name for p in ATTENTION_PATTERNS][-1]
        'my-attention'
        >>> unregister_attention_pattern("my-attention")
    """
    def register(match):
        if any(p.name == name for p in ATTENTION_PATTERNS):
            raise ValueError(f"attention pattern {name!r} is already registered")
        ATTENTION_PATTERNS.append(AttentionPattern(name, match))
        return match
    return register


def unregister_attention_pattern(name: str) -> None:
    """Remove attention pattern ``name`` from the registry (a no-op when it is not there)."""
    ATTENTION_PATTERNS[:] = [p for p in ATTENTION_PATTERNS if p.name != name]


@contextlib.contextmanager
def attention_pattern(name: str, match):
    """Register ``match`` as attention pattern ``name`` for the duration of a ``with`` block."""
    register_attention_pattern(name)(match)
    try:
        yield
    finally:
        unregister_attention_pattern(name)


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


@register_attention_pattern("sdpa-attention")
def match_sdpa(index: GraphIndex) -> list[AttentionCore]:
    # HF BERT / GPT-2 / Llama sdpa path:
    #   q, k, v (B, heads, N, d) -> aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    return [AttentionCore(n, "sdpa-attention", n.args[0], n.args[1], n.args[2],
                          _arg(n, 3, "attn_mask"), _arg(n, 5, "is_causal", False))
            for n in index.calls("aten.scaled_dot_product_attention")]


def _reaches(node, ops, depth: int = 6) -> bool:
    frontier = [node]
    for _ in range(depth):
        if any(isinstance(n, fx.Node) and op_name(n) in ops for n in frontier):
            return True
        frontier = [i for n in frontier if isinstance(n, fx.Node) for i in n.all_input_nodes]
    return False


@register_attention_pattern("eager-attention")
def match_eager(index: GraphIndex) -> list[AttentionCore]:
    # HF eager path (eager_attention_forward of BERT, GPT-2, Llama):
    #   scores = matmul(q, k^T) [* scale] [+ mask | where(mask, ., min)]
    #   probs = softmax(scores, -1) [-> to / dropout];  out = matmul(probs, v)
    cores = []
    for softmax in index.calls(*SOFTMAXES):
        cur, mask = softmax.args[0], None
        for _ in range(8):
            op = op_name(cur)
            if op in MATMULS:
                break
            tensors = [a for a in cur.args if isinstance(a, fx.Node)]
            if op == "aten.add":                                          # scores + additive mask
                scores = [a for a in tensors if _reaches(a, MATMULS)]
                if len(tensors) != 2 or len(scores) != 1:
                    break
                mask, cur = (tensors[1] if tensors[0] is scores[0] else tensors[0]), scores[0]
            elif op == "aten.where":                                      # where(mask, scores, fill)
                scores = [a for a in tensors[1:] if _reaches(a, MATMULS)]
                if len(scores) != 1:
                    break
                mask, cur = tensors[0], scores[0]
            elif op in SCORE_OPS and tensors:
                cur = tensors[0]
            else:
                break
        if op_name(cur) not in MATMULS:
            continue
        probs = softmax
        while len(users(probs)) == 1 and op_name(users(probs)[0]) in PROB_OPS:
            probs = users(probs)[0]
        out = next((u for u in users(probs) if op_name(u) in MATMULS and u.args[0] is probs), None)
        if out is not None:
            cores.append(AttentionCore(out, "eager-attention", cur.args[0], cur.args[1], out.args[1], mask))
    return cores


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


def _last_dim(node: fx.Node, dim) -> bool:
    ndim = len(node.args[0].meta["val"].shape)
    return dim % ndim == ndim - 1


def _split_rows(index: GraphIndex, proj, arg: fx.Node):
    """Ranges [[start, stop), ...] of ``proj``'s outputs that reach ``arg`` in a fused QKV projection.

    Follows the projection's output through views that cut its last dim into per-head blocks and
    transposes that keep it last, to a split/chunk/slice of the last dim:
    HF GPT-2:    c_attn (B, N, 3H) -> split(H, dim=2) -> getitem r           one range per role
    HF GPT-NeoX: qkv (B, N, 3H) -> view(B, N, heads, 3d) -> transpose(1, 2) -> chunk(3, -1) -> getitem r
                 one range of d rows per head.
    """
    ancestors, stack = set(), [arg]
    while stack:
        n = stack.pop()
        if n not in ancestors and n not in proj.nodes:
            ancestors.add(n)
            stack.extend(n.all_input_nodes)
    out_dim = projection_dims(proj.module)[1]
    frontier = [(proj.output, out_dim)]                 # (node, width of one block of the last dim)
    while frontier:
        node, width = frontier.pop()
        for user in users(node):
            if user not in ancestors:
                continue
            op = op_name(user)
            if op in ("aten.view", "aten.reshape", "aten._unsafe_view"):
                last = user.meta["val"].shape[-1]
                if width % last == 0:
                    frontier.append((user, last))
            elif op == "aten.transpose" and not any(_last_dim(user, d) for d in user.args[1:3]):
                frontier.append((user, width))
            elif op == "aten.slice" and _last_dim(user, _arg(user, 1, "dim", 0)):
                start, stop = _arg(user, 2, "start", 0) or 0, min(_arg(user, 3, "end", width), width)
                return [[h * width + start, h * width + stop] for h in range(out_dim // width)]
            elif op in SPLITS and _last_dim(user, _arg(user, 2, "dim", 0)):
                if op == "aten.chunk":
                    sizes = [-(-width // user.args[1])] * user.args[1]
                elif isinstance(user.args[1], int):
                    sizes = [user.args[1]] * (-(-width // user.args[1]))
                else:
                    sizes = list(user.args[1])
                item = next((i for i in users(user) if i in ancestors and op_name(i) == "getitem"), None)
                if item is not None:
                    start = sum(sizes[: item.args[1]])
                    stop = min(start + sizes[item.args[1]], width)
                    return [[h * width + start, h * width + stop] for h in range(out_dim // width)]
    return None


def _causality(index: GraphIndex, core: AttentionCore) -> tuple[bool | None, str | None]:
    """Read causal vs bidirectional from is_causal or from the mask's value on the example inputs."""
    if core.mask is None:
        return core.is_causal, None
    key = ("mask", core.mask)
    if key not in index._cache:
        try:
            index._cache[key] = index.evaluate([core.mask])[core.mask]
        except Exception as exc:                          # a mask built from something we cannot rerun
            index._cache[key] = f"could not evaluate the attention mask: {type(exc).__name__}: {exc}"
    value = index._cache[key]
    if isinstance(value, str):
        return None, value
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None, f"the attention mask '{core.mask.name}' is not a (.., N, N) tensor"
    if value.is_meta:                # capture refuses meta models; meta example inputs still end up here
        return None, ("the attention mask has no values (it was computed on the 'meta' device); plan with "
                      "real weights and example inputs on CPU")
    allowed = value if value.dtype == torch.bool else value > torch.finfo(value.dtype).min / 2
    grids = allowed.reshape(-1, *allowed.shape[-2:])                     # (B * heads, Nq, Nk)
    # Judge on a row without padding (the last query of a causal or full mask sees every real key);
    # with padding everywhere, on the real tokens of the first row.
    full = [g for g in grids if bool(g[-1].all())]
    grid = full[0] if full else grids[0][grids[0][-1]][:, grids[0][-1]]  # (Nq, Nk)
    if bool(grid.all()):
        return core.is_causal, None
    if grid.shape[0] == grid.shape[1] and torch.equal(grid, torch.ones_like(grid).tril()):
        return True, None
    return None, ("the attention mask is neither full nor causal (sliding window, prefix-LM or a custom "
                  "pattern); the M2 mixers model only these two; exclude the site with overrides")


def _tail(index: GraphIndex, fqn: str, o, hidden: fx.Node, site_nodes: set, outputs: list):
    """What the module does after O: ('plain'|'post-norm', final node, dropout p, norm node) or a reason."""
    cur, dropout = o.output, 0.0
    while cur not in outputs:
        nxt = [u for u in users(cur) if u in site_nodes]
        if len(nxt) != 1 or op_name(nxt[0]) not in ("aten.dropout", "aten.clone", "aten.alias"):
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
    after = sorted({op_name(u) for u in users(cur)})
    return (f"the output projection '{o.fqn}' is followed inside '{fqn}' by {after}, which the "
            "M2 adapters do not reproduce (they handle none, dropout, or a residual LayerNorm)")


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
    o = _output_projection(index, core.node)
    if o is None:
        return site.skip(f"no output projection follows the attention core in '{owner}' (only reshapes may "
                         "sit between them)")
    projs["o"] = o
    fqn = common_prefix([p.fqn for p in projs.values()] + [owner])
    site.fqn, site.replaces = fqn, [fqn]
    site.roles = {r: Role(p.fqn) for r, p in projs.items()}
    if not fqn:
        site.replaces = list(dict.fromkeys(p.fqn for p in projs.values()))
        return site.skip("the attention projections share no module below the model itself")
    if len({projs[r].input for r in "qkv"}) != 1:
        site.pattern = "cross-attention"
        return site.skip("cross-attention: keys/values come from another sequence than the queries")
    if cap.calls.get(fqn, 1) > 1 or any(p.call > 0 for p in projs.values()):
        return site.skip(f"'{fqn}' runs {cap.calls.get(fqn)} times per forward (shared module); converting "
                         "it would change every call")
    for role in "qkv":
        if sum(projs[r] is projs[role] for r in "qkv") > 1:
            rows = _split_rows(index, projs[role], getattr(core, role))
            if rows is None:
                return site.skip(f"fused projection '{projs[role].fqn}': cannot tell which outputs feed "
                                 f"{role.upper()} (no split/chunk/slice of its last dimension was found)")
            site.roles[role].rows = rows
    causal, why = _causality(index, core)
    site.causal = causal
    if why:
        return site.skip(why)
    site_nodes = {n for n in index.nodes if n.op == "call_function" and within(module_path(n), fqn)}
    outputs = [n for n in site_nodes if any(u not in site_nodes for u in users(n))]
    tail = _tail(index, fqn, o, projs["q"].input, site_nodes, outputs)
    if isinstance(tail, str):
        return site.skip(tail)
    kind, final, dropout, norm = tail
    reused = [n for n in outputs if n is not final]
    if reused:
        n = reused[0]
        readers = sorted({module_path(u) or "the model output" for u in users(n) if u not in site_nodes})
        return site.skip(f"'{n.name}' ({op_name(n)} in '{module_path(n)}') is also used outside the site by "
                         f"{readers}; converting would change that value")
    return _fill_layout(site, index, core, projs, kind, dropout, norm)


def _fill_layout(site: Site, index: GraphIndex, core, projs, kind, dropout, norm) -> Site:
    cap = index.captured

    def width(role: str) -> int:
        return site.roles[role].width(projection_dims(projs[role].module)[1])

    hidden = projection_dims(projs["q"].module)[0]
    o_in, o_out = projection_dims(projs["o"].module)
    if width("q") != hidden or (o_in, o_out) != (hidden, hidden):
        return site.skip(f"Q outputs {width('q')} and O maps {o_in} -> {o_out}, but the model width is "
                         f"{hidden}; the mixer needs Q, K, V, O of width {hidden}")
    qval = core.q.meta.get("val")
    heads = qval.shape[1] if qval is not None and qval.dim() == 4 else 1
    head_dim = hidden // heads
    kv = width("k")
    if width("v") != kv or kv % head_dim or hidden % kv:
        return site.skip(f"K/V widths {kv}/{width('v')} are not a whole number of {head_dim}-wide heads "
                         f"dividing {hidden}")
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
        norm=kept_norm)
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
