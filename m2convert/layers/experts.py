"""MonarchExperts: the experts of a mixture-of-experts block, every expert projection a Monarch matrix.

Mixture-of-experts models in transformers 5 (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) keep their experts
as stacked parameters, gate_up_proj (E, 2I, H) and down_proj (E, H, I), in one experts module that the
block calls with the router's choice:

    experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)
    out[t] = sum_j top_k_weights[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)),   e = top_k_index[t, j]

where gate_e and up_e are the two halves of gate_up_proj[e] (``gate, up = (x @ gate_up[e].T).chunk(2)``);
non-gated experts compute down_e(act(up_e(x_t))). :class:`MonarchExperts` computes the same with each
expert's gate, up and down an order-2 Monarch matrix (:class:`~m2convert.layers.monarch.MonarchLinear`'s
factors), stacked over experts in :class:`StackedMonarch`. The router is not part of it and is kept.
:func:`dense_experts` is the dense formula on stacked weights, the reference both are checked against.
"""

from __future__ import annotations

import math

import sympy
import torch
from torch import nn

from ..errors import ShapeError, check_int
from ..kernels.monarch.cpu import monarch_linear
from ..kernels.monarch.reference import monarch_matmul, monarch_to_dense
from .base import M2Block, traced
from .cost import B, N, substitute
from .monarch import MonarchLinear, eager_inference, monarch_shape

# Activations by the names the plan records (ExpertsLayout.activation), for experts modules that call one
# as a function rather than holding an activation module.
ACTIVATIONS = {"silu": nn.functional.silu, "gelu": nn.functional.gelu, "relu": nn.functional.relu,
               "tanh": torch.tanh, "sigmoid": torch.sigmoid, "mish": nn.functional.mish, "elu": nn.functional.elu,
               "softplus": nn.functional.softplus}


def dense_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor, act, gate_up_bias: torch.Tensor | None = None,
                  down_bias: torch.Tensor | None = None, gated: bool = True, compute_dtype=None) -> torch.Tensor:
    """The experts formula on dense stacked weights (nn.Linear convention): the reference.

    Args:
        hidden_states: (T, H) tokens.  top_k_index: (T, k) expert of each of a token's k slots (indices
            outside [0, E) are left out).  top_k_weights: (T, k) routing weight of each slot.
        gate_up: (E, 2I, H), gate rows first ((E, I, H) up only when not ``gated``).  down: (E, H, I).
        act: the activation.  gate_up_bias: (E, 2I) or None.  down_bias: (E, H) or None.
        compute_dtype: compute in this dtype (one expert's weights cast at a time); default the weights'.

    Returns:
        (T, H) in ``compute_dtype`` when given, else in the dtype of ``hidden_states``.

    Example:
        >>> gate_up, down = torch.randn(3, 8, 4), torch.randn(3, 4, 4)                  # E=3, I=4, H=4
        >>> x, index, weights = torch.randn(2, 4), torch.tensor([[0, 2], [1, 2]]), torch.rand(2, 2)
        >>> gate, up = (x[0] @ gate_up[2].T).chunk(2)
        >>> slot = weights[0, 1] * (down[2] @ (torch.sigmoid(gate) * up))               # token 0, expert 2
        >>> out = dense_experts(x, index, weights, gate_up, down, torch.sigmoid)
        >>> torch.allclose(out[0], weights[0, 0] * (down[0] @ (torch.sigmoid((x[0] @ gate_up[0].T)[:4])
        ...                * (x[0] @ gate_up[0].T)[4:])) + slot, atol=1e-5)
        True
    """
    dtype = compute_dtype or gate_up.dtype
    out = torch.zeros_like(hidden_states, dtype=torch.promote_types(dtype, top_k_weights.dtype))

    def cast(t, e):
        return None if t is None else t[e].to(dtype)

    for e in range(gate_up.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        h = nn.functional.linear(hidden_states[token].to(dtype), cast(gate_up, e), cast(gate_up_bias, e))
        if gated:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        y = nn.functional.linear(h, cast(down, e), cast(down_bias, e))
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out.to(compute_dtype or hidden_states.dtype)


class StackedMonarch(nn.Module):
    """E independent Monarch matrices (in_features -> out_features), stored stacked over a first dim.

    Matrix e is the MonarchLinear with factors ``w1[e]``, ``w2[e]`` and bias ``bias[e]``.

    Parameters: w1 (E, nb, nb * rho, P), w2 (E, nb, S, nb * rho), bias (E, out_features) or None, with
    (P, S, rho) = :func:`~m2convert.layers.monarch.monarch_shape` (in, out, nblocks, rank).

    Shapes: forward(x: (..., in_features), e: int) -> (..., out_features).

    Example:
        >>> weight = torch.randn(3, 10, 6)                                    # E=3 (out, in) matrices
        >>> stack = StackedMonarch.from_weight(weight, nblocks=2, rank=2)     # rank >= nblocks: exact
        >>> torch.allclose(stack(torch.ones(6), 1), weight[1] @ torch.ones(6), atol=1e-4)
        True
    """

    def __init__(self, experts: int, in_features: int, out_features: int, nblocks: int = 4, bias: bool = False,
                 rank: int = 1, device=None, dtype=None):
        super().__init__()
        check_int("experts", experts, low=1)
        p, s, rho = monarch_shape(in_features, out_features, nblocks, rank)
        self.experts, self.in_features, self.out_features = experts, in_features, out_features
        self.nblocks, self.rank = nblocks, rank
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(experts, nblocks, nblocks * rho, p, **factory))
        self.w2 = nn.Parameter(torch.empty(experts, nblocks, s, nblocks * rho, **factory))
        self.bias = nn.Parameter(torch.empty(experts, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As MonarchLinear: each factor scaled like nn.Linear's default for its own fan-in.
        p, mid = self.w1.shape[-1], self.w1.shape[-2]
        nn.init.uniform_(self.w1, -1 / math.sqrt(p), 1 / math.sqrt(p))
        nn.init.uniform_(self.w2, -1 / math.sqrt(mid), 1 / math.sqrt(mid))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"StackedMonarch expects last dim {self.in_features}, got input of shape {tuple(x.shape)}")
        nb, p, s = self.nblocks, self.w1.shape[-1], self.w2.shape[-2]
        if nb * p != self.in_features:
            x = nn.functional.pad(x, (0, nb * p - self.in_features))           # (..., nb * P)
        w1, w2 = self.w1[e], self.w2[e]                                          # (nb, nb*rho, P), (nb, S, nb*rho)
        bias = None if self.bias is None else self.bias[e]
        if eager_inference(x, self.w1, self.w2, self.bias):
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            return monarch_linear(rows, w1, w2, bias, self.out_features).view(*x.shape[:-1], self.out_features)
        y = monarch_matmul(x, w1, w2)[..., : self.out_features]                # (..., out)
        return y if bias is None else y + bias

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, nblocks: int = 4,
                    rank: int = 1) -> "StackedMonarch":
        """Project each dense (out, in) matrix of ``weight`` (E, out, in) onto the Monarch class, as
        :meth:`MonarchLinear.from_weight` does (optimal in Frobenius norm); ``bias`` (E, out) is copied."""
        if weight.dim() != 3:
            raise ShapeError(f"from_weight expects a 3-D (experts, out, in) weight, got shape {tuple(weight.shape)}")
        experts, out_f, in_f = weight.shape
        stack = cls(experts, in_f, out_f, nblocks=nblocks, bias=bias is not None, rank=rank,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for e in range(experts):
                layer = MonarchLinear.from_weight(weight[e], None if bias is None else bias[e], nblocks, rank)
                stack.w1[e].copy_(layer.w1)
                stack.w2[e].copy_(layer.w2)
                if bias is not None:
                    stack.bias[e].copy_(layer.bias)
        return stack

    def to_dense(self) -> torch.Tensor:
        """The (E, out_features, in_features) dense matrices (differentiable in w1, w2)."""
        return torch.stack([monarch_to_dense(self.w1[e], self.w2[e])[: self.out_features, : self.in_features]
                            for e in range(self.experts)])

    def row_flops(self) -> int:
        """Multiply-adds x 2 (plus the bias adds) of one expert on one row."""
        return 2 * (self.w1[0].numel() + self.w2[0].numel()) + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"nblocks={self.nblocks}, rank={self.rank}, bias={self.bias is not None}")


class MonarchExperts(M2Block):
    """The experts of a mixture-of-experts block with Monarch projections; called like the HF experts module.

    Args:
        num_experts, hidden_dim, intermediate_dim: E, H and I (each expert maps H -> I -> H).
        nblocks, rank: of every Monarch matrix (see :class:`~m2convert.layers.monarch.MonarchLinear`).
        act: the activation module or function (default SiLU), applied to the gate (to up when not gated).
        gated: act(gate(x)) * up(x) -> down (True), or act(up(x)) -> down.
        gate_up_bias, down_bias: learn biases on gate and up (E, I) / down (E, H).
        top_k: experts each token is routed to (used by :meth:`flops` only; routing comes with the call).

    Parameters: ``gate`` (None when not gated), ``up``: :class:`StackedMonarch` (E, H -> I); ``down``:
    :class:`StackedMonarch` (E, I -> H). Gate and up are separate matrices, the two halves of HF's
    gate_up_proj.

    Shapes: forward(hidden_states (T, H), top_k_index (T, k) int, top_k_weights (T, k)) -> (T, H): each
    token's k experts applied and summed with their routing weights (indices outside [0, E) add nothing).
    Eager calls run only the experts the tokens were routed to; under torch.compile / torch.export every
    expert runs on every token, weighted by its routing weight (zero where not routed), which traces
    without data-dependent control flow.

    Example:
        >>> gate_up, down = torch.randn(4, 64, 16), torch.randn(4, 16, 32)           # E=4, I=32, H=16
        >>> experts = MonarchExperts.from_weights(gate_up, down, nblocks=1)          # one block: exact
        >>> x, index, weights = torch.randn(5, 16), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
        >>> out = experts(x, index, weights)
        >>> out.shape, torch.allclose(out, dense_experts(x, index, weights, gate_up, down, nn.SiLU()), atol=1e-3)
        (torch.Size([5, 16]), True)
        >>> MonarchExperts.from_weights(gate_up, down, nblocks=4).num_parameters() < gate_up.numel() + down.numel()
        True
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, nblocks: int = 4, rank: int = 1,
                 act=None, gated: bool = True, gate_up_bias: bool = False, down_bias: bool = False, top_k: int = 1,
                 device=None, dtype=None):
        super().__init__()
        check_int("top_k", top_k, low=1)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.nblocks, self.rank, self.top_k = nblocks, rank, top_k
        opts = {"nblocks": nblocks, "rank": rank, "device": device, "dtype": dtype}
        self.gate = StackedMonarch(num_experts, hidden_dim, intermediate_dim, bias=gate_up_bias, **opts) \
            if gated else None
        self.up = StackedMonarch(num_experts, hidden_dim, intermediate_dim, bias=gate_up_bias, **opts)
        self.down = StackedMonarch(num_experts, intermediate_dim, hidden_dim, bias=down_bias, **opts)
        self.act_fn = nn.SiLU() if act is None else act

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` (M, H) -> (M, H), without routing weight."""
        h = self.up(x, e)
        h = self.act_fn(self.gate(x, e)) * h if self.gate is not None else self.act_fn(h)
        return self.down(h, e)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_dim or \
                top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ShapeError(f"MonarchExperts expects hidden_states (T, {self.hidden_dim}), top_k_index and "
                             f"top_k_weights (T, k); got {tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, "
                             f"{tuple(top_k_weights.shape)}")
        if traced(hidden_states) or traced(top_k_index):
            return self._every_expert(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        k, count = top_k_index.shape[-1], self.num_experts
        flat = top_k_index.reshape(-1)
        flat = torch.where((flat >= 0) & (flat < count), flat, count)        # out of range: bin E, dropped
        order = torch.argsort(flat, stable=True)                             # slots grouped by expert
        sizes = torch.bincount(flat, minlength=count + 1)[:count].tolist()
        weights = top_k_weights.reshape(-1)
        start = 0
        for e, size in enumerate(sizes):
            if size:
                slots = order[start:start + size]
                tokens = slots // k
                y = self.expert(hidden_states[tokens], e) * weights[slots, None]
                out.index_add_(0, tokens, y.to(out.dtype))
            start += size
        return out

    def _every_expert(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            weight = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)     # (T, 1), zero if not routed
            out = out + (self.expert(hidden_states, e) * weight).to(out.dtype)
        return out

    @classmethod
    def from_weights(cls, gate_up: torch.Tensor, down: torch.Tensor, nblocks: int = 4, rank: int = 1, act=None,
                     gated: bool = True, gate_up_bias: torch.Tensor | None = None,
                     down_bias: torch.Tensor | None = None, top_k: int = 1) -> "MonarchExperts":
        """Project stacked dense weights: gate_up (E, 2I, H) gate rows first ((E, I, H) when not ``gated``),
        down (E, H, I), biases (E, 2I) / (E, H) or None; each expert matrix as
        :meth:`MonarchLinear.from_weight` (at ``nblocks=1``, or ``rank >= nblocks``, exactly)."""
        if gate_up.dim() != 3 or down.dim() != 3 or down.shape[0] != gate_up.shape[0] \
                or gate_up.shape[1] != down.shape[2] * (2 if gated else 1) or gate_up.shape[2] != down.shape[1]:
            raise ShapeError(f"from_weights expects gate_up (E, {'2I' if gated else 'I'}, H) and down (E, H, I), got "
                             f"{tuple(gate_up.shape)} and {tuple(down.shape)}")
        experts, hidden, inter = down.shape[0], down.shape[1], down.shape[2]
        new = cls(experts, hidden, inter, nblocks=nblocks, rank=rank, act=act, gated=gated,
                  gate_up_bias=gate_up_bias is not None, down_bias=down_bias is not None, top_k=top_k,
                  device=down.device, dtype=down.dtype)
        halves = gate_up.detach().chunk(2, dim=1) if gated else (None, gate_up.detach())
        bias_halves = (gate_up_bias.detach().chunk(2, dim=1) if gated else (None, gate_up_bias.detach())) \
            if gate_up_bias is not None else (None, None)
        parts = [("gate", halves[0], bias_halves[0]), ("up", halves[1], bias_halves[1]),
                 ("down", down.detach(), None if down_bias is None else down_bias.detach())]
        for name, weight, bias in parts:
            if weight is not None:
                setattr(new, name, StackedMonarch.from_weight(weight, bias, nblocks=nblocks, rank=rank))
        return new

    @classmethod
    def from_experts(cls, module: nn.Module, nblocks: int = 4, rank: int = 1, *, gate_up: str | None = None,
                     down: str = "down_proj", gated: bool | None = None, transposed: bool | None = None,
                     gate_up_bias: str | None = None, down_bias: str | None = None, act: str = "act_fn",
                     top_k: int = 1) -> "MonarchExperts":
        """Project an HF experts module's stacked weights (see :meth:`from_weights`); the activation is copied.

        Parameter names default to HF's: ``gate_up_proj`` (``up_proj`` when not gated), ``down_proj`` and
        ``<name>_bias`` when the module has one; ``gated`` and ``transposed`` (weights stored (E, in, out))
        default to the module's ``has_gate`` / ``is_transposed`` flags, else True / False.

        Example:
            >>> config = transformers.MixtralConfig(hidden_size=16, intermediate_size=32, num_local_experts=4)
            >>> hf = transformers.models.mixtral.modeling_mixtral.MixtralExperts(config)
            >>> _ = [nn.init.normal_(p) for p in hf.parameters()]
            >>> x, index, weights = torch.randn(6, 16), torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
            >>> exact = MonarchExperts.from_experts(hf, nblocks=1)
            >>> torch.allclose(exact(x, index, weights), hf(x, index, weights), rtol=1e-3, atol=1e-2)
            True
        """
        import copy

        gated = getattr(module, "has_gate", True) if gated is None else gated
        transposed = getattr(module, "is_transposed", False) if transposed is None else transposed
        gate_up = gate_up or ("gate_up_proj" if gated else "up_proj")
        gate_up_bias = gate_up_bias or (f"{gate_up}_bias" if getattr(module, f"{gate_up}_bias", None) is not None
                                        else None)
        down_bias = down_bias or (f"{down}_bias" if getattr(module, f"{down}_bias", None) is not None else None)
        w_in, w_out = getattr(module, gate_up), getattr(module, down)
        if transposed:
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
        fn = getattr(module, act, None)
        fn = copy.deepcopy(fn) if isinstance(fn, nn.Module) else fn
        return cls.from_weights(w_in, w_out, nblocks=nblocks, rank=rank, act=fn, gated=gated,
                                gate_up_bias=None if gate_up_bias is None else getattr(module, gate_up_bias),
                                down_bias=None if down_bias is None else getattr(module, down_bias), top_k=top_k)

    def flops(self, seq_len=None, batch=None) -> sympy.Expr:
        """Per token: ``top_k`` experts, each its Monarch products (activations not counted)."""
        per_row = sum(m.row_flops() for m in (self.gate, self.up, self.down) if m is not None)
        return substitute(B * N * self.top_k * per_row, seq_len, batch)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, gated={self.gate is not None}, top_k={self.top_k}")
