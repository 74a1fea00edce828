"""Name every softmax attention core that no registered pattern matched, so a plan never hides one.

The attention patterns (passes/attention_patterns.py) each accept a known set of ops. A model that puts
another op between the QK product and the softmax (an unusual squashing function, a custom kernel) would
otherwise leave its attention dense with nothing in the plan to say so. This pass walks the
graph for the shape of a core alone, whatever the ops: a softmax over the last dim whose input is
computed (within a few ops) from a product of two input-derived tensors, and whose output reaches such
a product. Each core that no attention site covers becomes a skipped site whose reason lists the ops no
pattern accepts; ``strict=True`` then refuses the plan and the CLI counts it.

Example:
    >>> class SinhAttention(nn.Module):             # scores through sinh before the softmax
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
    ...     def forward(self, x):                                            # x: (B, N, 16)
    ...         scores = self.q(x) @ self.k(x).transpose(1, 2)               # (B, N, N)
    ...         scores = torch.sinh(scores)
    ...         return self.o(scores.softmax(-1) @ self.v(x))
    >>> plan = m2.plan(nn.Sequential(SinhAttention()), example_inputs=(torch.randn(1, 8, 16),))
    >>> [(s.pattern, s.status) for s in plan.sites]
    [('unmatched-softmax-core', 'skip')]
    >>> print(plan.sites[0].reason.split(";")[0])
    a softmax attention core (QK product -> aten.sinh -> softmax -> product with V) that no registered attention pattern matches
"""

from __future__ import annotations

from torch import fx

from m2convert.passes.attention_patterns import PRODUCTS, SCORE_OPS, SOFTMAXES, product_operands
from m2convert.passes.graph import GraphIndex, module_path, op_name, users, within
from m2convert.passes.site import SEQUENCE, Site

PATTERN = "unmatched-softmax-core"
BACK_STEPS = 12               # ops searched from the softmax back to the QK product
AHEAD_STEPS = 8               # ops searched from the softmax on to the product with V


def _derived(index: GraphIndex) -> set[fx.Node]:
    """Nodes computed from the model's inputs (not from parameters and constants alone)."""
    derived = {n for n in index.nodes if n.op == "placeholder" and not index.is_const(n)}
    for n in index.nodes:
        if n.op == "call_function" and any(a in derived for a in n.all_input_nodes):
            derived.add(n)
    return derived


def _is_product(index: GraphIndex, node: fx.Node, derived: set) -> bool:
    operands = product_operands(index, node) if op_name(node) in PRODUCTS else None
    return operands is not None and all(a in derived for a in operands)


def _path_back(index: GraphIndex, softmax: fx.Node, derived: set) -> list[fx.Node] | None:
    """Ops from the QK product (first) to the softmax input (last), or None if no product is near."""
    parents = {softmax.args[0]: None}
    frontier = [softmax.args[0]]
    for _ in range(BACK_STEPS):
        nxt = []
        for node in frontier:
            if _is_product(index, node, derived):
                chain = []
                while node is not None:
                    chain.append(node)
                    node = parents[node]
                return chain
            for arg in node.all_input_nodes:
                if arg in derived and arg not in parents:
                    parents[arg] = node
                    nxt.append(arg)
        frontier = nxt
    return None


def _reaches_product(index: GraphIndex, softmax: fx.Node, derived: set) -> bool:
    frontier = [softmax]
    for _ in range(AHEAD_STEPS):
        frontier = [u for n in frontier for u in users(n)]
        if any(_is_product(index, u, derived) for u in frontier):
            return True
    return False


def _reason(chain: list[fx.Node]) -> str:
    between = [op_name(n) for n in chain[1:]]
    foreign = sorted({op for op in between if op not in SCORE_OPS})
    shown = " -> ".join(["QK product", *between, "softmax", "product with V"])
    why = f"ops no pattern accepts between them: {foreign}" if foreign else \
        "its ops are known, but the product operands or the path to V are not"
    return (f"a softmax attention core ({shown}) that no registered attention pattern matches; {why}; register a "
            "pattern with m2convert.passes.register_attention_pattern, or exclude the site with overrides")


def name_unmatched_cores(ctx) -> int:
    """Pass: a skipped site for each softmax core no attention site covers. Returns how many.

    A core is covered when its softmax ran inside a module an attention site owns.
    """
    index: GraphIndex = ctx.index
    owned = [s.fqn for s in ctx.sites if s.kind == SEQUENCE]
    derived = _derived(index)
    found = 0
    for softmax in index.calls(*SOFTMAXES):
        path = module_path(softmax)
        if any(within(path, fqn) for fqn in owned):
            continue
        val = softmax.meta.get("val")
        dim = softmax.args[1] if len(softmax.args) > 1 else -1
        if val is None or dim not in (-1, val.dim() - 1):
            continue
        chain = _path_back(index, softmax, derived)
        if chain is None or not _reaches_product(index, softmax, derived):
            continue
        site = Site(path, SEQUENCE, PATTERN, replaces=[path]).skip(_reason(chain))
        ctx.add(site, f"{PATTERN} at '{path}'")
        owned.append(path)
        found += 1
    return found
