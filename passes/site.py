"""Site: one place in a model that the plan converts (or explains why it does not), with typed layouts.

A site's ``layout`` is one dataclass per site kind (``passes/layouts.py``: :class:`AttentionLayout`,
:class:`MLPLayout`, :class:`ExpertsLayout`); each projection a site reads is a :class:`Role`.
Saved plans carry ``PLAN_VERSION``; :meth:`Site.from_dict` reads every version written so far.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import sympy

from m2convert.layers.cost import B, N
from m2convert.passes.layouts import (DIMENSION, LAYOUTS, SEQUENCE, AttentionLayout, ExpertsLayout,  # noqa: F401
                                      MLPLayout, NormLayout, OffsetBias, Role, SiteLayout, layout_from_dict)

CONVERT, SKIP, EXCLUDE = "convert", "skip", "exclude"

# Version 1: layouts and roles as plain dicts (no "type" key). Version 2: each layout names its type.
PLAN_VERSION = 2


@dataclass
class Selection:
    """How a budget of attention to keep treated one attention site (``m2convert.selection``).

    Attributes:
        method: "kl", "offset-fit" or "uniform".
        score: higher is more worth keeping. kl: how much the aligned, fully converted model's KL to the
            teacher drops when this site keeps softmax attention; offset-fit: the relative error of the best
            convolution fit of its average attention; uniform: None.
        rank: 1 for the site most worth keeping, among the candidates.
        kept: whether the budget keeps its attention.
        budget: the budget in words ("2 layers", "4096 KV-cache bytes per token", "12.5% of the heads").
        kv_bytes: the KV-cache bytes per token this site holds as attention (its kept heads' at head level).
        groups: at head level, one ``{"group", "heads", "score", "rank", "kept"}`` per KV group (its query
            heads); score, rank and kept above are then the site's best group's.
    """

    method: str
    score: float | None
    rank: int
    kept: bool
    budget: str
    kv_bytes: int = 0
    groups: list[dict] | None = None


@dataclass
class Site:
    """A matched attention ("sequence") or MLP ("dimension") site.

    Attributes:
        fqn: module path owning the site (the attention module; the module holding the MLP).
        kind: "sequence" | "dimension".
        pattern: name of the registered pattern that matched, e.g. "sdpa-attention", "eager-attention",
            "gelu-mlp", "gated-mlp".
        causal: attention only: True (causal mask or is_causal), False (bidirectional), None (unknown).
        replaces: module paths the rewrite swaps (the attention module; each MLP linear; the experts module).
        roles: role name -> :class:`Role`: q/k/v/o for attention, fc1/fc2 or gate/up/down for MLPs; none for
            experts sites (their projections are stacked parameters, named in :class:`ExpertsLayout`).
        layout: :class:`AttentionLayout`, :class:`MLPLayout` or :class:`ExpertsLayout`; None while the
            analysis stopped early.
        status: "convert", "skip" (cannot convert; ``strict`` makes it an error) or "exclude" (the
            user's config left it out).
        reason: why a site is skipped or excluded.
        replacement, settings: what the site becomes and with which settings.
        params_before, params_after: parameters of the replaced modules and of their replacements.
        flops_before, flops_after: forward FLOPs as sympy expressions in N (tokens) and B (batch).
        act_before, act_after: activation elements per token alive at the site's peak, the residual stream
            included (``passes/memory.py``); times N and the dtype's size, the prefill memory it predicts.
        act_kernels: the converted site's elements per token while its CPU kernels' buffers are alive
            (0: plans saved before it was kept; then ``act_after`` stands in).
        selection: its score and rank when a budget chose which attention to keep (:class:`Selection`).

    Example:
        >>> site = Site("mlp", DIMENSION, "gelu-mlp", roles={"fc1": Role("mlp.fc1"), "fc2": Role("mlp.fc2")},
        ...             layout=MLPLayout("gelu"))
        >>> Site.from_dict(site.to_dict()) == site
        True
    """

    fqn: str
    kind: str
    pattern: str
    causal: bool | None = None
    replaces: list[str] = field(default_factory=list)
    roles: dict[str, Role] = field(default_factory=dict)
    layout: SiteLayout | None = None
    status: str = CONVERT
    reason: str | None = None
    replacement: str = ""
    settings: dict = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    flops_before: sympy.Expr | None = None
    flops_after: sympy.Expr | None = None
    act_before: int = 0
    act_after: int = 0
    act_kernels: int = 0
    selection: Selection | None = None

    def skip(self, reason: str, root_cause: bool = False) -> "Site":
        """Mark as not convertible, keeping the first reason.

        A ``root_cause`` reason explains the earlier ones and replaces them (a module shared by two
        paths is also found to "run twice per forward").
        """
        if self.status != SKIP or root_cause:
            self.status, self.reason = SKIP, reason
        return self

    def exclude(self, reason: str) -> "Site":
        """Mark as left out by the user's configuration.

        A skipped site the user leaves out becomes excluded too (keeping why it could not convert), so
        excluding it is a way to make ``strict=True`` accept the plan, as the strict error suggests.
        """
        if self.status == CONVERT:
            self.status, self.reason = EXCLUDE, reason
        elif self.status == SKIP:
            cause = (self.reason or "").split("; ")[0]            # the cause, without the advice after it
            self.status, self.reason = EXCLUDE, f"{reason} (it cannot be converted anyway: {cause})"
        return self

    @property
    def mode(self) -> str | None:
        """Mixer mode for sequence sites: bidirectional, causal or causal-monarch."""
        if self.kind != SEQUENCE:
            return None
        return self.settings.get("mode") or ("bidirectional" if not self.causal else "causal")

    def read_paths(self) -> list[str]:
        """Every module path the site replaces or reads (roles, a kept norm), in order, once each."""
        norm = getattr(self.layout, "norm", None)
        return list(dict.fromkeys([*self.replaces, *(r.path for r in self.roles.values()),
                                   *([norm.path] if norm is not None else [])]))

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("fqn", "kind", "pattern", "causal", "replaces")}
        out["roles"] = {name: asdict(role) for name, role in self.roles.items()}
        out["layout"] = None if self.layout is None else self.layout.to_dict()
        out.update({k: getattr(self, k) for k in ("status", "reason", "replacement", "settings", "params_before",
                                                   "params_after", "act_before", "act_after", "act_kernels")})
        out["flops_before"] = None if self.flops_before is None else str(self.flops_before)
        out["flops_after"] = None if self.flops_after is None else str(self.flops_after)
        out["selection"] = None if self.selection is None else asdict(self.selection)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Site":
        """Rebuild a site from :meth:`to_dict` output of any plan version (extra keys are ignored)."""
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("flops_before", "flops_after"):
            if data.get(key) is not None:
                data[key] = sympy.sympify(data[key], locals={"N": N, "B": B})
        data["roles"] = {name: Role(**role) for name, role in (data.get("roles") or {}).items()}
        data["layout"] = layout_from_dict(data.get("layout"), data.get("kind", ""), data.get("fqn", "plan"))
        if data.get("selection") is not None:
            data["selection"] = Selection(**data["selection"])
        return cls(**data)
