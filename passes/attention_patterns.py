"""The registry of attention patterns and the built-in matchers that find attention cores by dataflow.

A matcher, ``match(index) -> list[AttentionCore]``, only finds cores: the node computing the output, the
Q, K, V operands, the mask and ``is_causal``; :func:`m2convert.passes.attention.attention_site` does the
rest. The built-in matchers:

    sdpa-attention      aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    eager-attention     product(q, k) -> elementwise chain -> softmax(-1) -> [cast | dropout] -> product(., v)
    flex-attention      the flex_attention higher-order op (q, k, v, score_mod, block_mask, ...)[0]; which
                        keys each query sees comes from evaluating the block mask's mask_mod on index grids

"product" is any of matmul, bmm, baddbmm (its added input is a bias, e.g. Bloom's ALiBi) and a
two-operand einsum, with both operands computed from the inputs (a product with a weight is a
projection, not attention). The chain between the QK product and the softmax may scale, cap (tanh),
add biases (ALiBi, relative positions) and masks (add, masked_fill, where), in place or not: the
scores are the one input of each op that the QK product reaches, every other input is a bias or mask.
"""

from __future__ import annotations


import torch
from torch import fx

from m2convert.passes.graph import GraphIndex, op_name, users
from m2convert.passes.registry import Pattern, PatternRegistry

PRODUCTS = ("aten.matmul", "aten.bmm", "aten.baddbmm", "aten.einsum")
SOFTMAXES = ("aten.softmax", "aten._softmax", "aten._safe_softmax")
# Ops between the QK product and the softmax: scale, cap, bias, mask, cast, reshape (in place or not).
SCORE_OPS = frozenset(f"aten.{op}" for op in (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "tanh", "tanh_", "masked_fill", "masked_fill_",
    "where", "to", "_to_copy", "clone", "alias", "contiguous", "view", "reshape", "_unsafe_view", "type_as",
    "clamp", "clamp_min", "clamp_max", "clamp_", "float", "max", "maximum", "min", "minimum"))
# Ops between the softmax and the product with V: casts, dropout, reshapes, a head mask.
PROB_OPS = frozenset(f"aten.{op}" for op in (
    "to", "_to_copy", "dropout", "clone", "alias", "type_as", "view", "reshape", "_unsafe_view", "contiguous",
    "masked_fill", "masked_fill_", "mul"))


class AttentionCore:
    """The softmax(Q K^T) V core a matcher found.

    Args:
        node: the node computing the core's output (B, heads, N, d), e.g. the probs @ V matmul.
        pattern: the matching pattern's name (the registry sets it when a matcher leaves it empty).
        q, k, v: the nodes feeding the core as queries, keys and values (traced back to projections).
        mask: the attention mask node added to the scores, or None.
        is_causal: the core applies a causal mask by itself (SDPA's ``is_causal``).
        scores: the scores the softmax reads (B, heads, Nq, Nk), masks and biases included, or None;
            when set, causality is read from which keys keep a non-zero probability.
        biases: the other terms mixed into the scores (masks, ALiBi, relative position biases).
        allowed: which keys each query may see, (B, heads, Nq, Nk) bool, when the matcher computed it
            (flex-attention's mask_mod), or a string saying why it could not; None otherwise.
    """

    def __init__(self, node, pattern, q, k, v, mask=None, is_causal=False, scores=None, biases=(), allowed=None):
        self.node, self.pattern = node, pattern
        self.q, self.k, self.v = q, k, v
        self.mask = mask if isinstance(mask, fx.Node) else None
        self.is_causal = bool(is_causal)
        self.scores = scores if isinstance(scores, fx.Node) else None
        self.biases = list(biases)
        self.allowed = allowed


AttentionPattern = Pattern
ATTENTION_PATTERNS = PatternRegistry("attention pattern")
"""The attention patterns ``find_attention`` runs, in order; a core found twice keeps the first match."""


def register_attention_pattern(name: str):
    """Decorator registering ``match(index) -> list[AttentionCore]`` as attention pattern ``name``.

    Example:
        >>> @register_attention_pattern("my-attention")
        ... def match_mine(index):
        ...     return []
        >>> ATTENTION_PATTERNS.names()[-1]
        'my-attention'
        >>> unregister_attention_pattern("my-attention")
    """
    return ATTENTION_PATTERNS.register(name)


unregister_attention_pattern = ATTENTION_PATTERNS.unregister
attention_pattern = ATTENTION_PATTERNS.registered


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


@register_attention_pattern("sdpa-attention")
def match_sdpa(index: GraphIndex) -> list[AttentionCore]:
    # HF BERT / GPT-2 / Llama / T5 sdpa path:
    #   q, k, v (B, heads, N, d) -> aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    return [AttentionCore(n, "sdpa-attention", n.args[0], n.args[1], n.args[2],
                          _arg(n, 3, "attn_mask"), _arg(n, 5, "is_causal", False))
            for n in index.calls("aten.scaled_dot_product_attention")]


def product_operands(index: GraphIndex, node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) of a product a @ b of two computed tensors (matmul, bmm, baddbmm, 2-operand einsum), else None.

    A product with a parameter or buffer (a projection) is not one: it has no computed second operand.
    """
    if not isinstance(node, fx.Node) or op_name(node) not in PRODUCTS or node in index.proj_of:
        return None
    op = op_name(node)
    if op == "aten.einsum":
        operands = node.args[1] if len(node.args) > 1 else ()
    else:
        operands = node.args[1:3] if op == "aten.baddbmm" else node.args[:2]
    if len(operands) != 2 or not all(isinstance(a, fx.Node) and not index.is_const(a) for a in operands):
        return None
    return operands[0], operands[1]


def _carries_scores(index: GraphIndex, node, memo: dict) -> bool:
    """True when ``node`` is a QK product or reaches one back through score ops only."""
    if not isinstance(node, fx.Node):
        return False
    if node not in memo:
        memo[node] = False                                          # cut cycles while deciding
        memo[node] = product_operands(index, node) is not None or (
            op_name(node) in SCORE_OPS and any(_carries_scores(index, a, memo) for a in node.all_input_nodes))
    return memo[node]


def trace_scores(index: GraphIndex, start: fx.Node) -> tuple[fx.Node, list] | None:
    """(the QK product, [bias and mask terms]) that ``start`` (the softmax input) is computed from, or None.

    At each op the scores are the first input the QK product reaches; the other tensor inputs are
    biases or masks (``where``'s condition, ``masked_fill``'s mask, an added ALiBi or position bias).
    """
    memo, biases, cur = {}, [], start
    while product_operands(index, cur) is None:
        if not isinstance(cur, fx.Node) or op_name(cur) not in SCORE_OPS:
            return None
        inputs = [a for a in cur.all_input_nodes if not index.is_const(a)]
        scores = next((a for a in inputs if _carries_scores(index, a, memo)), None)
        if scores is None:
            return None
        biases += [a for a in inputs if a is not scores]
        cur = scores
    if op_name(cur) == "aten.baddbmm":                  # baddbmm(bias, q, k^T): Bloom's ALiBi enters here
        biases += [a for a in cur.args[:1] if isinstance(a, fx.Node)]
    return cur, biases


def _last_dim(node: fx.Node) -> bool:
    dim = _arg(node, 1, "dim", -1)
    val = node.meta.get("val")
    return val is None or dim in (-1, val.dim() - 1)


@register_attention_pattern("eager-attention")
def match_softmax(index: GraphIndex) -> list[AttentionCore]:
    # HF eager paths of BERT, GPT-2, Llama, Bloom (baddbmm + ALiBi), MPT, Gemma2 (tanh cap),
    # DeBERTa-v2 (bmm + masked_fill), MPNet (in-place position bias), Falcon, GPTBigCode, ModernBERT:
    #   scores = product(q, k) -> [scale | cap | + bias | mask] ...;  probs = softmax(scores, -1)
    #   probs -> [cast | dropout | reshape] ...;  out = product(probs, v)
    cores = []
    for softmax in index.calls(*SOFTMAXES):
        traced = trace_scores(index, softmax.args[0]) if _last_dim(softmax) else None
        if traced is None:
            continue
        qk, biases = traced
        probs = softmax
        while len(users(probs)) == 1 and op_name(users(probs)[0]) in PROB_OPS:
            probs = users(probs)[0]
        out = next((u for u in users(probs) if (ops := product_operands(index, u)) and ops[0] is probs), None)
        if out is None:
            continue
        q, k = product_operands(index, qk)
        mask = next((b for b in biases if b.meta.get("val") is not None and b.meta["val"].dim() >= 2), None)
        cores.append(AttentionCore(out, "eager-attention", q, k, product_operands(index, out)[1], mask,
                                   scores=softmax.args[0], biases=biases))
    return cores


def _sink_scores(index: GraphIndex, node) -> fx.Node | None:
    """The scores S of softmax input ``cat([S, sinks], -1)`` (less its row max), else None: S carries the
    QK product, the columns after it are a learned per-head sink logit."""
    while op_name(node) in ("aten.sub", "aten.to", "aten._to_copy"):         # - max(dim=-1), casts
        node = node.args[0]
    if op_name(node) != "aten.cat" or not _last_dim_of(node) or len(node.args[0]) < 2:
        return None
    scores = node.args[0][0]
    return scores if _carries_scores(index, scores, {}) else None


def _last_dim_of(cat: fx.Node) -> bool:
    dim, val = _arg(cat, 1, "dim", 0), cat.meta.get("val")
    return val is not None and dim in (-1, val.dim() - 1)


@register_attention_pattern("sink-attention")
def match_sink_softmax(index: GraphIndex) -> list[AttentionCore]:
    # HF GPT-OSS: softmax(cat([scores, sinks], -1) - max)[..., :-1] @ V (a learned logit per head that takes
    # probability mass and is dropped). The mixer models the scores' part; the sinks are not carried over.
    cores = []
    for softmax in index.calls(*SOFTMAXES):
        scores = _sink_scores(index, softmax.args[0]) if _last_dim(softmax) else None
        traced = trace_scores(index, scores) if scores is not None else None
        if traced is None:
            continue
        probs = softmax
        while len(users(probs)) == 1 and op_name(users(probs)[0]) in PROB_OPS | {"aten.slice"}:
            probs = users(probs)[0]
        out = next((u for u in users(probs) if (ops := product_operands(index, u)) and ops[0] is probs), None)
        if out is None or probs is softmax:
            continue
        qk, biases = traced
        q, k = product_operands(index, qk)
        mask = next((b for b in biases if b.meta.get("val") is not None and b.meta["val"].dim() >= 2), None)
        cores.append(AttentionCore(out, "sink-attention", q, k, product_operands(index, out)[1], mask,
                                   scores=scores, biases=biases))
    return cores


@register_attention_pattern("flex-attention")
def match_flex(index: GraphIndex) -> list[AttentionCore]:
    # transformers attn_implementation="flex_attention":
    #   out = flex_attention(q, k, v, score_mod, (.., mask_mod), scale, kernel_options, score_bufs, mask_bufs)[0]
    cores = []
    for node in index.calls("flex_attention"):
        out = next((u for u in users(node) if op_name(u) == "getitem" and u.args[1] == 0), None)
        if out is None or len(node.args) < 5:
            continue
        cores.append(AttentionCore(out, "flex-attention", node.args[0], node.args[1], node.args[2],
                                   allowed=_flex_allowed(index, node)))
    return cores


def _flex_allowed(index: GraphIndex, node: fx.Node):
    """(B, 1, Nq, Nk) bool keys each query sees, from the block mask's mask_mod, or why not (a string)."""
    module = index.captured.exported.graph_module
    score_mod, block_mask = node.args[3], node.args[4]
    if not _is_identity(getattr(module, str(getattr(score_mod, "target", "")), None)):
        return ("flex-attention with a score_mod that changes the scores (a bias or a mask in it), which "
                "is not read; the M2 mixers model only full or causal attention")
    mask_mod = block_mask[-1] if isinstance(block_mask, (tuple, list)) and block_mask else None
    mask_fn = getattr(module, str(getattr(mask_mod, "target", "")), None)
    if mask_fn is None:
        return "flex-attention without a mask_mod in its block mask"
    buffers = [b for b in (node.args[-1] if isinstance(node.args[-1], (tuple, list)) else ())]
    try:
        values = index.evaluate([b for b in buffers if isinstance(b, fx.Node)])
        b, _, nq, _ = node.args[0].meta["val"].shape
        nk = node.args[1].meta["val"].shape[-2]
        grid = [torch.arange(b).view(b, 1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                torch.arange(nq).view(1, 1, nq, 1), torch.arange(nk).view(1, 1, 1, nk)]
        with torch.no_grad():
            allowed = mask_fn(*grid, *[values.get(x, x) for x in buffers])
        return allowed.bool().expand(b, 1, nq, nk)
    except Exception as exc:                              # a mask_mod that does not take index grids
        return f"could not evaluate flex-attention's mask_mod on index grids: {type(exc).__name__}: {exc}"


def _is_identity(module) -> bool:
    """True for a score_mod graph that returns its first input (the score) unchanged."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return False
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    return bool(placeholders) and result is placeholders[0]
