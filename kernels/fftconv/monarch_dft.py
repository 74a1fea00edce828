"""The DFT as a Monarch matrix: the polynomial evaluation/interpolation view of long convolution.

A length-n DFT with n = n1 * n2 factors (Cooley-Tukey) into two block-diagonal GEMMs, a twiddle
scaling and a stride permutation:

    X[k1 + n1*k2] = sum_j2 W_n2^(j2 k2) * W_n^(j2 k1) * sum_j1 W_n1^(j1 k1) * x[n2*j1 + j2]

so evaluating the polynomial with coefficients x at the n-th roots of unity costs O(n (n1 + n2))
with GEMMs instead of O(n^2). A causal convolution is evaluation of both polynomials at 2N points
(zero padding makes the product's degree fit), a pointwise product, and interpolation (the inverse
DFT, the same factorisation conjugated): no torch.fft call anywhere on this path.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def split_length(n: int) -> tuple[int, int]:
    """n = n1 * n2 with n1 the largest divisor of n not above sqrt(n).

    Example:
        >>> split_length(12), split_length(13)
        ((3, 4), (1, 13))
    """
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


@lru_cache(maxsize=64)
def _dft_factors_f64(n: int, inverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Built eagerly from Python ints and kept as plain CPU float64 tensors: under torch.export or
    # torch.compile they enter the graph as constants, and nothing traced is ever cached here.
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        n1, n2 = split_length(n)
        sign = 1.0 if inverse else -1.0
        real = torch.float64
        j1 = torch.arange(n1, dtype=real)
        j2 = torch.arange(n2, dtype=real)
        f1 = torch.polar(torch.ones(n1, n1, dtype=real), sign * 2 * math.pi * torch.outer(j1, j1) / n1)
        f2 = torch.polar(torch.ones(n2, n2, dtype=real), sign * 2 * math.pi * torch.outer(j2, j2) / n2)
        tw = torch.polar(torch.ones(n1, n2, dtype=real), sign * 2 * math.pi * torch.outer(j1, j2) / n)
    return f1, f2, tw


def _dft_factors(n: int, inverse: bool, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """(F_n1 (n1, n1), F_n2 (n2, n2), twiddles (n1, n2)) in ``dtype`` on ``device``."""
    return tuple(t.to(dtype=dtype, device=device) for t in _dft_factors_f64(int(n), inverse))


def monarch_dft(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """DFT (or inverse DFT, scaled by 1/n) of a complex tensor along its last dim, as Monarch GEMMs.

    Args:
        x: (..., n) complex.
        inverse: compute the inverse transform (conjugate factors, divided by n).

    Returns:
        (..., n) complex, equal to ``torch.fft.fft(x)`` (or ``ifft``) up to rounding.

    Example:
        >>> x = torch.randn(3, 12, dtype=torch.complex128)
        >>> torch.allclose(monarch_dft(x), torch.fft.fft(x))
        True
        >>> torch.allclose(monarch_dft(x, inverse=True), torch.fft.ifft(x))
        True
    """
    n = x.shape[-1]
    n1, n2 = split_length(n)
    f1, f2, tw = _dft_factors(n, inverse, x.dtype, x.device)
    xr = x.reshape(*x.shape[:-1], n1, n2)                          # (..., j1, j2)
    a = torch.matmul(f1, xr) * tw                                  # (..., k1, j2): block GEMM + twiddle
    b = torch.matmul(a, f2.transpose(0, 1))                        # (..., k1, k2): block GEMM
    out = b.transpose(-1, -2).reshape(*x.shape[:-1], n)            # stride permutation k1 + n1*k2
    return out / n if inverse else out


def monarch_long_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Causal linear convolution computed by Monarch-DFT evaluation/interpolation at 2N points.

    Args:
        u: (B, H, N) real.  k: (H, N) causal taps.  D: (H,) or None.

    Returns:
        (B, H, N), equal to ``fft_long_conv(u, k, None, D)`` up to rounding.

    Example:
        >>> from m2convert.kernels.fftconv.reference import fft_long_conv
        >>> u, k = torch.randn(2, 3, 10), torch.randn(3, 10)
        >>> torch.allclose(monarch_long_conv(u, k), fft_long_conv(u, k), atol=1e-5)
        True
    """
    n = u.shape[-1]
    real = torch.promote_types(u.dtype, torch.float32)
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    pad = (0, n)
    u_hat = monarch_dft(torch.nn.functional.pad(u.to(real), pad).to(cplx))       # (B, H, 2N)
    k_hat = monarch_dft(torch.nn.functional.pad(k.to(real), pad).to(cplx))       # (H, 2N)
    y = monarch_dft(u_hat * k_hat, inverse=True).real[..., :n]                    # (B, H, N)
    if D is not None:
        y = y + u.to(real) * D.to(real)[:, None]
    return y.to(u.dtype)
