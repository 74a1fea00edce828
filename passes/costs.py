"""The pass that prices each rewrite.

``estimate_costs``: parameters and forward FLOPs (sympy, in N and B) of each site before and after, the
"after" side read from replacements built on the meta device, so nothing is allocated or projected; and
the activation elements per token alive at each site's peak, before and after (``passes/memory.py``).
"""

from __future__ import annotations

import sympy

from m2convert.errors import M2Error
from m2convert.layers.cost import attention_flops, linear_flops
from m2convert.passes.apply import build_replacements
from m2convert.passes.graph import projection_dims
from m2convert.passes.memory import kernel_elements, site_elements
from m2convert.passes.site import CONVERT, SEQUENCE, SKIP, AttentionLayout, ExpertsLayout, MLPLayout, Site


def flops_before(site: Site, model) -> sympy.Expr:
    """Dense cost of a site: its projections (fused ones once) plus the attention core (O(N^2), or O(N W)
    under a sliding window of W keys)."""
    if isinstance(site.layout, ExpertsLayout):                  # stacked experts: no projection modules
        return site.layout.dense_flops()
    total, seen = sympy.Integer(0), set()
    for role in site.roles.values():
        if role.path in seen:
            continue
        seen.add(role.path)
        module = model.get_submodule(role.path)
        total += linear_flops(*projection_dims(module), bias=getattr(module, "bias", None) is not None)
    if site.kind == SEQUENCE and "q" in site.roles:
        layout = site.layout if isinstance(site.layout, AttentionLayout) else None
        hidden = layout.width if layout is not None else None                 # the channels the core mixes
        keys = layout.keys_seen(site.causal) if layout is not None else None    # a sliding window's keys
        total += attention_flops(hidden or projection_dims(model.get_submodule(site.roles["q"].path))[0], keys)
    return total


def activation_elements(site: Site, model) -> tuple[int, int, int]:
    """(before, after, after while the kernels run) elements per token alive at the site's peak, residual
    stream included (``passes/memory.py``); (0, 0, 0) where the layout is unknown."""
    layout = site.layout
    if isinstance(layout, AttentionLayout):
        return (site_elements("attention", layout.hidden), site_elements("attention", layout.hidden, converted=True),
                kernel_elements("attention", layout.hidden, converted=True))
    if isinstance(layout, ExpertsLayout):
        same = site_elements("mlp", layout.hidden, layout.intermediate, gated=True)
        return same, same, same
    if not isinstance(layout, MLPLayout) or not site.roles:
        return 0, 0, 0
    first = model.get_submodule(next(iter(site.roles.values())).path)
    hidden, inner = projection_dims(first)
    gated = "gate" in site.roles
    if gated and site.roles["gate"].path == site.roles["up"].path:
        inner //= 2                                          # one fused gate_up projection
    before = site_elements("mlp", hidden, inner, gated=gated)
    chained = layout.fold is not None and layout.fold_role == "fc1" and "fc2" in site.roles
    form = {"gated": gated, "chained": chained, "folded": layout.fold is not None}
    return before, site_elements("mlp", hidden, inner, **form), kernel_elements("mlp", hidden, inner, **form)


def describe(site: Site) -> str:
    """Human name of what a site becomes, e.g. 'M2PostNormAttention(bidirectional)'.

    Sequence mixers with Monarch in/out projections say so: 'M2Attention(causal, proj nblocks=16, rank=1)'.
    """
    if site.kind == SEQUENCE:
        s, proj = site.settings, ""
        if s.get("projection_nblocks"):
            proj = f", proj nblocks={s['projection_nblocks']}, rank={s.get('rank', 1)}"
        if s.get("window"):
            proj += f", softmax window {s['window']}"
        if getattr(site.layout, "output_gate", None):
            proj += f", {site.layout.output_gate} output gate"
        adapter = site.layout.adapter if isinstance(site.layout, AttentionLayout) else "M2Attention"
        return f"{adapter}({site.mode}{proj})"
    s = site.settings
    if isinstance(site.layout, ExpertsLayout):
        return f"MonarchExperts({site.layout.experts} experts, nblocks={s['nblocks']}, rank={s['rank']})"
    return f"{len(site.replaces)}x MonarchLinear(nblocks={s['nblocks']}, rank={s['rank']})"


def estimate_costs(ctx) -> int:
    """Pass: params and FLOPs before/after for every site that got far enough to be priced."""
    model = ctx.captured.model
    priced = 0
    for site in ctx.sites:
        if not site.roles and not isinstance(site.layout, ExpertsLayout):
            continue
        params = {id(p): p for path in site.replaces for p in model.get_submodule(path).parameters()}
        site.params_before = sum(p.numel() for p in params.values())
        site.flops_before = flops_before(site, model)
        site.act_before, site.act_after, site.act_kernels = activation_elements(site, model)
        if site.status == SKIP:
            continue
        site.replacement = describe(site)
        if site.layout is None:
            # An excluded site whose analysis stopped early (it could not convert anyway) has no
            # layout to build from; it is shown without the "after" side.
            continue
        try:
            new = build_replacements(site, model, seed=False, device="meta")
        except M2Error as exc:
            if site.status == CONVERT:
                site.skip(f"cannot build {site.replacement}: {exc}")
            continue
        site.params_after = sum(p.numel() for m in new.values() for p in m.parameters())
        site.flops_after = sum((m.flops() for m in new.values() if hasattr(m, "flops")), sympy.Integer(0))   # not Identity
        priced += 1
    return priced
