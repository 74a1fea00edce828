"""Name the sequence mixers that are not softmax attention, so a plan lists every way a model mixes tokens.

Mamba and other state-space layers, gated linear attention (delta-net) and short-convolution layers are
already sub-quadratic; m2convert keeps them. They are found by dataflow: each runs a depthwise convolution
along the sequence (``conv1d`` with one input channel per group and more than one tap), and the module
that runs it (the layer's mixer: the Conv1d module's parent where the convolution is a module call)
becomes a skipped site of pattern
``"subquadratic-mixer"`` whose reason names its class, its convolution and whether a scan or a chunked
recurrence follows, priced at two FLOPs per parameter and token (its projections; its convolution and
scan are linear in N). Convolutions inside an attention site (ConvBERT's span convolution) are that
site's business.

Example:
    >>> class ShortConv(nn.Module):                  # a gated short-convolution mixer
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.in_proj, self.out_proj = nn.Linear(16, 32), nn.Linear(16, 16)
    ...         self.conv = nn.Conv1d(16, 16, 3, groups=16, padding=2)
    ...     def forward(self, x):                                            # x: (B, N, 16)
    ...         gate, u = self.in_proj(x).chunk(2, -1)
    ...         u = self.conv(u.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
    ...         return self.out_proj(gate.sigmoid() * u)
    >>> plan = m2.plan(nn.Sequential(ShortConv()), example_inputs=(torch.randn(1, 8, 16),))
    >>> [(s.fqn, s.pattern, s.status) for s in plan.sites if s.kind == "sequence"]
    [('0', 'subquadratic-mixer', 'skip')]
    >>> print(plan.sites[0].reason.split(";")[0])
    a sequence mixer that is not softmax attention (ShortConv: a depthwise convolution of 3 taps along the sequence)
"""

from __future__ import annotations

import sympy
from torch import fx, nn

from m2convert.layers.base import M2Block
from m2convert.layers.cost import B, N
from m2convert.passes.graph import GraphIndex, module_path, op_name, within
from m2convert.passes.site import SEQUENCE, Site

PATTERN = "subquadratic-mixer"
CONVOLUTIONS = ("aten.conv1d", "aten.convolution", "aten._convolution")
RECURRENCES = ("aten.cumsum", "aten.cumprod", "aten.logcumsumexp")


def sequence_convolutions(index: GraphIndex) -> list[tuple[fx.Node, int]]:
    """(node, taps) of each depthwise convolution along the sequence: a 1-D convolution whose weight is
    (C, 1, K), K > 1, in C groups."""
    found = []
    for node in index.calls(*CONVOLUTIONS):
        weight = node.args[1] if len(node.args) > 1 else None
        val = getattr(weight, "meta", {}).get("val")
        groups = node.args[6] if op_name(node) == "aten.conv1d" and len(node.args) > 6 else \
            node.args[8] if len(node.args) > 8 else node.kwargs.get("groups", 1)
        if val is None or val.dim() != 3 or val.shape[1] != 1 or val.shape[2] < 2 or groups != val.shape[0]:
            continue
        found.append((node, int(val.shape[2])))
    return found


def _mixer_path(conv: fx.Node, model) -> str:
    """The module that ran the convolution, or, where that is the convolution module itself, its parent."""
    path = module_path(conv)
    if isinstance(model.get_submodule(path), nn.Conv1d):
        return path.rsplit(".", 1)[0] if "." in path else ""
    return path


def _converted(model, path: str) -> bool:
    """Whether the module at ``path`` is, or sits inside, an M2 replacement (a converted model planned again)."""
    parts = path.split(".") if path else []
    return any(isinstance(model.get_submodule(".".join(parts[:i])), M2Block) for i in range(len(parts) + 1))


def _follows(index: GraphIndex, mixer: str) -> str:
    ops = {op_name(n) for n in index.nodes if n.op == "call_function" and within(module_path(n), mixer)}
    if ops & set(RECURRENCES):
        return ", then a scan (cumulative sum / product) over it"
    if any("scan" in op or "while_loop" in op for op in ops):
        return ", then a recurrent scan"
    return ""


def name_other_mixers(ctx) -> int:
    """Pass: a skipped site for each module mixing along the sequence by a depthwise convolution that no
    attention site owns. Returns how many."""
    index: GraphIndex = ctx.index
    owned = [s.fqn for s in ctx.sites if s.kind == SEQUENCE]
    model = ctx.captured.model
    found = 0
    for conv, taps in sequence_convolutions(index):
        mixer = _mixer_path(conv, model)
        if any(within(mixer, fqn) or within(fqn, mixer) for fqn in owned):
            continue
        module = model.get_submodule(mixer)
        if _converted(model, mixer):
            continue                                    # an M2 mixer's own short convolution
        kind = (f"{type(module).__name__}: a depthwise convolution of {taps} taps along the sequence"
                f"{_follows(index, mixer)}")
        site = Site(mixer, SEQUENCE, PATTERN, replaces=[mixer]).skip(
            f"a sequence mixer that is not softmax attention ({kind}); already sub-quadratic in N, so it is "
            "kept as it is")
        site.params_before = sum(p.numel() for p in module.parameters())
        site.flops_before = sympy.Integer(2 * site.params_before) * B * N
        ctx.add(site, f"{PATTERN} at '{mixer}'")
        # Its own parts are not sites of their own (RG-LRU's stacked gate weights, skipped as stacked 3-D
        # weights): the mixer's site speaks for them.
        ctx.sites[:] = [s for s in ctx.sites if s is site or not (s.status == "skip" and within(s.fqn, mixer))]
        owned.append(mixer)
        found += 1
    return found
