"""Lowering: rewrite the reference subgraphs of a captured converted model into the fused ``m2::`` ops.

    Monarch multiply   reshape/transpose/bmm/permute/bmm chain   -> m2::monarch_matmul(x, w1, w2)
                       ... then [..., :out], + bias, GELU/ReLU/SiLU -> m2::monarch_linear(x, w1, w2, bias, out, act)
    long convolution   rfft * mul * irfft (or the Monarch-DFT    -> m2::gated_long_conv(v, x1, x2, k, k_rev, D)
                       GEMMs) with the gates and skip around it

The rules (``lower_rules.py``) read each subgraph's structure; before anything is rewritten the pass
evaluates the subgraph and the fused op on the same random operands (shapes from the capture) and fuses
only when they agree, so a chain that merely looks like a Monarch multiply (another permutation, factors
that do not chain) is left as it is and reported with its reason. ``M2_DEBUG=1`` logs every rule that
fired, and where.

What :func:`lower` returns: a :class:`LoweredModule`, an nn.Module around rewritten torch.export graphs
(``ep.module()``), with batch and sequence length dynamic. It takes the arguments of the model it came
from and returns what the model returned. The example inputs (by default ``input_ids`` and
``attention_mask``, and ``use_cache=False``, which stays the default) are lowered at once; a call with
another set of arguments (``input_ids`` alone) is captured and lowered on its first call, leaving out what
the call leaves out, so the model handles a missing argument as it always does. The graphs are fixed in
eval mode (dropout off); gradients flow through the fused ops. Export it again with
``torch.export.export(lowered, (), inputs)`` or ``m2.export`` (the ``m2::`` ops stay ops), or save
``lowered.exported`` directly with ``torch.export.save``. To lower inside an export, call
:func:`lower_program` on the freshly exported program.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, TensorArgument

from m2convert.errors import CaptureError
from m2convert.kernels import ops as _ops  # noqa: F401  registers torch.ops.m2 (torch.export.load of lowered programs)
from m2convert.passes.capture import check_model
from m2convert.passes.graph import BOOKKEEPING, module_path, op_name
from m2convert.passes.inputs import bind_by_name, example_inputs_for, export_dynamic, signed, split_inputs
from m2convert.passes.lower_check import check, region
from m2convert.passes.lower_rules import RULES, Candidate, Emit, GraphView, Skip
from m2convert.passes.pipeline import PassResult, debug

@dataclass
class Fused:
    """One rewritten site: the rule, the module it belongs to, the op now there, nodes it replaced."""

    rule: str
    site: str
    op: str
    node: str
    replaced: int
    detail: str = ""


@dataclass
class Unfused:
    """A reference subgraph left as it was, with the reason."""

    rule: str
    site: str
    anchor: str
    reason: str


@dataclass
class LowerResult(PassResult):
    """What the lowering pass did: ``matched`` sites fused (listed in ``fused``), ``unfused`` with reasons.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> converted = m2.convert(transformers.BertModel(config))
        >>> inputs = {"input_ids": torch.ones(2, 16, dtype=torch.long)}                  # (B, N)
        >>> result = lower_program(torch.export.export(converted, (), inputs, strict=False))
        >>> result.count("m2::monarch_linear"), [u.reason for u in result.unfused]      # two per MLP
        (2, [])
    """

    fused: list[Fused] = field(default_factory=list)
    unfused: list[Unfused] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def count(self, op: str | None = None) -> int:
        """Sites fused into ``op`` (e.g. "m2::gated_long_conv"), or into any op."""
        return sum(1 for f in self.fused if op is None or f.op == op)

    def __str__(self) -> str:
        lines = [f"lowering: {self.matched} sites fused, {len(self.unfused)} left unfused ({self.seconds:.2f} s)"]
        lines += [f"  fused    {f.op:<20} {f.site or '<root>'}  [{f.rule}: {f.detail}; {f.replaced} nodes]"
                  for f in self.fused]
        lines += [f"  unfused  {u.site or '<root>'} at {u.anchor}  [{u.rule}]: {u.reason}" for u in self.unfused]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _call(g: GraphView, target, args: tuple, like: fx.Node) -> fx.Node:
    node = g.graph.call_function(target, args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    fake = fx.node.map_arg(args, lambda a: a.meta["val"])
    with g.fake_mode:
        node.meta["val"] = target(*fake)
    return node


def _rename_output(ep: torch.export.ExportedProgram, old: str, new: str) -> None:
    for spec in ep.graph_signature.output_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == old:
            spec.arg = TensorArgument(name=new)
    for entry in ep.module_call_graph:
        if entry.signature is not None:
            entry.signature.outputs = [TensorArgument(name=new) if isinstance(o, TensorArgument) and o.name == old
                                       else o for o in entry.signature.outputs]


def _rewrite(cand: Candidate, nodes: list, g: GraphView) -> tuple[fx.Node, int]:
    made: dict[int, fx.Node] = {}

    def emit(a):
        if isinstance(a, Emit):
            if id(a) not in made:
                made[id(a)] = _call(g, a.target, tuple(emit(x) for x in a.args), cand.anchor)
            return made[id(a)]
        return a

    with g.graph.inserting_before(cand.out):
        new = _call(g, cand.op, tuple(emit(a) for a in cand.args), cand.anchor)
    cand.out.replace_all_uses_with(new)
    _rename_output(g.ep, cand.out.name, new.name)
    removed = 0
    for n in reversed(nodes):
        if all(op_name(u) in BOOKKEEPING for u in n.users):
            for u in list(n.users):
                g.graph.erase_node(u)
            g.graph.erase_node(n)
            g.gone.add(n)
            removed += 1
    g.reorder()
    return new, removed


def lower_program(ep: torch.export.ExportedProgram, rules=RULES) -> LowerResult:
    """Rewrite ``ep``'s graph in place, fusing every reference subgraph the rules find and the check confirms.

    Args:
        ep: a program from ``torch.export.export(model, ..., strict=False)`` (any shapes, static or dynamic).
        rules: the rule table (``lower_rules.RULES``).

    Returns:
        LowerResult: ``matched`` = sites fused; ``fused`` / ``unfused`` list them (unfused with the reason).

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> converted = m2.convert(transformers.BertModel(config))
        >>> ids = torch.ones(2, 16, dtype=torch.long)                                     # (B, N)
        >>> ep = torch.export.export(converted, (), {"input_ids": ids}, strict=False)
        >>> lower_program(ep).matched                 # ep.module() now calls torch.ops.m2.*
        4
    """
    start = time.perf_counter()
    g = GraphView(ep)
    by_anchor: dict[str, list] = {}
    for rule in rules:
        for anchor in rule.anchors:
            by_anchor.setdefault(anchor, []).append(rule)
    result = LowerResult("lower", 0, 0.0)
    for node in list(g.graph.nodes):
        for rule in by_anchor.get(op_name(node), ()) if node not in g.gone else ():
            try:
                found = rule.match(rule.name, node, g)
            except Exception as exc:                      # a layout no rule foresaw: report it, lower the rest
                found = Skip(rule.name, module_path(node), node, f"the rule cannot read this subgraph "
                                                                 f"({type(exc).__name__}: {exc})")
            if isinstance(found, Skip):
                result.unfused.append(Unfused(rule.name, found.site, node.name, found.reason))
                debug(f"lower: rule {rule.name} left '{found.site}' at {node.name}: {found.reason}")
            elif found:
                _apply(found, g, result, rule)
                break
    _drop_orphan_asserts(g.graph)
    g.graph.eliminate_dead_code()
    _drop_unused_constants(ep)
    ep.graph_module.recompile()
    result.matched, result.seconds = len(result.fused), time.perf_counter() - start
    debug(f"pass lower: {result.matched} fused, {len(result.unfused)} unfused")
    return result


def _drop_orphan_asserts(graph) -> None:
    """Erase metadata asserts on values that nothing else reads any more (they would keep dead
    constants, such as the DFT factors of a fused convolution, alive through dead-code elimination)."""
    assert_op = torch.ops.aten._assert_tensor_metadata.default
    for node in [n for n in graph.nodes if n.target is assert_op]:
        value = node.args[0]
        if isinstance(value, torch.fx.Node) and all(u.target is assert_op for u in value.users):
            graph.erase_node(node)


def _drop_unused_constants(ep: torch.export.ExportedProgram) -> None:
    """Remove lifted tensor constants no node reads any more (e.g. the DFT factors of fused convolutions)."""
    sig = ep.graph_signature
    unused = {n.name: n for n in ep.graph.nodes
              if n.op == "placeholder" and not n.users and n.name in sig.inputs_to_lifted_tensor_constants}
    for spec in [s for s in sig.input_specs if s.kind == InputKind.CONSTANT_TENSOR and s.arg.name in unused]:
        sig.input_specs.remove(spec)
        ep.constants.pop(spec.target, None)
        ep.graph.erase_node(unused[spec.arg.name])


def _apply(candidates: list[Candidate], g: GraphView, result: LowerResult, rule) -> None:
    first = candidates[0]
    reason = None
    for i, cand in enumerate(candidates):
        nodes, why = region(cand, g)
        why = why or check(cand, nodes, g, seed=len(result.fused) * 7 + i)
        if why is None:
            new, removed = _rewrite(cand, nodes, g)
            result.fused.append(Fused(cand.rule, cand.site, cand.op.name(), new.name, removed, cand.detail))
            debug(f"lower: rule {rule.name} [{rule.algebra}] fired at '{cand.site}' ({cand.anchor.name} -> "
                  f"{new.name}, {removed} nodes): {cand.detail}")
            return
        reason = reason or why
    result.unfused.append(Unfused(first.rule, first.site, first.anchor.name, reason))
    debug(f"lower: rule {first.rule} left '{first.site}' at {first.anchor.name}: {reason}")


class LoweredModule(nn.Module):
    """A model whose reference subgraphs run as fused ``m2::`` ops: rewritten torch.export graphs.

    Attributes:
        program: the GraphModule (``exported.module()``) lowered on the example inputs.
        exported: its rewritten ExportedProgram (``torch.export.save(lowered.exported, "model.pt2")``).
        result: its :class:`LowerResult` (sites fused and left).
        config: the source model's Hugging Face config, where it had one.

    ``forward`` takes the arguments of the model it came from (see ``inspect.signature(lowered.forward)``);
    non-tensor example inputs (``use_cache=False``) are the defaults, and an argument the model does not
    name is a TypeError. Each set of arguments given runs its own program: ``program`` for the example
    inputs' set, and for another set one lowered on its first call, with the arguments left out absent from
    that capture too, so the model handles them as it would. The graphs are fixed in eval mode, so
    ``train()`` / ``eval()`` only set the flag.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> lowered = m2.lower(m2.convert(transformers.BertModel(config)))   # inputs: input_ids, attention_mask
        >>> ids = torch.ones(2, 16, dtype=torch.long)                                     # (B, N)
        >>> ep = torch.export.export(lowered, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        >>> sorted({str(n.target) for n in ep.graph.nodes if "m2" in str(n.target)})
        ['m2.gated_long_conv.default', 'm2.monarch_linear.default']
        >>> lowered(input_ids=ids).last_hidden_state.shape     # no mask: lowered again for this set, once
        torch.Size([2, 16, 32])
    """

    def __init__(self, program: fx.GraphModule, exported: torch.export.ExportedProgram, result: LowerResult,
                 source: _Source | None, fixed: dict):
        super().__init__()
        self.program, self.exported, self.result = program, exported, result
        self._source, self._fixed = source, fixed
        self._signature = inspect.signature(self.forward)
        self._programs: dict[tuple, tuple[fx.GraphModule, int]] = {}     # key -> (program, positional inputs)

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)           # TypeError naming an unknown or missing argument
        given = [(name, bound.arguments[name] if name in bound.arguments else self._fixed[name])
                 for name in self._signature.parameters if name in bound.arguments or name in self._fixed]
        key = _key(given)
        if key not in self._programs:
            self._programs[key] = self._lower_for(dict(given))
        program, n_args = self._programs[key]
        return program(*(v for _, v in given[:n_args]), **dict(given[n_args:]))

    def _lower_for(self, given: dict) -> tuple[fx.GraphModule, int]:
        """Capture and lower the source model for the arguments ``given``; (program, positional inputs)."""
        names = ", ".join(given)
        if self._source is None:
            raise CaptureError(f"this program was lowered from an ExportedProgram and runs only the arguments it "
                               f"was exported with, not ({names}); lower the model itself to call it with others")
        if torch.compiler.is_compiling():
            raise CaptureError(f"the lowered model has no program for the arguments ({names}) yet and cannot "
                               "lower one while it is traced; call it once with them first")
        example = self._source.example
        # The example's tensors where they cover the call's (shapes export keeps dynamic), else the call's own.
        tensors = [n for n, v in given.items() if isinstance(v, torch.Tensor)]
        ours = all(isinstance(example.get(n), torch.Tensor) for n in tensors)
        inputs = {n: example[n] if ours and n in tensors else v.detach() if n in tensors else v
                  for n, v in given.items()}
        ep, notes = export_dynamic(self._source.model, inputs, self._source.dynamic)
        result = lower_program(ep)
        debug(f"lower: lowered again for the arguments ({names}): {result.matched} sites fused"
              + "".join(f"; {n}" for n in notes))
        return ep.module(), 0

    def train(self, mode: bool = True) -> "LoweredModule":
        self.training = mode
        return self


@dataclass
class _Source:
    """What lowering for another set of arguments captures: the model, its example inputs by name."""

    model: nn.Module
    example: dict
    dynamic: bool


def _key(given: list[tuple[str, object]]) -> tuple:
    """Which program a call runs: the names given, tensors by name, other values (constants in the
    graph, such as ``use_cache=False``) by value."""
    for name, value in given:
        if not isinstance(value, (torch.Tensor, type(None), bool, int, float, str)):
            raise TypeError(f"LoweredModule: argument '{name}' is a {type(value).__name__}; a lowered model "
                            "takes tensors and constants (None, bools, numbers, strings)")
    return tuple((name, torch.Tensor if isinstance(value, torch.Tensor) else value) for name, value in given)


def _n_positional(ep: torch.export.ExportedProgram) -> int:
    spec = ep.call_spec.in_spec                                              # (args, kwargs)
    return (spec.child(0) if hasattr(spec, "child") else spec.children_specs[0]).num_children


def _lowered_module(ep: torch.export.ExportedProgram, result: LowerResult, model: nn.Module | None,
                    example: tuple[tuple, dict], dynamic: bool) -> LoweredModule:
    """The LoweredModule of ``ep``, signed like ``model.forward`` (or, when ``model`` is None or its forward
    does not name the inputs, like the captured inputs: positional ones first, then keyword-only ones),
    constant inputs defaulting to their captured value; ``ep`` is the program of the example's arguments."""
    P = inspect.Parameter
    program, n_args = ep.module(), _n_positional(ep)
    fixed = {s.arg.name: s.arg.value for s in ep.graph_signature.input_specs
             if type(s.arg).__name__ == "ConstantArgument"}
    named = bind_by_name(model, *example, defaults=fixed) if model is not None else None
    if named is None:
        params, source = [P(name, P.POSITIONAL_OR_KEYWORD) if i < n_args else
                          P(name, P.KEYWORD_ONLY, default=fixed.get(name, P.empty))
                          for i, name in enumerate(inspect.signature(program.forward).parameters)], None
    else:
        params, source = named[0], _Source(model, named[1], dynamic)
    lowered = signed(LoweredModule, [P("self", P.POSITIONAL_OR_KEYWORD), *params], "LoweredModule")(
        program, ep, result, source, fixed)
    given = [p.name for p in params if source is None or p.name in source.example or p.name in fixed]
    lowered._programs[tuple((n, fixed[n]) if n in fixed else (n, torch.Tensor) for n in given)] = (program, n_args)
    return lowered


def lower(model, example_inputs=None, dynamic: bool = True) -> LoweredModule:
    """Capture a converted model and run it with the fused ``m2::`` kernels.

    Args:
        model: a converted model (``m2.convert``), or an ExportedProgram (rewritten in place).
        example_inputs: dict of keyword tensors (e.g. ``{"input_ids": ids}``, (B, N)) or tuple of positional
            tensors; built from ``model.config`` when None (input_ids + attention_mask, B=2, N=16). Calls
            with another set of arguments are lowered again, on these inputs where they cover the call's.
        dynamic: keep batch and sequence length symbolic (falling back to static shapes if the model
            cannot be captured so; ``result.notes`` says so).

    Returns:
        LoweredModule: call it like the model (the same arguments, optional ones optional); ``.result``
        lists what was fused for the example inputs.

    Raises:
        UnsupportedModelError: ``model`` is not an nn.Module.  CaptureError: torch.export failed.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> lowered = m2.lower(m2.convert(transformers.BertModel(config)))
        >>> lowered.result.count("m2::monarch_linear")          # two MonarchLinear per MLP, with bias (fc1: + GELU)
        4
        >>> ids = torch.ones(2, 16, dtype=torch.long)
        >>> lowered(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.shape     # (B, N, H)
        torch.Size([2, 16, 32])
        >>> lowered(ids).last_hidden_state.shape                # input_ids alone, as the model takes it
        torch.Size([2, 16, 32])
    """
    if isinstance(model, torch.export.ExportedProgram):
        ep, notes, source, example = model, [], None, ((), {})
    else:
        source = check_model(model, "m2.lower")
        example_inputs = example_inputs_for(model) if example_inputs is None else example_inputs
        ep, notes = export_dynamic(source, example_inputs, dynamic)
        example = split_inputs(example_inputs)
    result = lower_program(ep)
    result.notes += notes
    lowered = _lowered_module(ep, result, source, example, dynamic)
    if getattr(model, "config", None) is not None:
        lowered.config = model.config                    # position limits etc. for whoever exports it next
    return lowered
