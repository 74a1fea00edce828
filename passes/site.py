"""Site: one place in a model that the plan converts (or explains why it does not)."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from m2convert.layers.cost import B, N

CONVERT, SKIP, EXCLUDE = "convert", "skip", "exclude"
STATUSES = (CONVERT, SKIP, EXCLUDE)


@dataclass
class Site:
    """A matched attention ("sequence") or MLP ("dimension") site.

    Attributes:
        fqn: module path owning the site (the attention module; the module holding the MLP).
        kind: "sequence" | "dimension".
        pattern: which graph pattern matched, e.g. "sdpa-attention", "eager-attention", "gelu-mlp",
            "gated-mlp".
        causal: attention only: True (causal mask or is_causal), False (bidirectional), None (unknown).
        replaces: module paths the rewrite swaps (the attention module; each MLP linear).
        roles: role -> {"path", "rows"}: q/k/v/o for attention, fc1/fc2 or gate/up/down for MLPs;
            rows = [[start, stop), ...] output features of the role when one projection serves several
            roles (one range for GPT-2's split, one per head for GPT-NeoX's interleaved layout).
        layout: what apply needs besides the weights (width, heads, adapter, argument names...).
        status: "convert", "skip" (cannot convert; ``strict`` makes it an error) or "exclude" (the
            user's config left it out).
        reason: why a site is skipped or excluded.
        replacement, settings: what the site becomes and with which settings.
        params_before, params_after: parameters of the replaced modules and of their replacements.
        flops_before, flops_after: forward FLOPs as sympy expressions in N (tokens) and B (batch).
    """

    fqn: str
    kind: str
    pattern: str
    causal: bool | None = None
    replaces: list[str] = field(default_factory=list)
    roles: dict[str, dict] = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    status: str = CONVERT
    reason: str | None = None
    replacement: str = ""
    settings: dict = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    flops_before: sympy.Expr | None = None
    flops_after: sympy.Expr | None = None

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
        if self.kind != "sequence":
            return None
        return self.settings.get("mode") or ("bidirectional" if not self.causal else "causal")

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("fqn", "kind", "pattern", "causal", "replaces", "roles", "layout",
                                              "status", "reason", "replacement", "settings",
                                              "params_before", "params_after")}
        out["flops_before"] = None if self.flops_before is None else str(self.flops_before)
        out["flops_after"] = None if self.flops_after is None else str(self.flops_after)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Site":
        data = dict(data)
        for key in ("flops_before", "flops_after"):
            if data.get(key) is not None:
                data[key] = sympy.sympify(data[key], locals={"N": N, "B": B})
        return cls(**data)
