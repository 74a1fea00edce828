"""Implicit long-convolution filters: positional features -> small sin MLP -> exponential decay.

The tap for offset k is a function of k alone (features use k / scale with a fixed ``scale``, never
k / N), so filters exist for any length N and a prefix's taps never change when N grows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ShapeError, check_int
from .base import traced


class Sin(nn.Module):
    """sin(w * x) with a learned frequency per feature."""

    def __init__(self, dim: int, freq: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class FilterLinear(nn.Module):
    """x W^T + b inside a filter MLP: nn.Linear's parameters (``weight`` (out, in), ``bias``) and product,
    deliberately not an nn.Linear.

    The filter MLP maps positions to convolution taps, not token features. Code that adapts "every linear
    layer" (PEFT's ``target_modules="all-linear"``) finds layers by ``isinstance(m, nn.Linear)``; as this
    class it leaves them out (a LoRA on the last one would also go unused: :meth:`ImplicitFilter.taps`
    reads its weight directly).

    Shapes: forward(x: (..., in_features)) -> (..., out_features).

    Example:
        >>> layer = FilterLinear(5, 8)
        >>> layer(torch.randn(3, 5)).shape, isinstance(layer, nn.Linear)
        (torch.Size([3, 8]), False)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # nn.Linear's default initialization, from a throwaway nn.Linear: identical numbers for a seed.
        init = nn.Linear(in_features, out_features, bias=bias)
        self.weight = nn.Parameter(init.weight.detach())                      # (out, in)
        self.bias = nn.Parameter(init.bias.detach()) if bias else None        # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ImplicitFilter(nn.Module):
    """Generates ``heads`` filters of (channels, N) taps for any N.

    Args:
        channels: filters per head (the model width H).
        heads: independent filters sharing the MLP trunk (2 for forward + reverse).
        order: width of the filter MLP (default 128).
        emb_dim: positional features: t = k / scale plus (emb_dim - 1) / 2 sin/cos bands; odd, >= 3.
        scale: offsets are measured in units of ``scale`` tokens (fixes frequencies and decay rates).
        fast_decay, slow_decay: the fastest / slowest channel decays to 1% after this many ``scale``s.

    Shapes: forward(n) -> (heads, channels, n) = taps(trunk(n)); trunk(n) -> (n, order) and
    taps(trunk, start, stop) -> (heads, stop - start, n) build it a block of channels at a time.

    Example:
        >>> ImplicitFilter(8, heads=2)(5).shape
        torch.Size([2, 8, 5])
    """

    def __init__(self, channels: int, heads: int = 1, order: int = 128, emb_dim: int = 5,
                 scale: float = 512.0, fast_decay: float = 0.3, slow_decay: float = 1.5,
                 sin_freq: float = 1.0, out_std: float = 0.02):
        super().__init__()
        check_int("channels", channels, low=1)
        check_int("heads", heads, low=1)
        check_int("filter_order", order, low=1)
        check_int("filter_emb_dim", emb_dim, low=3)
        if emb_dim % 2 == 0:
            raise ShapeError(f"filter_emb_dim={emb_dim} must be odd (t plus sin/cos pairs); use {emb_dim + 1}")
        self.channels, self.heads, self.scale = channels, heads, float(scale)
        bands = (emb_dim - 1) // 2
        self.register_buffer("bands", torch.linspace(1e-4, bands - 1, bands) if bands > 1 else torch.ones(1),
                             persistent=False)
        self.mlp = nn.Sequential(
            FilterLinear(emb_dim, order), Sin(order, sin_freq),
            FilterLinear(order, order), Sin(order, sin_freq),
            FilterLinear(order, heads * channels, bias=False),
        )
        nn.init.normal_(self.mlp[-1].weight, std=out_std)
        # Per-channel decay rates spread between fast and slow (Hyena's exponential modulation).
        rates = torch.linspace(math.log(100) / fast_decay, math.log(100) / slow_decay, channels)
        self.register_buffer("decay_rates", rates, persistent=False)

    def features(self, n: int, device=None, dtype=None) -> torch.Tensor:
        """(n, emb_dim) positional features of offsets 0..n-1."""
        t = torch.arange(n, device=device, dtype=torch.float32) / self.scale           # (n,)
        w = 2 * math.pi * t[:, None] * self.bands.to(device)[None, :]                    # (n, bands)
        return torch.cat([t[:, None], torch.cos(w), torch.sin(w)], dim=-1).to(dtype or torch.float32)

    def trunk(self, n: int) -> torch.Tensor:
        """(n, order) hidden features of offsets 0..n-1: every filter MLP layer but the last."""
        if n < 1:
            raise ShapeError(f"filter length must be >= 1, got N={n}")
        weight = self.mlp[0].weight
        z = self.features(n, weight.device, weight.dtype)                               # (n, emb)
        return self.mlp[:-1](z)                                                         # (n, order)

    def taps(self, trunk: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(heads, stop - start, n) taps of channels [start, stop) from :meth:`trunk`'s output.

        The last layer runs as W @ trunk^T, so taps come out offsets-last and contiguous, ready for an
        FFT along the last dim; a block of channels needs only its own rows of W and of the decay.
        """
        stop = self.channels if stop is None else stop
        last = self.mlp[-1]
        n = trunk.shape[0]
        w = last.weight.view(self.heads, self.channels, -1)[:, start:stop]              # (heads, c, order)
        c = w.shape[1]
        if traced(trunk):
            # A plain linear layer (not matmul): exported graphs keep it as aten.linear, which the
            # lowering pass leaves to the compiler.
            h = torch.nn.functional.linear(trunk, w.reshape(self.heads * c, -1))       # (n, heads * c)
            h = h.t().reshape(self.heads, c, n)                                         # (heads, c, n)
        else:
            # Eager: W @ trunk^T lands offsets-last directly, without the transposing copy.
            h = torch.matmul(w, trunk.t())                                              # (heads, c, n)
        if last.bias is not None:
            h = h + last.bias.view(self.heads, self.channels, 1)[:, start:stop]
        return h * self.decay(n, start, stop, trunk.dtype)                            # (heads, c, n)

    def decay(self, n: int, start: int = 0, stop: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """(stop - start, n) exponential modulation exp(-rate_c * k / scale) of channels [start, stop).

        Eager calls evaluate it as exp(-rate qB / scale) * exp(-rate j / scale) for k = qB + j (B = 128):
        two small tables and a multiply per tap instead of an exp per tap (within 2 ulp of exp; the
        exps were 7% of a MiniLM forward at N = 32768 with the filters regenerated). Traced calls keep
        one exp over the offsets, whose shapes stay symbolic in N.
        """
        stop = self.channels if stop is None else stop
        rates = self.decay_rates[start:stop].to(dtype)[:, None] / self.scale          # (c, 1)
        if traced(rates):
            t = torch.arange(n, device=rates.device, dtype=dtype)                      # (n,)
            return torch.exp(-rates * t[None, :])                                       # (c, n)
        block = 128
        q = -(-n // block)
        hi = torch.exp(rates * -(torch.arange(q, device=rates.device, dtype=dtype) * block))   # (c, q)
        lo = torch.exp(rates * -torch.arange(block, device=rates.device, dtype=dtype))         # (c, B)
        return (hi[:, :, None] * lo[:, None, :]).view(rates.shape[0], q * block)[:, :n]        # (c, n)

    def forward(self, n: int) -> torch.Tensor:
        return self.taps(self.trunk(n))                                                 # (heads, H, n)
