"""Passes that apply the user's choices to the matched sites and price each rewrite.

``select_sites``: ConvertConfig.sequence / dimension, per-path overrides and filter_fn decide which
sites convert and with which settings. ``check_sharing``: sites whose modules or parameters are also
reached from elsewhere (one module object at two paths, tied weights) are skipped, since a replacement
would either change the other use too or silently split the two. ``estimate_costs``: parameters and
forward FLOPs (sympy, in N and B) of each site before and after, the "after" side read from
replacements built on the meta device, so nothing is allocated or projected.
"""

from __future__ import annotations

import sympy

from m2convert.errors import ConfigError, M2Error
from m2convert.layers.cost import attention_flops, linear_flops
from m2convert.passes.apply import build_replacements
from m2convert.passes.graph import projection_dims, within
from m2convert.passes.site import CONVERT, DIMENSION, EXCLUDE, SEQUENCE, SKIP, AttentionLayout, Site


def _site_settings(site: Site, settings: dict) -> dict:
    if site.kind == SEQUENCE:
        mode = "bidirectional" if not site.causal else settings["causal_mode"]
        out = {"mode": mode, "filter_order": settings["filter_order"], "filter_emb_dim": settings["filter_emb_dim"],
               "projection_nblocks": settings["projection_nblocks"]}
        if settings["projection_nblocks"]:
            out["rank"] = settings["rank"]                      # of the Monarch in/out projections
        return out
    return {"nblocks": settings["nblocks"], "rank": settings["rank"]}


def select_sites(ctx) -> int:
    """Pass: settings per site from the config; exclude what the user left out. Returns sites kept.

    Skipped sites the user leaves out are excluded as well (see :meth:`Site.exclude`).
    """
    cfg, model = ctx.config, ctx.captured.model
    for site in ctx.sites:
        settings, pattern = cfg.settings_for([site.fqn, *site.replaces])
        site.settings = _site_settings(site, settings or cfg.settings_for([])[0])
        if site.status == EXCLUDE:
            continue
        if site.kind == SEQUENCE and not cfg.sequence:
            site.exclude("sequence=False: attention is kept")
        elif site.kind == DIMENSION and not cfg.dimension:
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


def _quoted(paths) -> str:
    """'a' and 'b' / 'a', 'b' and 'c'."""
    names = [f"'{p or '(model)'}'" for p in paths]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _topmost(path: str, shared: dict) -> str | None:
    """The outermost shared module at or above ``path`` (the object that was aliased), or None."""
    parts = path.split(".") if path else []
    for i in range(len(parts) + 1):
        anc = ".".join(parts[:i])
        if anc in shared:
            return anc
    return None


def shared_module_reason(site: Site, shared: dict) -> str | None:
    """Why ``site`` involves a module object reachable by two or more paths, or None if it does not.

    A site involves one when a module it replaces or reads (its roles, its norm) is such an object or
    sits inside one, or when a module it replaces contains one.
    """
    if not shared:
        return None
    paths = site.read_paths()
    found = next((top for p in paths if (top := _topmost(p, shared)) is not None), None)
    if found is None:
        inner = sorted((q for p in site.replaces if p for q in shared if q != p and within(q, p)), key=len)
        found = inner[0] if inner else None
    if found is None:
        return None
    every = "both" if len(shared[found]) == 2 else f"all {len(shared[found])}"
    return (f"module object shared by paths {_quoted(shared[found])}; converting it would change {every}: "
            "un-share it (copy.deepcopy) or exclude it with overrides {regex: None}")


def tied_parameter_reason(site: Site, model, owners: dict) -> str | None:
    """Why ``site`` replaces a parameter that is also reached from outside the replaced module, or None.

    ``owners``: id(parameter) -> every name it has in ``model`` (named_parameters without dedup).
    """
    for path in site.replaces:
        for name, param in model.get_submodule(path).named_parameters(remove_duplicate=False):
            outside = [n for n in owners.get(id(param), ()) if not within(n.rpartition(".")[0], path)]
            if outside:
                inside = f"{path}.{name}" if path else name
                return (f"parameter '{inside}' is the same tensor as {_quoted(outside)} (tied weights); the "
                        "replacement would hold an independent copy and the tie would be lost: untie them "
                        "(assign a cloned nn.Parameter) or exclude the site with overrides {regex: None}")
    return None


def check_sharing(ctx) -> int:
    """Pass: skip sites involving a module shared by two paths or a parameter tied to another module.

    Returns how many sites it skipped. A shared module replaces an earlier reason (it is the root cause
    of, e.g., "runs twice per forward"). Runs before :func:`select_sites`, so a user exclusion of such a
    site still turns it into "exclude".
    """
    model, shared = ctx.captured.model, ctx.captured.shared
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    count = 0
    for site in ctx.sites:
        if site.status not in (CONVERT, SKIP):
            continue
        why = shared_module_reason(site, shared)
        if why is not None:
            site.skip(why, root_cause=True)
            count += 1
        elif site.status == CONVERT and (why := tied_parameter_reason(site, model, owners)) is not None:
            site.skip(why)
            count += 1
    return count


def flops_before(site: Site, model) -> sympy.Expr:
    """Dense cost of a site: its projections (fused ones once) plus the O(N^2) attention core."""
    total, seen = sympy.Integer(0), set()
    for role in site.roles.values():
        if role.path in seen:
            continue
        seen.add(role.path)
        module = model.get_submodule(role.path)
        total += linear_flops(*projection_dims(module), bias=getattr(module, "bias", None) is not None)
    if site.kind == SEQUENCE and "q" in site.roles:
        hidden = site.layout.hidden if isinstance(site.layout, AttentionLayout) else None
        total += attention_flops(hidden or projection_dims(model.get_submodule(site.roles["q"].path))[0])
    return total


def describe(site: Site) -> str:
    """Human name of what a site becomes, e.g. 'M2PostNormAttention(bidirectional)'.

    Sequence mixers with Monarch in/out projections say so: 'M2Attention(causal, proj nblocks=16, rank=1)'.
    """
    if site.kind == SEQUENCE:
        s, proj = site.settings, ""
        if s.get("projection_nblocks"):
            proj = f", proj nblocks={s['projection_nblocks']}, rank={s.get('rank', 1)}"
        adapter = site.layout.adapter if isinstance(site.layout, AttentionLayout) else "M2Attention"
        return f"{adapter}({site.mode}{proj})"
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
        site.flops_after = sum((m.flops() for m in new.values()), sympy.Integer(0))
        priced += 1
    return priced
