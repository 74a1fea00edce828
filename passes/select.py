"""The pass that applies the user's choices to the matched sites.

``select_sites``: ConvertConfig.sequence / dimension, per-path overrides and filter_fn decide which
sites convert and with which settings.
"""

from __future__ import annotations

from m2convert.config import LOCAL_KEEP_TOKENS
from m2convert.errors import ConfigError
from m2convert.layers.sequence import SHORT_KERNEL
from m2convert.passes.graph import within
from m2convert.passes.site import CONVERT, DIMENSION, EXCLUDE, SEQUENCE, Site


def local_window(site: Site, policy: str) -> str | None:
    """Settle a sliding-window site under ``ConvertConfig.local_attention``: set its filters' window
    (``settings["filter_window"]``: offsets per direction, the window less the short convolution's
    reach, so each output still sees only its window's tokens) and return None, or return why it is kept."""
    window = getattr(site.layout, "window", None)
    if window is None:
        return None
    span = site.layout.keys_seen(site.causal)
    what = (f"local attention (each query sees {span} tokens: " +
            (f"itself and the {window - 1} before it)" if site.causal else f"up to {window - 1} on either side)"))
    if policy == "keep":
        return f"{what}; local_attention='keep'"
    if policy == "auto" and span <= LOCAL_KEEP_TOKENS:
        return (f"{what}: kept, already cheap and exact (local_attention='auto' converts windows wider than "
                f"{LOCAL_KEEP_TOKENS} tokens; 'convert' converts this one)")
    taps = window - (SHORT_KERNEL - 1)
    if taps < 1:
        return (f"{what}: narrower than the mixer's short convolution ({SHORT_KERNEL} taps), which would "
                "see past it; kept")
    site.settings["filter_window"] = taps
    return None


def _site_settings(site: Site, settings: dict) -> dict:
    if site.kind == SEQUENCE:
        mode = "bidirectional" if not site.causal else settings["causal_mode"]
        out = {"mode": mode, "filter_order": settings["filter_order"], "filter_emb_dim": settings["filter_emb_dim"],
               "projection_nblocks": settings["projection_nblocks"]}
        if settings["projection_nblocks"]:
            out["rank"] = settings["rank"]                      # of the Monarch in/out projections
        if settings.get("softmax_window"):
            out["window"] = _softmax_window(site, settings["softmax_window"])
        return out
    return {"nblocks": settings["nblocks"], "rank": settings["rank"]}


def _softmax_window(site: Site, window: int) -> int:
    """``window``, once it fits the site: an encoder's window reaches window // 2 tokens either side.
    (A converting site's heads fill its width, heads x head_dim = H: the mixer needs that too.)"""
    if window < 2 and site.causal is False:
        raise ConfigError(f"softmax_window={window}: {site.fqn} is an encoder layer, whose window reaches "
                          "window // 2 tokens either side; use 2 or more")
    return window


def check_feeds(sites: list[Site]) -> None:
    """Skip each converting attention site that computes a value another module reads (``layout.feeds``)
    unless every such reader is a converting site too (it then reads nothing the site made), until no
    more change (e.g. a converted first layer that made the position bias its kept successors read)."""
    changed = True
    while changed:
        converting = [s.fqn for s in sites if s.status == CONVERT and s.kind == SEQUENCE]
        changed = False
        for site in sites:
            feeds = getattr(site.layout, "feeds", None) or []
            missing = [f for f in feeds if not any(within(f, c) for c in converting)]
            if site.status == CONVERT and missing:
                site.skip(f"it computes a value that {missing} also read (a position bias, a shared mask): they "
                          "keep running the original code, so the site converts only together with them")
                changed = True


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
        elif site.kind == SEQUENCE and (kept := local_window(site, cfg.local_attention)):
            site.exclude(kept)
        elif cfg.filter_fn is not None:
            for path in site.replaces:
                try:
                    keep = cfg.filter_fn(model.get_submodule(path), path)
                except Exception as exc:
                    raise ConfigError(f"filter_fn raised {type(exc).__name__} for '{path}': {exc}") from exc
                if not keep:
                    site.exclude(f"filter_fn returned False for '{path}'")
                    break
    check_feeds(ctx.sites)
    return sum(s.status == CONVERT for s in ctx.sites)
