"""GraphIndex: the captured FX graph seen at module level, the shared toolkit of the analysis passes.

It answers: which module ran a node, which nodes are constants (parameters, buffers), which groups of
nodes are one call of a projection (nn.Linear, or transformers' Conv1D whose view -> addmm -> view
is one matmul), and what a small subgraph evaluates to on the example inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from m2convert.layers.base import M2Block

# Ops that act on each element alone (activation bodies, scaling, dropout, casts).
ELEMENTWISE = frozenset(
    f"aten.{op}" for op in (
        "gelu", "silu", "relu", "relu6", "sigmoid", "tanh", "mul", "add", "sub", "div", "pow", "neg",
        "exp", "erf", "sqrt", "rsqrt", "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "dropout",
        "clone", "alias", "contiguous", "to", "_to_copy", "type_as", "hardtanh", "leaky_relu", "elu",
        "softplus", "mish", "hardswish", "hardsigmoid", "square", "log1p", "abs", "sign", "reciprocal",
        "gelu_", "silu_", "relu_", "sigmoid_", "tanh_", "expm1", "log", "where", "gt", "lt", "ge", "le",
        "eq", "ne", "logical_and", "logical_or", "logical_not", "masked_fill"))
# Binary forms of ops whose other overloads reduce (torch.min(x, y) is aten.min.other; torch.min(x) is not).
BINARY_ELEMENTWISE = frozenset(("aten.min", "aten.max"))


def elementwise(node: fx.Node) -> bool:
    """Whether ``node`` computes each output element from the same element of its inputs."""
    name = op_name(node)
    if name in BINARY_ELEMENTWISE:
        return len(node.args) == 2 and isinstance(node.args[1], fx.Node) and not node.kwargs
    return name in ELEMENTWISE

# Activation ops that name an MLP pattern (tanh/sigmoid also appear inside composite GELUs).
ACTIVATIONS = {"aten.gelu": "gelu", "aten.silu": "silu", "aten.relu": "relu", "aten.relu6": "relu",
               "aten.leaky_relu": "relu", "aten.elu": "elu", "aten.mish": "mish", "aten.hardswish": "swish",
               "aten.softplus": "softplus", "aten.tanh": "tanh", "aten.sigmoid": "sigmoid",
               "aten.erf": "gelu"}                 # x * 0.5 * (1 + erf(x / sqrt(2))): GELU written out (HF ESM)

# Ops that only move or cast data between a projection and the attention core.
RESHAPES = frozenset(
    f"aten.{op}" for op in (
        "view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "alias", "to",
        "_to_copy", "unsqueeze", "squeeze", "flatten", "unflatten", "expand", "t", "dropout"))


# Ops that only select, reorder or copy elements: what lies between a fused projection and each role.
MOVES = RESHAPES | frozenset(
    f"aten.{op}" for op in (
        "select", "slice", "split", "split_with_sizes", "chunk", "unbind", "index", "numpy_T", "repeat",
        "repeat_interleave", "_unsafe_view", "type_as")) | {"getitem"}


# Checks export inserts (dtype/device asserts); they read values but compute nothing.
BOOKKEEPING = frozenset(("aten._assert_tensor_metadata", "aten._assert_scalar", "aten._assert_async",
                         "aten.sym_constrain_range_for_size"))


def op_name(node: fx.Node) -> str:
    """'aten.linear' for aten ops, the function name for Python builtins, the node's op otherwise."""
    if node.op != "call_function":
        return node.op
    target = node.target
    if hasattr(target, "namespace") and hasattr(target, "_opname"):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


def users(node: fx.Node) -> list[fx.Node]:
    """The nodes that compute from ``node`` (export's assert nodes left out)."""
    return [u for u in node.users if op_name(u) not in BOOKKEEPING]


def module_entry(node: fx.Node) -> tuple[str, str, int] | None:
    """(fqn, class name, call index) of the innermost module that ran ``node``; None outside modules."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (fqn, cls) = list(stack.items())[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    call = int(key.rsplit("@", 1)[1]) if "@" in key else 0
    return fqn, name.rsplit(".", 1)[-1], call


def module_path(node: fx.Node) -> str:
    """Module path of the innermost module that ran ``node`` ('' for the model itself)."""
    entry = module_entry(node)
    return entry[0] if entry else ""


def within(path: str, prefix: str) -> bool:
    """True if module ``path`` is ``prefix`` or below it ('' contains everything)."""
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def common_prefix(paths) -> str:
    """Deepest module path containing all ``paths`` ('' if only the root does)."""
    parts = [p.split(".") if p else [] for p in paths]
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def is_projection(module: nn.Module | None) -> bool:
    """nn.Linear, or a transformers-style Conv1D (weight (in, out), attribute ``nf``).

    A MonarchLinear answers like an nn.Linear (for PEFT and HF code) but is already converted: not a
    projection to convert again.
    """
    if isinstance(module, nn.Linear):
        return not isinstance(module, M2Block)
    return (module is not None and type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def projection_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) in nn.Linear convention; Conv1D weights are transposed."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    return module.weight.t(), module.bias                         # Conv1D stores (in, out)


def projection_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    weight, _ = projection_weight(module)
    return weight.shape[1], weight.shape[0]


def feature_ranges(order: list[int]) -> list[list[int]]:
    """Feature numbers as [start, stop) ranges of consecutive runs (the form of ``Role.rows``).

    Example:
        >>> feature_ranges([0, 1, 2, 8, 9])
        [[0, 3], [8, 10]]
    """
    rows: list[list[int]] = []
    for i in order:
        if rows and rows[-1][1] == i:
            rows[-1][1] += 1
        else:
            rows.append([i, i + 1])
    return rows


@dataclass(eq=False)
class ProjCall:
    """One call of a projection module: its nodes, the data going in and the value coming out."""

    fqn: str
    call: int
    module: nn.Module
    nodes: set = field(default_factory=set)
    input: fx.Node | None = None
    output: fx.Node | None = None

    @property
    def label(self) -> str:
        return self.fqn if self.call == 0 else f"{self.fqn}@{self.call}"


class GraphIndex:
    """Module-level view of a captured graph.

    Example:
        >>> from m2convert.passes.capture import capture
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64))
        >>> index = GraphIndex(capture(model))
        >>> [p.fqn for p in index.projections][:2]
        ['encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.key']
    """

    def __init__(self, captured):
        self.captured = captured
        self.graph: fx.Graph = captured.exported.graph
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        sig = captured.exported.graph_signature
        self.constants = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
        self.constants |= set(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        self.param_names = dict(sig.inputs_to_parameters)
        self.output_node = next(n for n in reversed(self.nodes) if n.op == "output")
        self._cache: dict = {}
        self.projections: list[ProjCall] = []
        self.proj_of: dict[fx.Node, ProjCall] = {}
        self._group_projections()

    def is_const(self, node: fx.Node) -> bool:
        return node.op == "get_attr" or (node.op == "placeholder" and node.name in self.constants)

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The non-constant nodes ``node`` reads."""
        return [n for n in node.all_input_nodes if not self.is_const(n)]

    def calls(self, *ops: str) -> list[fx.Node]:
        """call_function nodes whose op_name is one of ``ops``, in graph order."""
        return [n for n in self.nodes if n.op == "call_function" and op_name(n) in ops]

    def unit(self, node: fx.Node):
        """The projection call ``node`` belongs to, else the node itself."""
        return self.proj_of.get(node, node)

    def _group_projections(self) -> None:
        groups: dict[tuple[str, int], list[fx.Node]] = {}
        for node in self.nodes:
            if node.op != "call_function":
                continue
            entry = module_entry(node)
            if entry and is_projection(self.captured.modules.get(entry[0])):
                groups.setdefault((entry[0], entry[2]), []).append(node)
        for (fqn, call), nodes in groups.items():
            members = set(nodes)
            ins = {i for n in nodes for i in self.data_inputs(n) if i not in members}
            outs = [n for n in nodes if any(u not in members for u in users(n))]
            if len(ins) != 1 or len(outs) != 1:
                continue                                 # not a clean single-input single-output call
            proj = ProjCall(fqn, call, self.captured.modules[fqn], members, ins.pop(), outs[0])
            self.projections.append(proj)
            for n in nodes:
                self.proj_of[n] = proj

    def nearest_projections(self, start: fx.Node, scope: str) -> list[ProjCall]:
        """Projections reached walking back from ``start`` inside module ``scope``, stopping at each."""
        found: list[ProjCall] = []
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            proj = self.proj_of.get(node)
            if proj is not None:
                if within(proj.fqn, scope) and proj not in found:
                    found.append(proj)
                continue
            if node.op != "call_function" or not within(module_path(node), scope):
                continue
            stack.extend(self.data_inputs(node))
        return found

    def evaluate(self, targets: list[fx.Node], overrides: dict | None = None) -> dict[fx.Node, object]:
        """Values of ``targets`` on the example inputs, running only the nodes they depend on.

        ``overrides`` maps nodes to values used instead of computing them.
        """
        overrides = overrides or {}
        needed, stack = set(), list(targets)
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                if node not in overrides:
                    stack.extend(node.all_input_nodes)
        ep, cap = self.captured.exported, self.captured
        flat = ep._graph_module_flat_inputs(cap.args, cap.kwargs)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        env = {**dict(zip(placeholders, flat)), **overrides}
        with torch.no_grad():
            for node in self.nodes:
                if node in needed and node.op == "call_function" and node not in overrides:
                    args = fx.node.map_arg(node.args, env.__getitem__)
                    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                    env[node] = node.target(*args, **kwargs)
        return {t: env[t] for t in targets}

    def feature_order(self, proj: ProjCall, target: fx.Node) -> list[int] | None:
        """The output features of ``proj`` that reach ``target``, in the order ``target`` holds them.

        Runs the data movement between them (views, transposes, splits, selects, expands: :data:`MOVES`)
        on a tensor whose every element is its feature number. Where arithmetic starts before ``target``
        (a rotary embedding), the features are read just before it. None when no movement-only path
        connects them. GPT-2's c_attn (B, N, 3H) -> split(H) -> getitem 1 gives K = [H, ..., 2H - 1];
        Bloom's (B, N, heads, 3, d) view -> select(3, 0) gives Q = d features of each 3d-wide head block.
        """
        ancestors, stack = set(), [target]
        while stack:
            n = stack.pop()
            if n not in ancestors and n not in proj.nodes:
                ancestors.add(n)
                stack.extend(n.all_input_nodes)
        reached, stack = [], [proj.output]
        while stack:
            for user in users(stack.pop()):
                if user in ancestors and op_name(user) in MOVES and user not in reached:
                    reached.append(user)
                    stack.append(user)
        cuts = [n for n in reached if n is target or any(u in ancestors and u not in reached for u in users(n))]
        if not cuts:
            return None
        shape = proj.output.meta["val"].shape                                 # (.., out_features)
        numbers = torch.arange(shape[-1], dtype=torch.float32).expand(*shape)
        values = self.evaluate(reached, {proj.output: numbers})
        orders = {n: list(dict.fromkeys(int(x) for x in v.flatten().tolist()))
                  for n, v in values.items() if isinstance(v, torch.Tensor)}
        # The features that reach the target are those of every cut; read their order at the last node
        # holding all of them (partial rotary splits a head, rotates one part, and concatenates).
        union = {i for c in cuts for i in orders.get(c, ())}
        whole = [n for n in orders if set(orders[n]) == union]
        return orders[max(whole, key=self.order.__getitem__)] if whole else None

    def val(self, node: fx.Node):
        """The fake value export recorded for ``node`` (shape and dtype), or None."""
        return node.meta.get("val")
