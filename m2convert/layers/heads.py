"""Head-level hybrids: a few attention heads stay softmax attention beside the M2 mixer, in one module.

The mixer of an attention adapter computes H channels, one per channel of the attention's heads (its
in_proj rows are seeded from Q, K and V row for row). A :class:`KeptHeads` branch recomputes the channels
of the kept heads as the original softmax heads did, with their original Q, K, V rows, and the one
output projection (the original O) reads the mixer's channels and the kept heads' together:

    y = mixer channels (B, N, H)                                (the mixer without its out_proj)
    y[..., kept channels] = softmax(q_k k_k^T * scale + mask) v_k    for each kept head k
    out = O(y)                                                  (B, N, H)

Under GQA / MQA heads are kept a KV group at a time (every query head of a kept key/value head), so the
KV cache holds ``len(kept_groups)`` key/value heads. Rotary position embeddings arrive as the module's
``position_embeddings`` argument (cos, sin), as transformers' rotary models pass them, and are applied to
the kept heads' queries and keys (rotate-half convention; a partial rotary dimension rotates the leading
channels).

The mixer still computes the kept heads' channels before they are replaced (1/8 of its channels at a
budget of 1/8 of the heads); dropping those rows from its projections is left for later.
"""

from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F
from torch import nn

from .cost import B, N


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, rope) -> torch.Tensor:
    """x (B, heads, N, d) with rotary (cos, sin), each (B, N, r) or (N, r), r <= d: the leading r channels
    rotated (rotate-half convention), the rest as they are.

    Example:
        >>> x = torch.randn(1, 2, 3, 4)
        >>> cos, sin = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
        >>> torch.equal(apply_rotary(x, (cos, sin)), x)
        True
    """
    if rope is None:
        return x
    cos, sin = rope
    cos, sin = (cos.unsqueeze(1), sin.unsqueeze(1)) if cos.dim() == 3 else (cos, sin)   # (B, 1, N, r)
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    rot = rot * cos.to(x.dtype) + _rotate_half(rot) * sin.to(x.dtype)
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


class KeptHeads(nn.Module):
    """The softmax heads a head-level hybrid keeps, and the attention module's one output projection.

    Args:
        hidden: model width H (the projections' input).  heads, kv_heads, head_dim: the attention's query
            heads, key/value heads and head size (heads * head_dim channels reach the output projection).
        kept_groups: indices of the key/value heads kept (each with its heads // kv_heads query heads).
        causal: causal attention (decoders) or bidirectional.  scale: the softmax scale (default
            head_dim ** -0.5).  out_features: the output projection's outputs (default H).

    forward(y, x, mask=None, rope=None): y (B, N, heads * head_dim) the mixer's channels, x (B, N, H) the
    module input, mask the attention mask the original module got ((B, 1, N, N) bool or additive, (B, N)
    0/1, or None; a flex-attention BlockMask is read as its padding first), rope its (cos, sin). Returns (B, N, out_features).

    Example:
        >>> kept = KeptHeads(32, heads=4, kv_heads=2, head_dim=8, kept_groups=[1], causal=True)
        >>> kept.query_heads, kept(torch.randn(2, 5, 32), torch.randn(2, 5, 32)).shape
        ([2, 3], torch.Size([2, 5, 32]))
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, kept_groups, causal: bool,
                 scale: float | None = None, out_features: int | None = None, device=None, dtype=None):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
        groups = sorted(int(g) for g in kept_groups)
        if not groups or groups[0] < 0 or groups[-1] >= kv_heads or len(set(groups)) != len(groups):
            raise ValueError(f"kept_groups={list(kept_groups)} must be distinct KV heads in [0, {kv_heads})")
        rep = heads // kv_heads
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, head_dim, bool(causal)
        self.kept_groups = groups
        self.query_heads = [g * rep + r for g in groups for r in range(rep)]
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden, len(self.query_heads) * head_dim, **factory)
        self.k_proj = nn.Linear(hidden, len(groups) * head_dim, **factory)
        self.v_proj = nn.Linear(hidden, len(groups) * head_dim, **factory)
        self.o_proj = nn.Linear(heads * head_dim, out_features or hidden, **factory)
        channels = torch.tensor([h * head_dim + i for h in self.query_heads for i in range(head_dim)])
        self.register_buffer("channels", channels, persistent=False)      # (kept query heads * d,)

    def seed(self, q, k, v, o) -> None:
        """Copy the original projections, (weight, bias or None) each in nn.Linear convention: Q
        (heads * d, H), K and V (kv_heads * d, H) before any repeat, O (out, heads * d)."""
        d = self.head_dim

        def rows(heads_list):
            return torch.tensor([h * d + i for h in heads_list for i in range(d)])

        with torch.no_grad():
            for proj, (w, b), index in ((self.q_proj, q, rows(self.query_heads)),
                                        (self.k_proj, k, rows(self.kept_groups)),
                                        (self.v_proj, v, rows(self.kept_groups)), (self.o_proj, o, None)):
                proj.weight.copy_(w if index is None else w[index])
                proj.bias.copy_(torch.zeros_like(proj.bias) if b is None else (b if index is None else b[index]))

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)                 # (B, heads, N, d)

    def keys_values(self, x: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of the kept KV heads for x (B, N, H): each (B, kept groups, N, d), keys rotated."""
        k = apply_rotary(self._split(self.k_proj(x), len(self.kept_groups)), rope)
        return k, self._split(self.v_proj(x), len(self.kept_groups))

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, rope=None) -> torch.Tensor:
        """The kept heads' outputs (B, n, kept query heads * d) for the n queries of x (B, n, H) over the
        ``keys`` / ``values`` (B, kept groups, T, d), T >= n, the queries being the last n positions."""
        b, n, _ = x.shape
        q = apply_rotary(self._split(self.q_proj(x), len(self.query_heads)), rope)   # (B, hq, n, d)
        rep = self.heads // self.kv_heads
        if rep > 1:
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        attn_mask = _score_mask(mask, b, n, keys.shape[2], self.causal, q.device)
        causal = attn_mask is None and self.causal and n > 1
        if causal and keys.shape[2] != n:                                        # queries after a prefix
            attn_mask = torch.ones(n, keys.shape[2], dtype=torch.bool, device=q.device).tril(keys.shape[2] - n)
            causal = False
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, is_causal=causal,
                                             scale=self.scale)                   # (B, hq, n, d)
        return out.transpose(1, 2).reshape(b, n, -1)

    def merge(self, y: torch.Tensor, heads_out: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """O(y with the kept heads' channels replaced by ``heads_out``): (B, n, out_features). ``gate``
        (B, n, H): the output gate's values (gated attention), by which the kept heads' channels are multiplied
        as the mixer's already were."""
        if gate is not None:
            heads_out = heads_out * gate.index_select(-1, self.channels)
        y = y.index_copy(-1, self.channels, heads_out.to(y.dtype))
        return self.o_proj(y)

    def forward(self, y: torch.Tensor, x: torch.Tensor, mask=None, rope=None, gate=None) -> torch.Tensor:
        keys, values = self.keys_values(x, rope)
        return self.merge(y, self.attend(x, keys, values, mask, rope), gate)

    def flops(self) -> sympy.Expr:
        """Forward FLOPs this branch adds to its mixer (see :func:`kept_cost`)."""
        return kept_cost(self.q_proj.in_features, len(self.query_heads), len(self.kept_groups), self.head_dim)[1]

    def state_bytes(self, tokens: int, batch: int = 1) -> int:
        """Bytes of this branch's KV cache: 2 x kept KV heads x head_dim x tokens x batch x itemsize."""
        return 2 * len(self.kept_groups) * self.head_dim * tokens * batch * self.k_proj.weight.element_size()

    def extra_repr(self) -> str:
        return f"kept_groups={self.kept_groups}, query_heads={self.query_heads}, causal={self.causal}"


def kept_cost(hidden: int, query_heads: int, kv_groups: int, head_dim: int) -> tuple[int, sympy.Expr]:
    """(parameters, forward FLOPs in N and B) the kept heads add to a mixer whose out_proj becomes their
    shared output projection: their Q, K, V rows (with biases), the projections and the N x N scores.

    Example:
        >>> kept_cost(32, 2, 1, 8)
        (1056, 64*B*N**2 + 2048*B*N)
    """
    rows = (query_heads + 2 * kv_groups) * head_dim
    return rows * (hidden + 1), B * N * 2 * hidden * rows + 4 * B * N ** 2 * query_heads * head_dim


def _score_mask(mask, batch: int, n: int, keys: int, causal: bool, device):
    """The mask for the kept heads' scores, (B, 1, n, keys) bool or additive, or None (no padding: causal
    or full attention alone). A (B, N) 0/1 mask becomes the padding of the keys (and, if causal, the
    causal triangle); a query row that would see nothing keeps its own position."""
    if mask is None:
        return None
    if mask.dim() == 4:
        return mask[..., -n:, -keys:]
    keep = mask.to(torch.bool)[:, -keys:]                                       # (B, keys)
    allowed = keep[:, None, None, :].expand(batch, 1, n, keys)
    if causal:
        allowed = allowed & torch.ones(n, keys, dtype=torch.bool, device=device).tril(keys - n)
    own = torch.zeros(n, keys, dtype=torch.bool, device=device)
    own[torch.arange(n), torch.arange(n) + keys - n] = True                     # each query's own key
    return allowed | own
