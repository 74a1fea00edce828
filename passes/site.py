"""Site: one place in a model that the plan converts (or explains why it does not), with typed layouts.

A site's ``layout`` is one dataclass per site kind: :class:`AttentionLayout` for attention ("sequence")
sites, :class:`MLPLayout` for MLP ("dimension") sites, :class:`ExpertsLayout` for the stacked experts of a
mixture-of-experts block (a "dimension" site too). Each projection a site reads is a :class:`Role`.
Saved plans carry ``PLAN_VERSION``; :meth:`Site.from_dict` reads every version written so far.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import sympy
import torch

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
class OffsetBias:
    """An additive attention-score bias that depends only on the key-query offset, per head (ALiBi).

    Measured on the captured example, relative to the bias of the query's own key. Offsets past the
    measured ones continue the line when every profile is linear in the offset (ALiBi: -slope * j),
    else keep the last measured value (bucketed relative positions level off).

    Attributes:
        back: (heads, n) bias of the key j = 0..n-1 tokens back.
        ahead: (heads, n) bias of the key j tokens ahead (bidirectional attention), or None.
        linear: every profile is a line in j.
        fit_error, fit_corr: how well the mixer's filter taps were fitted to the weights this bias
            alone gives (relative MSE, mean Pearson correlation); set when the plan is applied.

    Example:
        >>> OffsetBias([[0.0, -0.5, -1.0]], linear=True).profile(5)[0]
        tensor([[ 0.0000, -0.5000, -1.0000, -1.5000, -2.0000]], dtype=torch.float64)
    """

    back: list[list[float]]
    ahead: list[list[float]] | None = None
    linear: bool = False
    fit_error: float | None = None
    fit_corr: float | None = None

    def profile(self, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(back (heads, length), ahead (heads, length) or None): the bias extended to ``length`` offsets."""
        return self._extend(self.back, length), None if self.ahead is None else self._extend(self.ahead, length)

    def _extend(self, rows: list[list[float]], length: int) -> torch.Tensor:
        known = torch.tensor(rows, dtype=torch.float64)                           # (heads, n)
        n = known.shape[1]
        if length <= n:
            return known[:, :length]
        j = torch.arange(n, length, dtype=torch.float64)                          # offsets to extend to
        if self.linear and n > 1:
            slope = (known[:, -1] - known[:, 0]) / (n - 1)                        # (heads,)
            more = known[:, :1] + slope[:, None] * j[None, :]
        else:
            more = known[:, -1:].expand(-1, length - n)
        return torch.cat([known, more], dim=1)


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
        residual: the forward parameter whose tensor the module adds to its output (HF Bloom's
            ``residual``: the block's residual connection made inside the attention module), or None.
        offset_bias: the score bias that depends only on the key-query offset (ALiBi), which seeds
            the mixer's filters, or None.
        window: local (sliding-window) attention: each query sees the keys at offsets 0..window-1 (before
            it when causal, on either side when not), read from the captured mask or the config; None: global.
        feeds: modules outside the site that read a value it computes besides its output (T5's position
            bias, computed by the first layer); the site converts only when each of them converts too.
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
    residual: str | None = None
    offset_bias: OffsetBias | None = None
    window: int | None = None
    feeds: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "AttentionLayout":
        data = dict(data)
        if data.get("norm") is not None:
            data["norm"] = NormLayout(**data["norm"])
        if data.get("offset_bias") is not None:
            data["offset_bias"] = OffsetBias(**data["offset_bias"])
        return cls(**data)


@dataclass
class MLPLayout(SiteLayout):
    """Layout of an MLP site.

    Attributes:
        activation: its activation ("gelu", "silu", ...; None when unknown).
        fold: the ``MonarchLinear.activation`` ("gelu", "gelu_tanh", "relu", "silu") that the ``fold_role``
            projection applies itself, as it writes its output, in place of the model's separate activation
            module at ``fold_module`` (which becomes ``nn.Identity``); None when the activation stays a module
            of its own (a function call in the model's code, a module that also does other work, or one
            whose values differ from every MonarchLinear activation by more than 1e-6).
    """

    type: ClassVar[str] = "mlp"
    kind: ClassVar[str] = DIMENSION

    activation: str | None = None
    fold: str | None = None
    fold_module: str | None = None
    fold_role: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "MLPLayout":
        return cls(**data)


@dataclass
class ExpertsLayout(SiteLayout):
    """Layout of a mixture-of-experts site: one module holding every expert's weights stacked.

    Attributes:
        experts, hidden, intermediate: E, H and I (each expert maps H -> I -> H).
        gate_up, down: names of the module's stacked weight parameters: (E, 2I, H) gate rows first, or
            (E, I, H) when not ``gated``; (E, H, I). ``transposed``: stored (E, in, out) instead.
        gated: act(gate(x)) * up(x) -> down (True), or act(up(x)) -> down.
        gate_up_bias, down_bias: names of the (E, out) bias parameters, or None.
        act: attribute name of the module's activation (copied into the replacement), or None to use
            ``activation`` by name.
        activation: the activation's name ("silu", "gelu", ...; None when unknown).
        top_k: experts each token is routed to (read from the captured call; for FLOPs).

    Example:
        >>> layout = ExpertsLayout(4, 32, 64, "gate_up_proj", "down_proj", act="act_fn", activation="silu", top_k=2)
        >>> layout.dense_flops()
        24576*B*N
    """

    type: ClassVar[str] = "experts"
    kind: ClassVar[str] = DIMENSION

    experts: int
    hidden: int
    intermediate: int
    gate_up: str
    down: str
    gated: bool = True
    transposed: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    act: str | None = None
    activation: str | None = None
    top_k: int = 1

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertsLayout":
        return cls(**data)

    def dense_flops(self) -> sympy.Expr:
        """Forward FLOPs of the dense experts: ``top_k`` experts per token, each H -> (2)I -> H."""
        first = self.intermediate * (2 if self.gated else 1)
        per_row = 2 * self.hidden * first + 2 * self.intermediate * self.hidden
        per_row += (first if self.gate_up_bias else 0) + (self.hidden if self.down_bias else 0)
        return B * N * self.top_k * per_row


# In the order version-1 plans (no "type" key) pick a layout by kind: MLPLayout before ExpertsLayout.
LAYOUTS: dict[str, type[SiteLayout]] = {cls.type: cls for cls in (AttentionLayout, MLPLayout, ExpertsLayout)}


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
