"""Long convolutions in plain PyTorch: the references the fused kernels are checked against.

Conventions (B batch, H channels, N sequence length):

    u, v, x1, x2: (B, H, N)
    k:     (H, N)  causal taps: y[t] += k[d] * u[t - d] for offsets d = 0..N-1
    k_rev: (H, N)  anti-causal taps: y[t] += k_rev[d] * u[t + d]; None for causal convolution
    D:     (H,)    per-channel skip: y[t] += D * u[t]

Both directions are linear (not circular) convolutions: the FFT has size 2N, so nothing wraps.
"""

from __future__ import annotations

import torch


def _forward(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Spectrum of real x (..., N) zero-padded to n_fft: the real FFT's n_fft // 2 + 1 bins; while exporting to
    ONNX the full complex FFT's n_fft bins (ONNX Runtime mis-sizes the one-sided DFT of a dynamic length)."""
    if torch.onnx.is_in_onnx_export():
        return torch.fft.fft(torch.nn.functional.pad(x, (0, n_fft - x.shape[-1])))
    return torch.fft.rfft(x, n=n_fft)


def _inverse(spectrum: torch.Tensor, n_fft: int) -> torch.Tensor:
    """The real signal (..., n_fft) of a spectrum made by :func:`_forward`."""
    if torch.onnx.is_in_onnx_export():
        return torch.fft.ifft(spectrum).real
    return torch.fft.irfft(spectrum, n=n_fft)


def fft_long_conv(u: torch.Tensor, k: torch.Tensor, k_rev: torch.Tensor | None = None,
                  D: torch.Tensor | None = None) -> torch.Tensor:
    """Linear long convolution of u with k (and k_rev) through a size-2N real FFT.

    Args:
        u: (B, H, N).  k: (H, N).  k_rev: (H, N) or None.  D: (H,) or None.

    Returns:
        (B, H, N) in u's dtype.

    Example:
        >>> u, k = torch.randn(2, 3, 5), torch.randn(3, 5)
        >>> fft_long_conv(u, k).shape
        torch.Size([2, 3, 5])
    """
    n = u.shape[-1]
    n_fft = 2 * n
    work = torch.promote_types(u.dtype, torch.float32)
    k_f = _forward(k.to(work), n_fft)                               # (H, N + 1)
    if k_rev is not None:
        # Reversing time modulo 2N conjugates the spectrum: the anti-causal half of a 2N-periodic filter.
        k_f = k_f + _forward(k_rev.to(work), n_fft).conj()
        k_f = k_f - k_rev[..., :1].to(work)                          # offset 0 is counted once, by k
    u_f = _forward(u.to(work), n_fft)                               # (B, H, N + 1)
    y = _inverse(u_f * k_f, n_fft)[..., :n]                         # (B, H, N)
    if D is not None:
        y = y + u.to(work) * D.to(work)[:, None]
    return y.to(u.dtype)


def gated_long_conv(v: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, k: torch.Tensor,
                    k_rev: torch.Tensor | None = None, D: torch.Tensor | None = None) -> torch.Tensor:
    """The M2 gated long convolution y = x2 * (conv(v * x1, k, k_rev) + D * (v * x1)).

    Args:
        v, x1, x2: (B, H, N).  k, k_rev: (H, N).  D: (H,) or None.

    Returns:
        (B, H, N).

    Example:
        >>> v, x1, x2 = torch.randn(3, 2, 4, 6).unbind(0)               # each (B=2, H=4, N=6)
        >>> k, D = torch.randn(4, 6), torch.randn(4)
        >>> y = gated_long_conv(v, x1, x2, k, None, D)                  # causal: (2, 4, 6)
        >>> torch.allclose(y, x2 * direct_long_conv(v * x1, k, None, D), atol=1e-5)
        True
    """
    return x2 * fft_long_conv(v * x1, k, k_rev, D)


def direct_long_conv(u: torch.Tensor, k: torch.Tensor, k_rev: torch.Tensor | None = None,
                     D: torch.Tensor | None = None) -> torch.Tensor:
    """The same convolution as :func:`fft_long_conv`, written as the O(N^2) sum over offsets it defines.

    The definition the FFT, Monarch-DFT and fused versions are checked against: slow (N vector
    operations), but with no transform whose padding or wrap-around could hide an error.

    Args:
        u: (B, H, N).  k: (H, N).  k_rev: (H, N) or None.  D: (H,) or None.

    Returns:
        (B, H, N): y[t] = sum_d k[d] u[t - d] + sum_{d >= 1} k_rev[d] u[t + d] + D u[t].

    Example:
        >>> u, k = torch.zeros(1, 1, 4), torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> u[0, 0, 1] = 1.0                                            # an impulse at t = 1
        >>> direct_long_conv(u, k)                                      # k, delayed by one step
        tensor([[[0., 1., 2., 3.]]])
        >>> torch.allclose(direct_long_conv(u, k, k), fft_long_conv(u, k, k), atol=1e-6)
        True
    """
    n = u.shape[-1]
    y = torch.zeros_like(u)
    for d in range(n):
        y[..., d:] += k[None, :, d, None] * u[..., : n - d]
        if k_rev is not None and d > 0:
            y[..., : n - d] += k_rev[None, :, d, None] * u[..., d:]
    if D is not None:
        y = y + u * D[:, None]
    return y
