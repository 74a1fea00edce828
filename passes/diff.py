"""Rewrite diffs: the module-level graph of a captured model, and what a plan or a conversion changed.

The module-level graph has one node per module call that runs ops directly (a Linear, a LayerNorm,
the attention core's module, the model's own mask code), one per user input and one for the output;
an edge is data flowing between them. Nodes carry ``path``, ``type``, ``ops`` and graph ``order``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
from torch import nn

from m2convert.layers.base import M2Block
from m2convert.layers.recurrent import recurrent_fits
from m2convert.passes.capture import capture, check_model
from m2convert.passes.graph import BOOKKEEPING, GraphIndex, module_entry, op_name, within
from m2convert.passes.site import AttentionLayout, ExpertsLayout, MLPLayout


def recurrent_text(fit: dict | None) -> str:
    """How the plan table shows a site's recurrent form: "S=4, fit 3.1e-04" (the worse filter's relative
    L2 error), or "-".

    Example:
        >>> recurrent_text({"state_size": 4, "horizon": 256, "filter_error": 3.1e-4, "residual_error": 1e-4})
        'S=4, fit 3.1e-04'
    """
    if not fit:
        return "-"
    errors = [e for e in (fit.get("filter_error"), fit.get("residual_error")) if e is not None]
    return f"S={fit['state_size']}" + (f", fit {max(errors):.1e}" if errors else "")


def module_graph(index: GraphIndex) -> nx.DiGraph:
    """Module-level dataflow graph of a captured model (see the module docstring).

    Example:
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64))
        >>> g = module_graph(GraphIndex(capture(model)))
        >>> g.nodes["encoder.layer.0.attention.self.query"]["type"]
        'Linear'
    """
    g = nx.DiGraph()
    key_of = {}
    for node in index.nodes:
        if node.op == "placeholder":
            if index.is_const(node) or not hasattr(node.meta.get("val"), "shape"):
                continue                                # parameters, buffers, flags like use_cache
            key, path, cls = f"input:{node.name}", f"input:{node.name}", "input"
        elif node.op == "output":
            key, path, cls = "output", "output", "output"
        elif node.op == "call_function" and op_name(node) not in BOOKKEEPING:
            path, cls, call = module_entry(node) or ("", "model", 0)
            key = path if call == 0 else f"{path}@{call}"
        else:
            continue
        if key not in g:
            g.add_node(key, path=path, type=cls, ops=Counter(), order=index.order[node])
        if node.op == "call_function":
            g.nodes[key]["ops"][op_name(node).replace("aten.", "")] += 1
        key_of[node] = key
        for source in node.all_input_nodes:
            if source in key_of and key_of[source] != key:
                g.add_edge(key_of[source], key)
    return g


def plan_graphs(plan) -> tuple[nx.DiGraph, nx.DiGraph, nx.DiGraph]:
    """(before, after, diff) module-level graphs for a plan that still holds its capture."""
    if plan.captured is None:
        raise ValueError("this plan holds no captured graph (it was rebuilt from a dict); run m2.plan(model) again")
    if plan._graphs is not None:
        return plan._graphs
    before = module_graph(GraphIndex(plan.captured))
    # Attention sites swap a whole module for an adapter; MLP sites swap each linear for a MonarchLinear,
    # mixture-of-experts sites their experts module for a MonarchExperts.
    seq = [s for s in plan.converted if isinstance(s.layout, AttentionLayout)]
    dim = {p: s for s in plan.converted if isinstance(s.layout, (MLPLayout, ExpertsLayout)) for p in s.replaces}
    diff = nx.DiGraph()
    mapped = {}
    for key, data in before.nodes(data=True):
        site = next((s for s in seq if within(data["path"], s.fqn)), None)
        attrs = dict(data, before_type=data["type"], after_type=data["type"], change="kept", site=None)
        if site is not None:
            new_key = f"{site.fqn}::m2"
            attrs.update(change="removed", after_type=None, site=site.fqn)
            if new_key not in diff:
                diff.add_node(new_key, path=site.fqn, type=site.layout.adapter, ops=Counter(),
                              order=data["order"], before_type=None, after_type=site.layout.adapter,
                              change="added", site=site.fqn, replacement=site.replacement)
            mapped[key] = new_key
        elif data["path"] in dim:
            new_type = "MonarchExperts" if isinstance(dim[data["path"]].layout, ExpertsLayout) else "MonarchLinear"
            attrs.update(change="replaced", after_type=new_type, site=dim[data["path"]].fqn)
            mapped[key] = key
        else:
            mapped[key] = key
        diff.add_node(key, **attrs)
    for u, v in before.edges:
        gone = diff.nodes[u]["change"] == "removed" or diff.nodes[v]["change"] == "removed"
        diff.add_edge(u, v, change="removed" if gone else "kept")
        mu, mv = mapped[u], mapped[v]
        if gone and mu != mv and not diff.has_edge(mu, mv):
            diff.add_edge(mu, mv, change="added")
    after = nx.DiGraph()
    after.add_nodes_from((k, d) for k, d in diff.nodes(data=True) if d["change"] != "removed")
    after.add_edges_from((u, v) for u, v, d in diff.edges(data=True) if d["change"] != "removed")
    plan._graphs = (before, after, diff)
    return plan._graphs


def plan_graph_diff(plan) -> nx.DiGraph:
    """The diff graph of :meth:`RewritePlan.graph_diff` (node attr ``change``: kept/removed/replaced/added)."""
    return plan_graphs(plan)[2]


@dataclass
class ModuleChange:
    """One module swapped by a conversion; ``recurrent``: for an attention site made recurrent
    (``m2.to_recurrent``), its mixer's state size, horizon and fit errors
    (:func:`~m2convert.layers.recurrent.recurrent_fits`), else None."""

    path: str
    before: str
    after: str
    params_before: int
    params_after: int
    recurrent: dict | None = None


@dataclass
class RewriteDiff:
    """Module- and graph-level comparison of an original model and its converted copy.

    Attributes:
        changes: the swapped modules (path, class before/after, params before/after).
        params_before, params_after: whole-model parameter counts.
        graph: module-level diff graph (node attr ``change``: kept/removed/replaced/added), or None
            when the converted model could not be captured (see ``notes``).
    """

    changes: list[ModuleChange] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    graph: nx.DiGraph | None = None
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        """Graph nodes per change kind."""
        if self.graph is None:
            return {}
        return dict(Counter(d["change"] for _, d in self.graph.nodes(data=True)))

    def __str__(self) -> str:
        lines = [f"{len(self.changes)} module(s) replaced; parameters {self.params_before:,} -> {self.params_after:,}"]
        width = max((len(c.path) for c in self.changes), default=0)
        lines += [f"  {c.path.ljust(width)}  {c.before} -> {c.after}  ({c.params_before:,} -> {c.params_after:,})"
                  + (f"  recurrent {recurrent_text(c.recurrent)}" if c.recurrent else "") for c in self.changes]
        if self.graph is not None:
            lines.append("graph nodes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items())))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"changes": [c.__dict__ for c in self.changes], "params_before": self.params_before,
                "params_after": self.params_after, "graph_counts": self.counts(), "notes": self.notes}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def diff(original: nn.Module, converted: nn.Module, example_inputs=None) -> RewriteDiff:
    """Compare a model with its converted copy, module by module and graph against graph.

    Example:
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64))
        >>> d = m2.diff(model, m2.convert(model))
        >>> print(d)                      # replaced modules, params, graph node counts
        3 module(s) replaced; parameters 29,312 -> ...
          encoder.layer.0.attention           BertAttention -> M2PostNormAttention  (4,288 -> ...)
          encoder.layer.0.intermediate.dense  Linear -> MonarchLinear  (2,112 -> 832)
          encoder.layer.0.output.dense        Linear -> MonarchLinear  (2,080 -> 800)
        graph nodes: added ..., kept ..., removed ..., replaced 2
    """
    check_model(original, "m2.diff")
    check_model(converted, "m2.diff")
    before_modules = dict(original.named_modules())
    out = RewriteDiff(params_before=_params(original), params_after=_params(converted))
    fits = recurrent_fits(converted)
    for path, module in converted.named_modules():
        if isinstance(module, M2Block) and not any(within(path, c.path) for c in out.changes):
            old = before_modules.get(path)
            fit = next((f for name, f in fits.items() if within(name, path)), None)
            out.changes.append(ModuleChange(path, type(old).__name__ if old is not None else "-",
                                            type(module).__name__, _params(old) if old is not None else 0,
                                            _params(module), fit))
    g_before = module_graph(GraphIndex(capture(original, example_inputs)))
    try:
        g_after = module_graph(GraphIndex(capture(converted, example_inputs)))
    except Exception as exc:                       # the module-level comparison above still stands
        out.notes.append(f"graph comparison unavailable: {exc}")
        return out
    g = nx.DiGraph()
    for key, data in g_before.nodes(data=True):
        other = g_after.nodes.get(key)
        kind = "removed" if other is None else "kept" if other["type"] == data["type"] else "replaced"
        g.add_node(key, **data, before_type=data["type"], after_type=other and other["type"], change=kind)
    for key, data in g_after.nodes(data=True):
        if key not in g:
            g.add_node(key, **data, before_type=None, after_type=data["type"], change="added")
    for u, v in g_before.edges:
        g.add_edge(u, v, change="kept" if g_after.has_edge(u, v) else "removed")
    for u, v in g_after.edges:
        if not g.has_edge(u, v):
            g.add_edge(u, v, change="added")
    out.graph = g
    return out
