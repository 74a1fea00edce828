"""The pass that skips sites whose modules or parameters are also reached from elsewhere.

``check_sharing``: one module object at two paths, or tied weights, would either change the other use
too or be silently split by a replacement, so such sites are skipped with the reason and the way out.
"""

from __future__ import annotations

from m2convert.passes.graph import within
from m2convert.passes.site import CONVERT, SKIP, Site


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
