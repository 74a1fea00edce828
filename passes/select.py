"""Passes that apply the user's choices to the matched sites and price each rewrite.

``select_sites``: ConvertConfig.sequence / dimension, per-path overrides and filter_fn decide which
sites convert and with which settings. ``estimate_costs``: parameters and forward FLOPs (sympy, in N
and B) of each site before and after, the "after" side read from replacements built on the meta
device, so nothing is allocated or projected.
"""

from __future__ import annotations

import sympy

from ..errors import ConfigError, M2Error
from ..layers.cost import attention_flops, linear_flops
from .apply import build_replacements
from .graph import projection_dims
from .site import CONVERT, SKIP, Site


def _site_settings(site: Site, settings: dict) -> dict:
    if site.kind == "sequence":
        mode = "bidirectional" if not site.causal else settings["causal_mode"]
        return {"mode": mode, "filter_order": settings["filter_order"], "filter_emb_dim": settings["filter_emb_dim"]}
    return {"nblocks": settings["nblocks"], "rank": settings["rank"]}


def select_sites(ctx) -> int:
    """Pass: settings per site from the config; exclude what the user left out. Returns sites kept."""
    cfg, model = ctx.config, ctx.captured.model
    for site in ctx.sites:
        settings, pattern = cfg.settings_for([site.fqn, *site.replaces])
        site.settings = _site_settings(site, settings or cfg.settings_for([])[0])
        if site.status != CONVERT:
            continue
        if site.kind == "sequence" and not cfg.sequence:
            site.exclude("sequence=False: attention is kept")
        elif site.kind == "dimension" and not cfg.dimension:
            site.exclude("dimension=False: dense MLPs are kept")
        elif settings is None:
            site.exclude(f"excluded by override '{pattern}'")
        elif cfg.filter_fn is not None:
            for path in site.replaces:
                try:
                    keep = cfg.filter_fn(model.get_submodule(path), path)
                except Exception as exc:
                    raise ConfigError(f"filter_fn raised {type(exc).__name__} for '{path}': {exc}") from exc
                if not keep:
                    site.exclude(f"filter_fn returned False for '{path}'")
                    break
    return sum(s.status == CONVERT for s in ctx.sites)


def flops_before(site: Site, model) -> sympy.Expr:
    """Dense cost of a site: its projections (fused ones once) plus the O(N^2) attention core."""
    total, seen = sympy.Integer(0), set()
    for info in site.roles.values():
        if info["path"] in seen:
            continue
        seen.add(info["path"])
        module = model.get_submodule(info["path"])
        total += linear_flops(*projection_dims(module), bias=getattr(module, "bias", None) is not None)
    if site.kind == "sequence" and "q" in site.roles:
        q = model.get_submodule(site.roles["q"]["path"])
        total += attention_flops(site.layout.get("hidden") or projection_dims(q)[0])
    return total


def describe(site: Site) -> str:
    """Human name of what a site becomes, e.g. 'M2PostNormAttention(bidirectional)'."""
    if site.kind == "sequence":
        return f"{site.layout.get('adapter', 'M2Attention')}({site.mode})"
    s = site.settings
    return f"{len(site.replaces)}x MonarchLinear(nblocks={s['nblocks']}, rank={s['rank']})"


def estimate_costs(ctx) -> int:
    """Pass: params and FLOPs before/after for every site that got far enough to be priced."""
    model = ctx.captured.model
    priced = 0
    for site in ctx.sites:
        if not site.roles:
            continue
        params = {id(p): p for path in site.replaces for p in model.get_submodule(path).parameters()}
        site.params_before = sum(p.numel() for p in params.values())
        site.flops_before = flops_before(site, model)
        if site.status == SKIP:
            continue
        site.replacement = describe(site)
        try:
            new = build_replacements(site, model, seed=False, device="meta")
        except M2Error as exc:
            site.skip(f"cannot build {site.replacement}: {exc}")
            continue
        site.params_after = sum(p.numel() for m in new.values() for p in m.parameters())
        site.flops_after = sum((m.flops() for m in new.values()), sympy.Integer(0))
        priced += 1
    return priced
