"""Site: one place in a model that the plan converts (or explains why it does not), with typed layouts.

A site's ``layout`` is one dataclass per site kind: :class:`AttentionLayout` for attention ("sequence")
sites, :class:`MLPLayout` for MLP ("dimension") sites. Each projection a site reads is a :class:`Role`.
Saved plans carry ``PLAN_VERSION``; :meth:`Site.from_dict` reads every version written so far.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import sympy

from m2convert.errors import CheckpointError
from m2convert.layers.cost import B, N

CONVERT, SKIP, EXCLUDE = "convert", "skip", "exclude"
SEQUENCE, DIMENSION = "sequence", "dimension"

# Version 1: layouts and roles as plain dicts (no "type" key). Version 2: each layout names its type.
PLAN_VERSION = 2


@dataclass
class Role:
    """One projection a site reads.

    Attributes:
        path: module path of the projection (nn.Linear or HF Conv1D).
        rows: [[start, stop), ...] of its output features when one projection serves several roles
            (one range for GPT-2's fused c_attn split, one per head for GPT-NeoX's interleaved layout);
            None when the role owns every output.

    Example:
        >>> Role("h.0.attn.c_attn", [[0, 64]]).width(192)
        64
    """

    path: str
    rows: list[list[int]] | None = None

    def width(self, out_features: int) -> int:
        """Output features this role takes from a projection with ``out_features`` outputs."""
        return sum(b - a for a, b in self.rows) if self.rows else out_features


@dataclass
class NormLayout:
    """The residual LayerNorm a post-norm attention block (HF BERT's BertSelfOutput) keeps."""

    path: str
    eps: float
    affine: bool = True
    bias: bool = True


@dataclass
class SiteLayout:
    """Base of the per-kind layouts: what apply needs besides the weights."""

    type: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"type": self.type, **asdict(self)}


@dataclass
class AttentionLayout(SiteLayout):
    """Layout of an attention site.

    Attributes:
        adapter: the layers' adapter class that takes the module's place ("M2Attention",
            "M2PostNormAttention"; see :data:`m2convert.layers.ADAPTERS`).
        hidden, heads, kv_heads, head_dim: model width H, query heads, key/value heads (GQA/MQA), head size.
        arg_names: the replaced module's forward parameters, in order (the adapter takes the same).
        num_outputs: 0 when the module returns a tensor, else the length of the tuple it returns.
        dropout: dropout probability after the output projection.
        module_class: class name of the replaced module.
        norm: the residual LayerNorm kept by post-norm blocks, or None.
    """

    type: ClassVar[str] = "attention"
    kind: ClassVar[str] = SEQUENCE

    adapter: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    arg_names: list[str] = field(default_factory=list)
    num_outputs: int = 0
    dropout: float = 0.0
    module_class: str = ""
    norm: NormLayout | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "AttentionLayout":
        data = dict(data)
        if data.get("norm") is not None:
            data["norm"] = NormLayout(**data["norm"])
        return cls(**data)


@dataclass
class MLPLayout(SiteLayout):
    """Layout of an MLP site: its activation ("gelu", "silu", ...; None when unknown)."""

    type: ClassVar[str] = "mlp"
    kind: ClassVar[str] = DIMENSION

    activation: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "MLPLayout":
        return cls(**data)


LAYOUTS: dict[str, type[SiteLayout]] = {cls.type: cls for cls in (AttentionLayout, MLPLayout)}


def layout_from_dict(data: dict | None, kind: str, where: str = "plan") -> SiteLayout | None:
    """Rebuild a layout; a version-1 dict (no "type") takes its type from the site kind.

    An empty layout (a site skipped before its analysis finished) is None.
    """
    if not data:
        return None
    data = dict(data)
    name = data.pop("type", None) or next((c.type for c in LAYOUTS.values() if c.kind == kind), None)
    if name not in LAYOUTS:
        raise CheckpointError(f"{where}: unknown site layout type {name!r} (known: {sorted(LAYOUTS)}); "
                              "was it written by a newer m2convert?")
    known = {f.name for f in fields(LAYOUTS[name])}
    return LAYOUTS[name].from_dict({k: v for k, v in data.items() if k in known})


@dataclass
class Site:
    """A matched attention ("sequence") or MLP ("dimension") site.

    Attributes:
        fqn: module path owning the site (the attention module; the module holding the MLP).
        kind: "sequence" | "dimension".
        pattern: name of the registered pattern that matched, e.g. "sdpa-attention", "eager-attention",
            "gelu-mlp", "gated-mlp".
        causal: attention only: True (causal mask or is_causal), False (bidirectional), None (unknown).
        replaces: module paths the rewrite swaps (the attention module; each MLP linear).
        roles: role name -> :class:`Role`: q/k/v/o for attention, fc1/fc2 or gate/up/down for MLPs.
        layout: :class:`AttentionLayout` or :class:`MLPLayout`; None while the analysis stopped early.
        status: "convert", "skip" (cannot convert; ``strict`` makes it an error) or "exclude" (the
            user's config left it out).
        reason: why a site is skipped or excluded.
        replacement, settings: what the site becomes and with which settings.
        params_before, params_after: parameters of the replaced modules and of their replacements.
        flops_before, flops_after: forward FLOPs as sympy expressions in N (tokens) and B (batch).

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
                                                   "params_after")})
        out["flops_before"] = None if self.flops_before is None else str(self.flops_before)
        out["flops_after"] = None if self.flops_after is None else str(self.flops_after)
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
        return cls(**data)
