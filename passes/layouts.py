"""The typed layouts of the plan's sites: what apply needs of a site besides the weights.

One dataclass per site kind: :class:`AttentionLayout` for attention ("sequence") sites, :class:`MLPLayout`
for MLP ("dimension") sites, :class:`ExpertsLayout` for the stacked experts of a mixture-of-experts block (a
"dimension" site too). Each projection a site reads is a :class:`Role`. :func:`layout_from_dict` reads the
layouts of every plan version written so far (see ``m2convert.passes.site.PLAN_VERSION``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import sympy
import torch

from m2convert.errors import CheckpointError
from m2convert.layers.cost import B, N

SEQUENCE, DIMENSION = "sequence", "dimension"


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
        output_gate: "sigmoid" when the attention output is multiplied by sigmoid(gate projection of the
            input) before O (role "gate"; Qwen3-Next), which the mixer reproduces; None: no gate.
        inner: heads x head_dim where it is not H (heads wider or narrower than the model, as Gemma 4's
            global layers): Q, K, V then output ``inner`` channels and O maps them to H; None: H.
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
    output_gate: str | None = None
    inner: int | None = None

    @property
    def width(self) -> int:
        """Channels the attention mixes: ``inner`` where set, else the model width H."""
        return self.hidden if self.inner is None else self.inner

    def keys_seen(self, causal: bool) -> int | None:
        """Keys each query sees under the sliding window (``window`` causal, ``2 * window - 1`` two-sided);
        None for global attention."""
        if self.window is None:
            return None
        return self.window if causal else 2 * self.window - 1

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
