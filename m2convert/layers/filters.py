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

# Relative tail past which the eager CPU path stops a filter's taps (ImplicitFilter.support), by dtype:
# at most this fraction of each channel's amplitude bound is left out, far under the dtype's resolution.
TAIL_TOL = {torch.float32: 1e-9, torch.float64: 1e-18}


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
        window: keep only the taps of offsets 0..window-1 (zero past them, at every N): the filter of a
            local attention layer, which sees exactly what its window saw. None: every offset.

    Shapes: forward(n) -> (heads, channels, n) = taps(trunk(n)); trunk(n) -> (n, order) and
    taps(trunk, start, stop) -> (heads, stop - start, n) build it a block of channels at a time.

    Example:
        >>> ImplicitFilter(8, heads=2)(5).shape
        torch.Size([2, 8, 5])
    """

    def __init__(self, channels: int, heads: int = 1, order: int = 128, emb_dim: int = 5,
                 scale: float = 512.0, fast_decay: float = 0.3, slow_decay: float = 1.5,
                 sin_freq: float = 1.0, out_std: float = 0.02, window: int | None = None):
        super().__init__()
        check_int("channels", channels, low=1)
        if window is not None:
            check_int("window", window, low=1)
        self.window = window
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
            d = torch.exp(-rates * t[None, :])                                          # (c, n)
            return d if self.window is None else d * (t < self.window).to(dtype)       # zero past the window
        block = 128
        q = -(-n // block)
        hi = torch.exp(rates * -(torch.arange(q, device=rates.device, dtype=dtype) * block))   # (c, q)
        lo = torch.exp(rates * -torch.arange(block, device=rates.device, dtype=dtype))         # (c, B)
        d = (hi[:, :, None] * lo[:, None, :]).view(rates.shape[0], q * block)[:, :n]           # (c, n)
        if self.window is not None and n > self.window:
            d[:, self.window:] = 0                                                               # zero past the window
        return d

    def forward(self, n: int) -> torch.Tensor:
        return self.taps(self.trunk(n))                                                 # (heads, H, n)

    def support(self, tol: float = TAIL_TOL[torch.float32]) -> int | None:
        """Taps that hold all but ``tol`` of each channel's bound, for any N; None when no bound holds.

        The trunk ends in a sine, so a channel's tap k is at most A_c = sum_j |W_cj| + |b_c| times its
        decay exp(-r_c k) (r_c = rate_c / scale), and the taps from K on sum to at most
        A_c exp(-r_c K) / (1 - exp(-r_c)). That is <= tol * A_c once
        K >= (ln(1 / tol) - ln(1 - exp(-r_c))) / r_c: the amplitudes cancel, so the bound holds for any
        trained weights. A convolution with the first K taps then differs from the whole filter's by at
        most tol * A_c * max|u| per output. This is the longest channel's K (:meth:`channel_support`).

        Example:
            >>> f = ImplicitFilter(4, scale=16.0)
            >>> k = f.support()
            >>> taps = f(4 * k)                                             # (1, 4, 4K)
            >>> bound = f.mlp[-1].weight.abs().sum(-1)                      # A_c
            >>> bool((taps[0, :, k:].abs().sum(-1) <= 1e-9 * bound).all())
            True
        """
        each = self.channel_support(tol)
        return None if each is None else max(each)

    def channel_support(self, tol: float = TAIL_TOL[torch.float32]) -> list[int] | None:
        """Each channel's K of :meth:`support` (its own decay rate), or None when no bound holds: the
        MLP does not end in :class:`Sin` then a linear layer, or a rate is not positive and finite."""
        if len(self.mlp) < 2 or not isinstance(self.mlp[-2], Sin) or not isinstance(self.mlp[-1], FilterLinear):
            return None
        rate = self.decay_rates.double() / self.scale                                   # (channels,)
        if not bool((torch.isfinite(rate) & (rate > 0)).all()):
            return None
        k = (math.log(1 / tol) - torch.log(-torch.expm1(-rate))) / rate
        k = k.ceil().long()
        return (k if self.window is None else k.clamp(max=self.window)).tolist()

    def fit_taps(self, target: torch.Tensor, weight: torch.Tensor | None = None, steps: int = 100,
                 lr: float = 1e-2) -> dict:
        """Fit this filter's parameters (only those) so that ``self(L)`` approaches ``target``.

        Adam on the weighted MSE between the taps and ``target`` (heads, channels, L), or (channels, L)
        for a one-head filter; ``weight`` broadcasts to it (default 1: every tap counts alike).
        Returns {"fit_error_before", "fit_error_after", "corr_before", "corr_after"}: the weighted
        relative MSE and the mean weighted Pearson correlation over (head, channel) rows (:func:`fit_stats`).
        Each parameter's ``requires_grad`` is restored and its gradient cleared afterwards.

        Example:
            >>> filt = ImplicitFilter(4, order=16)
            >>> target = torch.softmax(-0.1 * torch.arange(32.0), 0).expand(4, 32)      # (channels, L)
            >>> stats = filt.fit_taps(target, steps=50)
            >>> bool(stats["fit_error_after"] < stats["fit_error_before"])
            True
        """
        check_int("steps", steps, low=1)
        params = list(self.parameters())
        ref = params[0]
        target = target.to(ref.device, torch.float32)
        target = target.view(1, *target.shape) if target.dim() == 2 else target
        if target.dim() != 3 or tuple(target.shape[:2]) != (self.heads, self.channels):
            raise ShapeError(f"fit_taps: target has shape {tuple(target.shape)}, expected "
                             f"({self.heads}, {self.channels}, L)")
        weight = torch.ones_like(target) if weight is None else weight.to(ref.device, torch.float32)
        length, flags = target.shape[-1], [p.requires_grad for p in params]
        norm = ((target ** 2) * weight).sum().clamp_min(1e-30)
        with torch.no_grad():
            before = fit_stats(self(length).float(), target, weight)
        opt = torch.optim.Adam(params, lr=lr)
        try:
            with torch.enable_grad():
                for p in params:
                    p.requires_grad_(True)
                for _ in range(steps):
                    loss = ((self(length).float() - target) ** 2 * weight).sum() / norm
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
                p.grad = None
        with torch.no_grad():
            after = fit_stats(self(length).float(), target, weight)
        return {"fit_error_before": before[0], "fit_error_after": after[0], "corr_before": before[1],
                "corr_after": after[1]}


def fit_stats(taps: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """(weighted relative MSE, mean weighted Pearson correlation over rows) of ``taps`` against ``target``.

    Shapes: taps, target (..., L); weight broadcasts to them. Rows whose target is flat (no spread to
    correlate with) are left out of the mean; nan when every row is.

    Example:
        >>> t = torch.tensor([[1.0, 0.5, 0.25]])
        >>> fit_stats(t, t, torch.ones(1, 3))
        (0.0, 1.0)
    """
    err = ((taps - target) ** 2 * weight).sum() / ((target ** 2) * weight).sum().clamp_min(1e-30)
    w = weight.expand_as(taps)
    wsum = w.sum(-1, keepdim=True).clamp_min(1e-30)
    a = taps - (taps * w).sum(-1, keepdim=True) / wsum
    b = target - (target * w).sum(-1, keepdim=True) / wsum
    cov = (a * b * w).sum(-1)
    denom = ((a * a * w).sum(-1) * (b * b * w).sum(-1)).sqrt()
    ok = denom > 1e-20                                                   # rows with a flat target have none
    corr = (cov[ok] / denom[ok]).clamp(-1, 1).mean().item() if ok.any() else float("nan")
    return err.item(), corr


def softmax_taps(back: torch.Tensor, ahead: torch.Tensor | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(taps (heads_f, channels, L), weight (heads_f, 1, L)): the attention weights an additive bias alone gives.

    ``back`` (heads, L) is each attention head's score bias for the key j = 0..L-1 tokens back;
    ``ahead`` (heads, L), for bidirectional attention, for the key j tokens ahead (j = 0 is the same
    key as back's). The taps are softmax(bias) over all those keys: the forward filter gets the keys
    back, the reverse filter (bidirectional) the keys ahead, its tap 0 zero with weight 0 (a
    convolution counts offset 0 once). Channel c holds head c // (channels // heads).

    Example:
        >>> taps, weight = softmax_taps(-0.5 * torch.arange(8.0).expand(2, 8), None, 4)   # (heads, L)
        >>> taps.shape, round(taps[0, 0].sum().item(), 4)
        (torch.Size([1, 4, 8]), 1.0)
    """
    heads = back.shape[0]
    if channels % heads:
        raise ShapeError(f"softmax_taps: {heads} attention heads do not divide {channels} filter channels")
    bias = back.double() if ahead is None else torch.cat([back.double(), ahead.double()[:, 1:]], dim=-1)
    probs = torch.softmax(bias, dim=-1)                                            # (heads, L or 2L - 1)
    length = back.shape[-1]
    rows = [probs[:, :length]]
    weight = torch.ones(1 if ahead is None else 2, 1, length)
    if ahead is not None:
        rows.append(torch.cat([torch.zeros(heads, 1, dtype=probs.dtype), probs[:, length:]], dim=-1))
        weight[1, 0, 0] = 0.0
    taps = torch.stack(rows).repeat_interleave(channels // heads, dim=1)           # (heads_f, channels, L)
    return taps.float(), weight
