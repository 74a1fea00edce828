"""Exact softmax attention over a short window, beside a mixer's long convolution.

A converted layer loses what attention does locally first (the last few tokens, copied exactly); a few
heads of softmax attention over a short window give it back at a cost linear in N. :class:`WindowAttention`
computes, for every position i, softmax attention over the keys at offsets 0..window-1 before it (causal)
or within window // 2 on either side (two-sided), with its own Q, K, V projections (seeded from the
original attention's), rotary embeddings where the model passes them, and padding masked out:

    y_i = sum_j softmax_j(q_i . k_j * scale) v_j      over j in the window of i     (B, N, heads * d)

:class:`M2SequenceMixer` adds ``y`` to its channels before its output projection (``window=w``).

The full sequence is computed in blocks of ``window`` queries (``window // 2`` two-sided), each against
its own and its neighbouring blocks' keys: O(N window) time and memory. Decoding keeps a ring of the last
``window`` keys and values (:class:`WindowCache`): state bytes do not grow with the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch
from torch import nn

from ..errors import ConfigError, ShapeError, check_int
from .base import traced
from .cost import B, N
from .heads import apply_rotary


@dataclass
class WindowCache:
    """The decoding state of a :class:`WindowAttention`: a ring of its last ``window`` keys and values.

    Attributes:
        keys, values: (B, kv_heads, window, d), the key of time t in slot t % window (rotated).
        valid: (B, window) bool: slots that hold a token (not yet written, or padding, are False).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    def map_batch(self, fn) -> "WindowCache":
        return WindowCache(fn(self.keys), fn(self.values), fn(self.valid))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class WindowAttention(nn.Module):
    """Softmax attention over a sliding window of ``window`` tokens.

    Args:
        hidden: model width H (the projections' input).  window: keys each query sees: itself and the
            window - 1 before it (causal), or window // 2 on either side (two-sided).
        heads, kv_heads, head_dim: query heads, key/value heads (GQA / MQA when fewer) and head size.
        causal: decoders (True) or encoders.  scale: softmax scale (default head_dim ** -0.5).

    forward(x (B, N, H), keep (B, N) 1 = token / 0 = padding or None, rope (cos, sin) or None)
    -> (B, N, heads * head_dim).

    Example:
        >>> attn = WindowAttention(32, window=4, heads=4, kv_heads=2, head_dim=8, causal=True)
        >>> x = torch.randn(2, 10, 32)
        >>> moved = x.clone(); moved[:, 2] += 1                      # token 2 is seen by tokens 2..5 only
        >>> reach = (attn(x) - attn(moved)).abs().amax(-1)[0]
        >>> [int(i) for i in torch.nonzero(reach > 1e-6)]
        [2, 3, 4, 5]
    """

    def __init__(self, hidden: int, window: int, heads: int, kv_heads: int, head_dim: int, causal: bool,
                 scale: float | None = None, device=None, dtype=None):
        super().__init__()
        check_int("window", window, low=1 if causal else 2)
        check_int("heads", heads, low=1)
        if heads % kv_heads:
            raise ConfigError(f"WindowAttention: heads={heads} is not a multiple of kv_heads={kv_heads}")
        self.window, self.causal = int(window), bool(causal)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden, heads * head_dim, **factory)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, **factory)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, **factory)

    @property
    def reach(self) -> tuple[int, int]:
        """(offsets before, offsets after) a query sees: (window - 1, 0) causal, (window // 2,) * 2 two-sided."""
        return (self.window - 1, 0) if self.causal else (self.window // 2, self.window // 2)

    def seed(self, q, k, v) -> None:
        """Copy the original Q (heads * d, H), K and V (kv_heads * d, H) projections, each a (weight, bias or
        None) pair in nn.Linear convention, K and V before any repeat over query heads."""
        with torch.no_grad():
            for proj, (w, b) in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)):
                if tuple(w.shape) != tuple(proj.weight.shape):
                    raise ShapeError(f"WindowAttention.seed: weight of shape {tuple(w.shape)} for a projection of "
                                     f"shape {tuple(proj.weight.shape)}")
                proj.weight.copy_(w)
                proj.bias.copy_(torch.zeros_like(proj.bias) if b is None else b)

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)                # (B, heads, N, d)

    def _qkv(self, x: torch.Tensor, rope):
        q = apply_rotary(self._split(self.q_proj(x), self.heads), rope)
        k = apply_rotary(self._split(self.k_proj(x), self.kv_heads), rope)
        return q, k, self._split(self.v_proj(x), self.kv_heads)

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        rep = self.heads // self.kv_heads
        return t if rep == 1 else t.repeat_interleave(rep, dim=1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        if x.dim() != 3:
            raise ShapeError(f"WindowAttention expects x of shape (B, N, H), got {tuple(x.shape)}")
        q, k, v = self._qkv(x, rope)
        # A traced graph (export, compile) takes the banded N x N form: its shapes stay plain in N, where the
        # blocks' ceil(N / size) would pin N to the example's value.
        attend = self.banded if traced(x) else self.attend
        out = attend(q, self._repeat(k), self._repeat(v), keep)                        # (B, heads, N, d)
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)

    def banded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The same attention with an explicit (N, N) band mask: (B, heads, N, d), O(N^2) work."""
        n = q.shape[2]
        offset = torch.arange(n, device=q.device)[:, None] - torch.arange(n, device=q.device)[None]
        back, ahead = self.reach
        allowed = (offset <= back) & (offset >= -ahead)                                # (N, N)
        if keep is not None:
            allowed = allowed & keep.to(torch.bool)[:, None, None, :]                  # (B, 1, N, N)
        scores = (q @ k.transpose(-1, -2) * self.scale).masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Windowed attention of q, k, v (B, heads, N, d), a block of queries at a time: (B, heads, N, d)."""
        b, h, n, d = q.shape
        back, ahead = self.reach
        size = max(back, ahead, 1)                                  # queries per block
        before, after = -(-back // size), -(-ahead // size)         # neighbouring blocks each side
        blocks = -(-n // size)
        span = (before + 1 + after) * size
        pad = (before * size, (blocks + after) * size - n)

        def windows(t):                                             # (B, h, blocks, span, d)
            t = nn.functional.pad(t, (0, 0, *pad)).view(b, h, blocks + before + after, size, d)
            return torch.cat([t[:, :, i:i + blocks] for i in range(before + 1 + after)], dim=3)
        qb = nn.functional.pad(q, (0, 0, 0, blocks * size - n)).view(b, h, blocks, size, d)
        scores = torch.einsum("bhqsd,bhqkd->bhqsk", qb, windows(k)) * self.scale   # (B, h, blocks, size, span)
        qpos = torch.arange(blocks * size, device=q.device).view(blocks, size, 1)
        kpos = (torch.arange(blocks, device=q.device) * size - before * size).view(blocks, 1, 1) \
            + torch.arange(span, device=q.device)                   # (blocks, 1, span)
        offset = qpos - kpos
        allowed = (offset <= back) & (offset >= -ahead) & (kpos >= 0) & (kpos < n)   # (blocks, size, span)
        if keep is not None:
            present = nn.functional.pad(keep.to(torch.bool), pad).view(b, blocks + before + after, size)
            present = torch.cat([present[:, i:i + blocks] for i in range(before + 1 + after)], dim=2)  # (B, blocks, span)
            allowed = allowed & present[:, None, :, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)    # a row with no key left (padding): zeros
        out = torch.einsum("bhqsk,bhqkd->bhqsd", weights, windows(v))
        return out.reshape(b, h, blocks * size, d)[:, :, :n]

    def cache(self, x: torch.Tensor, keep: torch.Tensor | None = None, rope=None) -> WindowCache:
        """The :class:`WindowCache` after a causal prompt x (B, N, H) (keep (B, N) 0 = padding; rope its
        (cos, sin), each (B, N, r) or (N, r)): only its last ``window`` tokens are projected."""
        if not self.causal:
            raise ConfigError("WindowAttention decodes only causally; this one is two-sided (an encoder's)")
        b, n, w = x.shape[0], x.shape[1], self.window
        last = min(n, w)
        rope = None if rope is None else tuple(t[..., -last:, :] for t in rope)
        tail = x[:, -last:]
        k = apply_rotary(self._split(self.k_proj(tail), self.kv_heads), rope)            # (B, kvh, last, d)
        v = self._split(self.v_proj(tail), self.kv_heads)
        valid = torch.ones(b, last, dtype=torch.bool, device=x.device) if keep is None else keep[:, -last:].to(torch.bool)
        if n >= w:                                                 # time t in slot t % w
            k, v, valid = torch.roll(k, n % w, dims=2), torch.roll(v, n % w, dims=2), torch.roll(valid, n % w, dims=1)
        else:                                                      # slots n..w-1 not written yet
            k, v = (nn.functional.pad(t, (0, 0, 0, w - n)) for t in (k, v))
            valid = nn.functional.pad(valid, (0, w - n))
        return WindowCache(k.contiguous(), v.contiguous(), valid.contiguous())

    def step(self, x: torch.Tensor, cache: WindowCache, t: int, rope=None) -> torch.Tensor:
        """The output (B, heads * d) of the token at time ``t`` (x (B, H); rope its (cos, sin) or None),
        written into ``cache`` (slot t % window) before it attends over the ring."""
        q, k, v = self._qkv(x[:, None], rope)                                      # (B, h, 1, d) ...
        slot = t % self.window
        cache.keys.narrow(2, slot, 1).copy_(k)
        cache.values.narrow(2, slot, 1).copy_(v)
        cache.valid.narrow(1, slot, 1).fill_(True)
        b = x.shape[0]
        grouped = q[:, :, 0].view(b, self.kv_heads, -1, self.head_dim)            # (B, kv, heads / kv, d)
        scores = torch.einsum("bgrd,bgkd->bgrk", grouped, cache.keys) * self.scale  # K read once per group
        scores = scores.masked_fill(~cache.valid[:, None, None, :], float("-inf"))
        out = torch.einsum("bgrk,bgkd->bgrd", torch.softmax(scores, dim=-1), cache.values)
        return out.reshape(b, -1)                                                   # (B, heads * d)

    def state_bytes(self, batch: int = 1) -> int:
        """Bytes of the decoding ring: 2 x kv_heads x head_dim x window x batch x itemsize (and its flags)."""
        size = self.k_proj.weight.element_size()
        return batch * (2 * self.kv_heads * self.head_dim * self.window * size + self.window)

    def flops(self) -> sympy.Expr:
        """Forward FLOPs in N and B: the projections and each query's window of scores and values."""
        hidden = self.q_proj.in_features
        rows = (self.heads + 2 * self.kv_heads) * self.head_dim
        keys = self.window if self.causal else 2 * (self.window // 2) + 1
        return B * N * 2 * hidden * rows + 4 * B * N * keys * self.heads * self.head_dim

    def extra_repr(self) -> str:
        return (f"window={self.window}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}")
