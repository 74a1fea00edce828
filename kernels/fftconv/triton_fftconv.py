"""Fused gated long convolution in Triton, with the FFT computed as Monarch block GEMMs.

    y = x2 * (conv(v * x1, k, k_rev) + D * (v * x1))          v, x1, x2: (B, H, N), k, k_rev: (H, N)

A length-L DFT (L = n1 * n2, a power of two >= 2N, so the linear convolution never wraps) runs on one
(n1, n2) tile per sequence, in "natural" layout x[j1, j2] = x[n2*j1 + j2]:

    forward:  A = F1 @ x  (n1, n2);  A *= tw;  X = A @ F2          X[k1, k2] = DFT(x)[k1 + n1*k2]
    inverse:  C = Y @ conj(F2);  C *= conj(tw);  y = conj(F1) @ C  y[m1, m2] = L * IDFT(Y)[n2*m1 + m2]

The forward transform leaves the spectrum in the permuted (k1, k2) order and the inverse reads it from
there, so the stride permutation is never carried out: spectra are only ever multiplied pointwise with
spectra in the same order. Complex GEMMs are pairs of real tl.dot calls on real/imaginary tiles.

The filter k (causal taps at t = 0..N-1) and k_rev (anti-causal taps at t = L - d, d = 1..N-1) share one
length-L periodic filter, so a bidirectional convolution costs the same as a causal one.

Backward (one program per channel, looping over the batch): with G = DFT(dc), dc = dy * x2,
    du = IDFT(G * conj(K)) + D dc          (correlation: the adjoint of a convolution)
    dk_full = sum_b IDFT(G * conj(U))      (dk = dk_full[:N], dk_rev[d] = dk_full[L - d])

Supported lengths: 1 <= N <= MAX_N (the tile of one sequence must fit one program); longer sequences
raise KernelError.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..errors import KernelError

MAX_N = 8192
# Parsed as triton.jit parses it: the kernels below are interpreted (numpy on the CPU) when it is set.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")
_CONFIGS = ([triton.Config({}, num_warps=1)] if _INTERPRET
            else [triton.Config({}, num_warps=w) for w in (4, 8)])


def fft_size(n: int) -> tuple[int, int, int]:
    """(L, n1, n2): the FFT length for sequences of n, L = n1 * n2 >= 2n, powers of two, 16 <= n1 <= n2."""
    L = max(256, triton.next_power_of_2(2 * n))
    n1 = 1 << (int(math.log2(L)) // 2)
    return L, n1, L // n1


@lru_cache(maxsize=16)
def _dft_factors(L: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Forward DFT factors as stacked (real, imag): F1 (2, n1, n1), F2 (2, n2, n2), twiddles (2, n1, n2).
    _, n1, n2 = fft_size(L // 2)
    i1 = torch.arange(n1, dtype=torch.float64)
    i2 = torch.arange(n2, dtype=torch.float64)

    def polar(angle):
        return torch.stack([torch.cos(angle), torch.sin(angle)]).to(device=device, dtype=torch.float32)

    f1 = polar(-2 * math.pi * torch.outer(i1, i1) / n1)
    f2 = polar(-2 * math.pi * torch.outer(i2, i2) / n2)
    tw = polar(-2 * math.pi * torch.outer(i1, i2) / L)
    return f1, f2, tw


def _factors_for(L: int, like: torch.Tensor):
    # Eager calls share cached factors per device; while torch.compile traces (fake tensors) they are
    # rebuilt, so the cache never keeps a fake tensor.
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(like) or torch.compiler.is_compiling():
        return _dft_factors.__wrapped__(L, str(like.device))
    return _dft_factors(L, str(like.device))


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cmat(ptr, R: tl.constexpr, C: tl.constexpr):
    # (2, R, C) stacked real/imag matrix -> two (R, C) tiles.
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    return tl.load(ptr + offs), tl.load(ptr + R * C + offs)


@triton.jit
def _dft(x, f1_ptr, f2_ptr, tw_ptr, N1: tl.constexpr, N2: tl.constexpr, IEEE: tl.constexpr):
    # Real (N1, N2) tile in natural order -> spectrum (N1, N2) in (k1, k2) order, as (re, im).
    f1r, f1i = _cmat(f1_ptr, N1, N1)
    ar = _mm(f1r, x, IEEE)
    ai = _mm(f1i, x, IEEE)
    twr, twi = _cmat(tw_ptr, N1, N2)
    ar, ai = ar * twr - ai * twi, ar * twi + ai * twr
    f2r, f2i = _cmat(f2_ptr, N2, N2)
    return _mm(ar, f2r, IEEE) - _mm(ai, f2i, IEEE), _mm(ar, f2i, IEEE) + _mm(ai, f2r, IEEE)


@triton.jit
def _idft_real(yr, yi, f1_ptr, f2_ptr, tw_ptr, N1: tl.constexpr, N2: tl.constexpr, IEEE: tl.constexpr):
    # Spectrum in (k1, k2) order -> real part of the unscaled inverse DFT, (N1, N2) in natural order.
    f2r, f2i = _cmat(f2_ptr, N2, N2)
    cr = _mm(yr, f2r, IEEE) + _mm(yi, f2i, IEEE)
    ci = _mm(yi, f2r, IEEE) - _mm(yr, f2i, IEEE)
    twr, twi = _cmat(tw_ptr, N1, N2)
    cr, ci = cr * twr + ci * twi, ci * twr - cr * twi
    f1r, f1i = _cmat(f1_ptr, N1, N1)
    return _mm(f1r, cr, IEEE) + _mm(f1i, ci, IEEE)


@triton.jit
def _gate(v, x1):
    # v * x1 rounded to the input dtype as in the reference, computed in fp32 (the interpreter cannot
    # multiply bf16 values), returned in fp32.
    return (v.to(tl.float32) * x1.to(tl.float32)).to(v.dtype).to(tl.float32)


@triton.jit
def _time_index(N1: tl.constexpr, N2: tl.constexpr):
    return tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]          # (N1, N2): t = n2*j1 + j2


@triton.autotune(configs=_CONFIGS, key=["N1", "N2"])
@triton.jit
def _filter_spectrum_kernel(k_ptr, krev_ptr, kf_ptr, f1_ptr, f2_ptr, tw_ptr, N,
                            HAS_REV: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, IEEE: tl.constexpr):
    # One program per channel h: K = DFT(k_full) / L into kf[h] (2, N1, N2).
    h = tl.program_id(0)
    L: tl.constexpr = N1 * N2
    t = _time_index(N1, N2)
    kfull = tl.load(k_ptr + h * N + t, mask=t < N, other=0.0).to(tl.float32)
    if HAS_REV:
        # Anti-causal tap d sits at t = L - d; tap 0 belongs to k alone.
        rev = t > L - N
        kfull += tl.load(krev_ptr + h * N + (L - t), mask=rev, other=0.0).to(tl.float32)
    kr, ki = _dft(kfull, f1_ptr, f2_ptr, tw_ptr, N1, N2, IEEE)
    out = kf_ptr + h * 2 * L
    tl.store(out + t, kr / L)
    tl.store(out + L + t, ki / L)


@triton.autotune(configs=_CONFIGS, key=["N1", "N2"])
@triton.jit
def _gated_conv_fwd_kernel(v_ptr, x1_ptr, x2_ptr, kf_ptr, d_ptr, y_ptr, f1_ptr, f2_ptr, tw_ptr, H, N,
                           HAS_D: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, IEEE: tl.constexpr):
    row = tl.program_id(0)                                                     # b * H + h
    h = row % H
    L: tl.constexpr = N1 * N2
    t = _time_index(N1, N2)
    inside = t < N                                                             # zero padding to L
    v = tl.load(v_ptr + row * N + t, mask=inside, other=0.0)
    x1 = tl.load(x1_ptr + row * N + t, mask=inside, other=0.0)
    u = _gate(v, x1)
    ur, ui = _dft(u, f1_ptr, f2_ptr, tw_ptr, N1, N2, IEEE)
    kr, ki = _cmat(kf_ptr + h * 2 * L, N1, N2)
    c = _idft_real(ur * kr - ui * ki, ur * ki + ui * kr, f1_ptr, f2_ptr, tw_ptr, N1, N2, IEEE)
    if HAS_D:
        c += tl.load(d_ptr + h).to(tl.float32) * u
    x2 = tl.load(x2_ptr + row * N + t, mask=inside, other=0.0)
    y = x2.to(tl.float32) * c.to(x2.dtype).to(tl.float32)                     # rounds where the reference does
    tl.store(y_ptr + row * N + t, y.to(x2.dtype), mask=inside)


@triton.autotune(configs=_CONFIGS, key=["N1", "N2"])
@triton.jit
def _gated_conv_bwd_kernel(dy_ptr, v_ptr, x1_ptr, x2_ptr, kf_ptr, d_ptr,
                           dv_ptr, dx1_ptr, dx2_ptr, dk_ptr, dkrev_ptr, dd_ptr,
                           f1_ptr, f2_ptr, tw_ptr, B, H, N,
                           HAS_REV: tl.constexpr, HAS_D: tl.constexpr,
                           N1: tl.constexpr, N2: tl.constexpr, IEEE: tl.constexpr):
    h = tl.program_id(0)                                                       # one channel, all batches
    L: tl.constexpr = N1 * N2
    t = _time_index(N1, N2)
    inside = t < N
    kr, ki = _cmat(kf_ptr + h * 2 * L, N1, N2)                                  # K / L
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    qr = tl.zeros((N1, N2), dtype=tl.float32)                                  # sum_b G * conj(U)
    qi = tl.zeros((N1, N2), dtype=tl.float32)
    dd = tl.zeros((N1, N2), dtype=tl.float32)                                  # sum_b dc * u
    for b in range(0, B):
        base = (b * H + h) * N
        v = tl.load(v_ptr + base + t, mask=inside, other=0.0)
        x1 = tl.load(x1_ptr + base + t, mask=inside, other=0.0)
        x2 = tl.load(x2_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + t, mask=inside, other=0.0).to(tl.float32)
        u = _gate(v, x1)
        ur, ui = _dft(u, f1_ptr, f2_ptr, tw_ptr, N1, N2, IEEE)
        c = _idft_real(ur * kr - ui * ki, ur * ki + ui * kr, f1_ptr, f2_ptr, tw_ptr, N1, N2, IEEE) + d * u
        tl.store(dx2_ptr + base + t, (dy * c).to(dx2_ptr.dtype.element_ty), mask=inside)
        g = dy * x2                                                            # dL/dc
        gr, gi = _dft(g, f1_ptr, f2_ptr, tw_ptr, N1, N2, IEEE)
        du = _idft_real(gr * kr + gi * ki, gi * kr - gr * ki, f1_ptr, f2_ptr, tw_ptr, N1, N2, IEEE) + d * g
        tl.store(dv_ptr + base + t, (du * x1.to(tl.float32)).to(dv_ptr.dtype.element_ty), mask=inside)
        tl.store(dx1_ptr + base + t, (du * v.to(tl.float32)).to(dx1_ptr.dtype.element_ty), mask=inside)
        qr += gr * ur + gi * ui
        qi += gi * ur - gr * ui
        dd += g * u
    q = _idft_real(qr, qi, f1_ptr, f2_ptr, tw_ptr, N1, N2, IEEE) / L           # cross-correlation of dc, u
    tl.store(dk_ptr + h * N + t, q, mask=inside)
    if HAS_REV:
        # Lag t = L - d is anti-causal tap d; tap 0 of k_rev is unused by the forward, so its grad is 0.
        first = t == 0
        tl.store(dkrev_ptr + h * N + (L - t) % L, tl.where(first, 0.0, q), mask=first | (t > L - N))
    if HAS_D:
        tl.store(dd_ptr + h, tl.sum(tl.sum(dd, axis=1), axis=0))


def _identity(kernel):
    return kernel


def _check(v, x1, x2, k, k_rev, D) -> tuple[int, int, int]:
    if v.dim() != 3 or x1.shape != v.shape or x2.shape != v.shape:
        raise ValueError(f"gated_long_conv: v, x1, x2 must share a (B, H, N) shape, got "
                         f"{tuple(v.shape)}, {tuple(x1.shape)}, {tuple(x2.shape)}")
    b, h, n = v.shape
    if k.shape != (h, n) or (k_rev is not None and k_rev.shape != (h, n)):
        raise ValueError(f"gated_long_conv: filters must be ({h}, {n}), got k {tuple(k.shape)}"
                         + ("" if k_rev is None else f", k_rev {tuple(k_rev.shape)}"))
    if D is not None and D.shape != (h,):
        raise ValueError(f"gated_long_conv: D must be ({h},), got {tuple(D.shape)}")
    if not (v.dtype == x1.dtype == x2.dtype):
        raise TypeError(f"gated_long_conv: v, x1, x2 dtypes differ ({v.dtype}, {x1.dtype}, {x2.dtype})")
    if not 1 <= n <= MAX_N:
        raise KernelError(f"gated_long_conv: the fused kernel handles 1 <= N <= {MAX_N}, got N={n}; "
                          "use kernels.fftconv.reference.gated_long_conv for longer sequences")
    return b, h, n


def _filter_spectrum(k, k_rev, L, n1, n2, factors, ieee, wrap):
    h, n = k.shape
    kf = torch.empty(h, 2, n1, n2, device=k.device, dtype=torch.float32)      # (H, re/im, k1, k2)
    k_rev_arg = k if k_rev is None else k_rev.contiguous()
    wrap(_filter_spectrum_kernel)[(h,)](k.contiguous(), k_rev_arg, kf, *factors, n,
                                        HAS_REV=k_rev is not None, N1=n1, N2=n2, IEEE=ieee)
    return kf


def gated_conv_forward(v, x1, x2, k, k_rev=None, D=None, wrap=_identity) -> torch.Tensor:
    """Launch the fused forward: filter spectra (one program per channel), then one program per row.

    Args:
        v, x1, x2: (B, H, N), one dtype.  k, k_rev: (H, N) or k_rev None.  D: (H,) or None.
        wrap: applied to each kernel before launch (``torch.library.wrap_triton`` inside a triton_op).

    Returns:
        (B, H, N) in v's dtype.
    """
    b, h, n = _check(v, x1, x2, k, k_rev, D)
    y = torch.empty(b, h, n, device=v.device, dtype=v.dtype)
    if b * h == 0:
        return y
    L, n1, n2 = fft_size(n)
    factors = _factors_for(L, v)
    ieee = v.dtype == torch.float32
    kf = _filter_spectrum(k, k_rev, L, n1, n2, factors, ieee, wrap)
    d_arg = kf if D is None else D.contiguous()
    wrap(_gated_conv_fwd_kernel)[(b * h,)](v.contiguous(), x1.contiguous(), x2.contiguous(), kf, d_arg, y,
                                           *factors, h, n, HAS_D=D is not None, N1=n1, N2=n2, IEEE=ieee)
    return y


def gated_conv_backward(dy, v, x1, x2, k, k_rev=None, D=None, wrap=_identity):
    """Gradients of :func:`gated_conv_forward` for every input (None where k_rev / D is None).

    Args:
        dy, v, x1, x2: (B, H, N).  k, k_rev: (H, N).  D: (H,) or None.

    Returns:
        (dv, dx1, dx2) (B, H, N); dk, dk_rev (H, N); dD (H,), each in its input's dtype.
    """
    b, h, n = _check(v, x1, x2, k, k_rev, D)
    if h == 0:
        return (torch.zeros_like(v), torch.zeros_like(x1), torch.zeros_like(x2), torch.zeros_like(k),
                None if k_rev is None else torch.zeros_like(k_rev), None if D is None else torch.zeros_like(D))
    L, n1, n2 = fft_size(n)
    factors = _factors_for(L, v)
    ieee = v.dtype == torch.float32
    kf = _filter_spectrum(k, k_rev, L, n1, n2, factors, ieee, wrap)
    dv, dx1, dx2 = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (v, x1, x2))
    dk = torch.empty(h, n, device=v.device, dtype=torch.float32)
    dk_rev = torch.empty(h, n, device=v.device, dtype=torch.float32) if k_rev is not None else dk
    dd = torch.empty(h, device=v.device, dtype=torch.float32) if D is not None else dk
    d_arg = kf if D is None else D.contiguous()
    wrap(_gated_conv_bwd_kernel)[(h,)](
        dy.contiguous(), v.contiguous(), x1.contiguous(), x2.contiguous(), kf, d_arg,
        dv, dx1, dx2, dk, dk_rev, dd, *factors, b, h, n,
        HAS_REV=k_rev is not None, HAS_D=D is not None, N1=n1, N2=n2, IEEE=ieee)
    return (dv, dx1, dx2, dk.to(k.dtype),
            None if k_rev is None else dk_rev.to(k_rev.dtype), None if D is None else dd.to(D.dtype))


class _GatedLongConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, x1, x2, k, k_rev, D):
        ctx.save_for_backward(v, x1, x2, k, k_rev, D)
        return gated_conv_forward(v, x1, x2, k, k_rev, D)

    @staticmethod
    def backward(ctx, dy):
        return gated_conv_backward(dy, *ctx.saved_tensors)


def gated_long_conv_triton(v: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, k: torch.Tensor,
                           k_rev: torch.Tensor | None = None, D: torch.Tensor | None = None) -> torch.Tensor:
    """The M2 gated long convolution y = x2 * (conv(v * x1, k, k_rev) + D * (v * x1)), fused (with autograd).

    Same contract as ``reference.gated_long_conv``: bidirectional when k_rev is given, causal otherwise.
    The FFT is Monarch-factorised block GEMMs in fp32 whatever the input dtype (fp32, bf16, fp16).

    Args:
        v, x1, x2: (B, H, N) with 1 <= N <= MAX_N.  k, k_rev: (H, N).  D: (H,) or None.

    Returns:
        (B, H, N) in v's dtype.

    Example:
        >>> from m2convert.kernels.fftconv.reference import gated_long_conv
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU needs TRITON_INTERPRET=1
        >>> v, x1, x2 = (torch.randn(2, 3, 100, device=dev) for _ in range(3))
        >>> k = torch.randn(3, 100, device=dev) / 100
        >>> y = gated_long_conv_triton(v, x1, x2, k)  # (2, 3, 100)
        >>> torch.allclose(y, gated_long_conv(v, x1, x2, k), atol=1e-4)
        True
    """
    return _GatedLongConv.apply(v, x1, x2, k, k_rev, D)
