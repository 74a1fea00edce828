"""Lowering rules: each finds one kind of reference subgraph in a captured graph and names its fused op.

A rule starts at an anchor node (the op that closes the subgraph) and reads the structure around it:
which nodes are the operands of the fused op, which node's value it replaces. It does not decide that
the subgraph computes the op: the lowering pass (``lower.py``) checks that by evaluating the subgraph
and the op on the same random operands, so a rule may be generous and a wrong guess is reported, never
fused. ``match(rule_name, anchor, view)`` reads the program through a :class:`GraphView` and returns
None (nothing here), a :class:`Skip` (a reference subgraph it cannot fuse, with the reason) or a list
of :class:`Candidate` readings, preferred first. Matching goes by structure and shapes, never by node
names or by the exact sequence of view ops, so another layout of the same algebra (matmul for bmm,
pre-transposed weights, another FFT length, masks or no masks) still matches.

    rule               anchor                algebra
    monarch-bmm        bmm / matmul          x.view(M, nb, P).mT @ w1.mT -> .view(nb, M, nb, rho).permute(2, 1, 0, 3)
                                             -> .view(nb, M, nb * rho) @ w2.mT -> .mT.view(..., nb * S)
                                             [-> [..., :out] -> + bias -> gelu / relu / silu: m2::monarch_linear,
                                             the projection's epilogue run as each chunk is written]
    fft-conv           fft_irfft             x2 * (irfft(rfft(v * x1, L) * K, L)[..., :N] + D * v * x1),
                                             K = rfft(k, L) [+ conj(rfft(k_rev, L)) - k_rev[:, :1]]
    monarch-dft-conv   real                  x2 * (idft(dft(pad(v * x1)) * dft(pad(k))).real[..., :N] + D * v * x1),
                                             dft = block GEMMs with twiddles (kernels/fftconv/monarch_dft.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy
import torch
from torch import fx

from m2convert.passes.graph import RESHAPES, module_path, op_name, users
from m2convert.passes.lower_epilogue import monarch_epilogue
from m2convert.passes.lower_values import is_data, is_tensor, shape, show, val  # noqa: F401  (read by lower_check)

aten = torch.ops.aten

GEMMS = frozenset(("aten.bmm", "aten.matmul"))
CASTS = frozenset(f"aten.{op}" for op in ("to", "_to_copy", "clone", "contiguous", "alias", "dropout"))
SIGNAL_STRIP = CASTS | {"aten.pad", "aten.constant_pad_nd", "aten.slice"}          # zero padding, cropping
SCALE_STRIP = CASTS | {"aten.unsqueeze", "aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand"}


@dataclass(frozen=True, eq=False)
class Emit:
    """A node the rewrite adds in front of the fused op: ``target(*args)`` (args: nodes, Emits, constants)."""

    target: object
    args: tuple


@dataclass(eq=False)
class Candidate:
    """One reading of a subgraph as a fused op: ``op(*args)`` replaces ``out``.

    ``inputs`` are the nodes the subgraph starts from; the check feeds them random values.
    """

    rule: str
    site: str
    anchor: fx.Node
    out: fx.Node
    op: object
    args: tuple
    inputs: tuple
    detail: str = ""


@dataclass
class Skip:
    """A reference subgraph a rule recognised but cannot fuse."""

    rule: str
    site: str
    anchor: fx.Node
    reason: str


@dataclass(frozen=True)
class Rule:
    """A named rule: where it starts (anchor op names), its matcher, and its algebra."""

    name: str
    anchors: frozenset
    match: Callable
    algebra: str


class GraphView:
    """What rules read of the program being rewritten: constants, node order, fake mode, in-graph constants."""

    def __init__(self, ep: torch.export.ExportedProgram):
        self.ep, self.graph = ep, ep.graph_module.graph
        sig = ep.graph_signature
        self.const_targets = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                              **sig.inputs_to_lifted_tensor_constants}
        vals = tuple(n.meta["val"] for n in self.graph.nodes if n.op == "placeholder" and "val" in n.meta)
        self.fake_mode = torch._guards.detect_fake_mode(vals)
        self.gone: set[fx.Node] = set()                   # nodes erased by rewrites so far
        self._free: dict[fx.Node, bool] = {}
        self.reorder()

    def reorder(self) -> None:
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}

    def is_const(self, node: fx.Node) -> bool:
        """A parameter, buffer or lifted constant."""
        return node.op == "get_attr" or (node.op == "placeholder" and node.name in self.const_targets)

    def constant(self, node: fx.Node) -> torch.Tensor:
        if node.op == "get_attr":
            return getattr(self.ep.graph_module, node.target)
        target = self.const_targets[node.name]
        return self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]

    def input_free(self, node: fx.Node) -> bool:
        """True if ``node`` reads no placeholder (sizes aside): a constant the graph builds (DFT factors)."""
        if node not in self._free:
            seen, stack, free = set(), [node], True
            while stack and free:
                n = stack.pop()
                if n in seen or self._free.get(n) is True:
                    continue
                seen.add(n)
                free = n.op == "call_function" and self._free.get(n) is not False
                stack.extend(a for a in n.all_input_nodes if is_data(a))
            self._free.update(dict.fromkeys(seen, True) if free else {node: False})
        return self._free[node]


def _through(node, ops):
    """The first node along ``args[0]`` from ``node`` whose op is not in ``ops``."""
    while isinstance(node, fx.Node) and node.op == "call_function" and op_name(node) in ops:
        node = node.args[0]
    return node


def _depends_on(node, anchor: fx.Node, order: dict) -> bool:
    """True if ``node`` reads ``anchor``; only nodes after the anchor are searched."""
    seen, stack, start = set(), [node], order[anchor]
    while stack:
        n = stack.pop()
        if n is anchor:
            return True
        if n in seen or order.get(n, -1) <= start:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _weight_root(node, g):
    """The parameter/buffer an operand is a view of, or None."""
    root = _through(node, RESHAPES)
    return root if isinstance(root, fx.Node) and g.is_const(root) else None


def _split_gemm(gemm: fx.Node, g):
    """(weight operand, data operand, weight is the right operand) of a GEMM, or Nones."""
    a, b = gemm.args[:2]
    if _weight_root(b, g) is not None:
        return b, a, True
    if _weight_root(a, g) is not None:
        return a, b, False
    return None, None, None


def _blocks(wop: fx.Node, is_rhs: bool):
    """A GEMM's weight operand as the op takes it, (nb, out, in): right operands are transposed back."""
    dims = shape(wop)
    if not is_rhs:
        return wop, dims
    name = op_name(wop)
    if name == "aten.transpose" and sorted(int(d) % 3 for d in wop.args[1:3]) == [1, 2]:
        return wop.args[0], dims[:1] + dims[:0:-1]
    if name == "aten.permute" and [int(d) % 3 for d in wop.args[1]] == [0, 2, 1]:
        return wop.args[0], dims[:1] + dims[:0:-1]
    return Emit(aten.transpose.int, (wop, 1, 2)), dims[:1] + dims[:0:-1]


def _views_back(node) -> list:
    path = [node]
    while op_name(path[-1]) in RESHAPES:
        path.append(path[-1].args[0])
    return path


def _views_forward(node) -> list:
    path = [node]
    while len(users(path[-1])) == 1 and op_name(users(path[-1])[0]) in RESHAPES \
            and users(path[-1])[0].args[0] is path[-1]:
        path.append(users(path[-1])[0])
    return path


def match_monarch(rule: str, gemm2: fx.Node, g):
    """GEMM (weight) <- views <- GEMM (weight) <- views <- x: the two block-diagonal factors of a Monarch."""
    w2op, data2, rhs2 = _split_gemm(gemm2, g)
    if w2op is None:
        return None
    gemm1 = _through(data2, RESHAPES)
    if not (isinstance(gemm1, fx.Node) and op_name(gemm1) in GEMMS):
        return None
    w1op, data1, rhs1 = _split_gemm(gemm1, g)
    if w1op is None:
        return None
    site = module_path(gemm2)
    if any(len(shape(n)) != 3 for n in (gemm1, gemm2, w1op, w2op)):
        return Skip(rule, site, gemm2, "the GEMMs are not 3-D batched products (nb, M, K) @ (nb, K, N)")
    w1, (nb, q, p) = _blocks(w1op, rhs1)                          # (nb, nb * rho, P)
    w2, (nb2, s, q2) = _blocks(w2op, rhs2)                        # (nb, S, nb * rho)
    if nb2 != nb or q2 != q or q % nb != 0:
        return Skip(rule, site, gemm2, f"factor shapes {show((nb, q, p))} and {show((nb2, s, q2))} do not chain "
                                       "as Monarch factors (nb, nb * rho, P) and (nb, S, nb * rho)")
    xs = _views_back(data1)
    for out in reversed(_views_forward(gemm2)):
        dims = shape(out)
        if dims[-1] != nb * s:
            continue
        x = next((n for n in xs if is_tensor(n) and shape(n) == dims[:-1] + (nb * p,)), None)
        if x is not None:
            break
    else:
        return Skip(rule, site, gemm2, f"no input (..., {nb * p}) and output (..., {nb * s}) with the same leading "
                                       "dims around the two GEMMs")
    roots = (_weight_root(w1op, g), _weight_root(w2op, g))
    detail = f"nb={nb} P={p} S={s} rho={q // nb}"
    plain = Candidate(rule, site, gemm2, out, torch.ops.m2.monarch_matmul.default, (x, w1, w2), (x, *roots), detail)
    tail = monarch_epilogue(out, nb * s, g)
    if tail is None:
        return [plain]
    end, bias, width, act = tail
    what = ", ".join(part for part in (f"out={width}" if width != nb * s else "", "bias" if bias else "", act) if part)
    return [Candidate(rule, site, gemm2, end, torch.ops.m2.monarch_linear.default, (x, w1, w2, bias, width, act),
                      (x, *roots), f"{detail} + {what}"), plain]


def _spectral_section(anchor: fx.Node):
    """The complex-valued nodes feeding ``anchor`` and the real tensors that enter them."""
    section, boundary, stack = set(), [], list(anchor.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in section or n in boundary:
            continue
        if is_tensor(n) and val(n).is_complex():
            section.add(n)
            stack.extend(n.all_input_nodes)
        elif is_tensor(n):
            boundary.append(n)
    return section, boundary


def _skip_scale(term, u):
    """D if ``term`` is u * D with D of shape (H,) (through casts and unsqueezes), else None."""
    term = _through(term, CASTS)
    if op_name(term) != "aten.mul" or len(term.args) != 2 or not all(is_tensor(a) for a in term.args):
        return None
    for a, b in (term.args, term.args[::-1]):
        d = _through(b, SCALE_STRIP)
        if _through(a, CASTS) is u and is_tensor(d) and shape(d) == shape(u)[1:2]:
            return d
    return None


def _epilogue(anchor: fx.Node, u, g):
    """Walk from the transform's output through crops, casts and the D * u skip: (conv output, D)."""
    c, D = anchor, None
    while len(users(c)) == 1:
        nxt = users(c)[0]
        name = op_name(nxt)
        if name in CASTS | {"aten.slice"} and nxt.args[0] is c:
            c = nxt
            continue
        if name == "aten.add" and D is None and len(nxt.args) == 2 and not nxt.kwargs:
            other = nxt.args[1] if nxt.args[0] is c else nxt.args[0]
            scale = _skip_scale(other, u) if is_tensor(other) else None
            if scale is not None and not _depends_on(other, anchor, g.order):
                c, D = nxt, scale
                continue
        break
    return c, D


def _pre_gates(u: fx.Node) -> list:
    """(v, x1) readings of the conv input u: u = v * x1 (x1 broadcast to v's shape), else (u, ones)."""
    options = []
    if op_name(u) == "aten.mul" and len(u.args) == 2 and all(is_tensor(a) for a in u.args):
        for v, x1 in (u.args, u.args[::-1]):
            if shape(v) == shape(u) and val(v).dtype == val(x1).dtype == val(u).dtype:
                options.append((v, x1 if shape(x1) == shape(u) else Emit(aten.expand_as.default, (x1, v))))
                break
    return options + [(u, None)]


def _post_gate(c: fx.Node, anchor: fx.Node, g):
    """(out, x2) if the conv output's only use is a gate x2 * c, else (c, None)."""
    if len(users(c)) != 1 or op_name(users(c)[0]) != "aten.mul":
        return c, None
    m = users(c)[0]
    if len(m.args) != 2 or m.kwargs:
        return c, None
    x2 = m.args[1] if m.args[0] is c else m.args[0]
    if not is_tensor(x2) or x2 is c or shape(m) != shape(c) or val(x2).dtype != val(c).dtype \
            or _depends_on(x2, anchor, g.order):
        return c, None
    return m, x2


def match_long_conv(rule: str, anchor: fx.Node, g):
    """A transform-domain long convolution: real signal and filters -> complex section -> real output."""
    if not (anchor.args and is_tensor(anchor.args[0]) and val(anchor.args[0]).is_complex()):
        return None
    site = module_path(anchor)
    _, boundary = _spectral_section(anchor)
    sources = []
    for b in boundary:
        src = _through(b, SIGNAL_STRIP)
        if not g.input_free(b) and src not in sources:
            sources.append(src)
    signals = [s for s in sources if is_tensor(s) and len(shape(s)) == 3]
    filters = sorted((s for s in sources if is_tensor(s) and len(shape(s)) == 2), key=g.order.__getitem__)
    odd = [s for s in sources if s not in signals and s not in filters]
    if odd:
        return Skip(rule, site, anchor, f"the transform reads '{odd[0].name}', neither a (B, H, N) signal nor an "
                                        "(H, N) filter")
    if len(signals) != 1 or len(filters) not in (1, 2):
        return Skip(rule, site, anchor, f"the transform reads {len(signals)} (B, H, N) signals and {len(filters)} "
                                        "(H, N) filters; a long convolution has one signal and one or two filters")
    u = signals[0]
    _, h, n = shape(u)
    wrong = next((f for f in filters if shape(f) != (h, n)), None)
    if wrong is not None:
        return Skip(rule, site, anchor, f"filter '{wrong.name}' has shape {show(shape(wrong))}; the fused op "
                                        f"takes ({h}, {n}) taps, one per offset")
    c, D = _epilogue(anchor, u, g)
    if shape(c) != shape(u):
        return Skip(rule, site, anchor, f"the output '{c.name}' has shape {show(shape(c))}, not the input's "
                                        f"{show(shape(u))}")
    out, x2 = _post_gate(c, anchor, g)
    orders = [tuple(filters)] if len(filters) == 1 else [tuple(filters), tuple(filters[::-1])]
    detail = ("bidirectional" if len(filters) == 2 else "causal") + _owner(filters[0], site)
    candidates = []
    for v, x1 in _pre_gates(u):
        ones = Emit(aten.ones_like.default, (v,))
        gate = ones if x2 is None else x2 if shape(x2) == shape(u) else Emit(aten.expand_as.default, (x2, v))
        gates = ("" if x1 is None else ", pre-gate") + ("" if x2 is None else ", post-gate")
        for ks in orders:
            k, k_rev = ks[0], (ks[1] if len(ks) == 2 else None)
            args = (v, ones if x1 is None else x1, gate, k, k_rev, D)
            inputs = tuple(dict.fromkeys(_nodes_in(args)))
            candidates.append(Candidate(rule, site, anchor, out, torch.ops.m2.gated_long_conv.default, args,
                                        inputs, detail + gates))
    return candidates


def _owner(node: fx.Node, site: str, depth: int = 6) -> str:
    """', taps from <submodule>': the nearest module below ``site`` that computed ``node`` (for the report)."""
    frontier = [node]
    for _ in range(depth):
        for n in frontier:
            path = module_path(n)
            if path.startswith(site + ".") or (site == "" and path):
                return f", taps from {path[len(site) + 1 if site else 0:]}"
        frontier = [a for n in frontier for a in n.all_input_nodes]
    return ""


def _nodes_in(args):
    for a in args:
        if isinstance(a, fx.Node):
            yield a
        elif isinstance(a, Emit):
            yield from _nodes_in(a.args)


RULES = (
    # x.view(M, nb, P).mT @ w1.mT . view(nb, M, nb, rho).permute(2, 1, 0, 3) @ w2.mT . mT.view(..., nb*S) -> monarch
    Rule("monarch-bmm", GEMMS, match_monarch, "reshape.bmm.permute.bmm -> m2::monarch_matmul"),
    # x2 * (irfft(rfft(v*x1, L) * (rfft(k, L) + conj rfft(k_rev, L) - k_rev[0]), L)[:N] + D*v*x1) -> gated conv
    Rule("fft-conv", frozenset({"aten.fft_irfft", "aten.fft_c2r"}), match_long_conv,
         "rfft.mul.irfft -> m2::gated_long_conv"),
    # x2 * (idft(dft(pad(v*x1)) * dft(pad(k))).real[:N] + D*v*x1), dft = Monarch GEMMs + twiddles -> gated conv
    Rule("monarch-dft-conv", frozenset({"aten.real"}), match_long_conv, "dft.mul.idft.real -> m2::gated_long_conv"),
)
