"""Fused order-2 Monarch multiply in Triton: both block GEMMs and the stride permutation in one kernel.

Same layout as ``reference.py`` (nb blocks, P in block, S out block, rho rank per dense block):

    x: (M, nb*P)   w1: (nb, nb*rho, P)   w2: (nb, S, nb*rho)   y: (M, nb*S)

    y[m, l*S + s] = sum_k sum_j w2[l, s, k*rho + j] * h[m, k, l*rho + j]
    h[m, k, l*rho + j] = sum_p w1[k, l*rho + j, p] * x[m, k*P + p]

One program owns a (BLOCK_M rows) x (output block l) x (BLOCK_S columns) tile of y and loops over the
input blocks k: it computes the slice h[:, k, l*rho : (l+1)*rho] on chip and feeds it straight into the
second GEMM. The permutation P1 is the choice of rows l*rho.. of w1[k] and columns k*rho.. of w2[l] in
the loads; no permuted copy of h ever exists. The price is that h is recomputed once per S tile
(ceil(S / BLOCK_S) times), which autotuning trades against the size of the accumulator.

Backward: dx is the same fused product with the transposed factors (w2^T, w1^T) passed as strided
views; dw1 and dw2 each get a kernel that reduces over rows (split over M for parallelism).
Block sizes are at least 16 (tl.dot's minimum on GPUs); smaller or odd P, S, rho are masked loads.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Parsed as triton.jit parses it: the kernels below are interpreted (numpy on the CPU) when it is set.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")
# The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bits: it gets fp32 copies.
_UPCAST_DOT = tl.constexpr(_INTERPRET)


def _configs(space: list[dict], warps: tuple[int, ...]) -> list[triton.Config]:
    if _INTERPRET:
        # The interpreter runs every program in numpy: one small config keeps CPU tests fast and
        # still exercises the tile loops and masks.
        return [triton.Config({k: 16 for k in space[0]}, num_warps=1)]
    return [triton.Config(c, num_warps=w, num_stages=3) for c in space for w in warps]


def _prune(names: dict[str, str]):
    """Drop configs whose tiles exceed the padded problem size (keeps the smallest if none fit)."""
    def prune(configs, named_args, **kwargs):
        limit = {blk: max(16, triton.next_power_of_2(int(named_args[dim]))) for blk, dim in names.items()}
        kept = [c for c in configs if all(c.kwargs[b] <= limit[b] for b in names)]
        return kept or [min(configs, key=lambda c: sum(c.kwargs.values()))]
    return prune


_FWD_SPACE = [
    {"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_R": 64, "BLOCK_S": 128},
    {"BLOCK_M": 128, "BLOCK_P": 64, "BLOCK_R": 64, "BLOCK_S": 128},
    {"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_R": 64, "BLOCK_S": 256},
    {"BLOCK_M": 64, "BLOCK_P": 32, "BLOCK_R": 32, "BLOCK_S": 64},
]
_GRAD_SPACE = [
    {"BLOCK_M": 64, "BLOCK_A": 64, "BLOCK_R": 64, "BLOCK_B": 128},
    {"BLOCK_M": 64, "BLOCK_A": 64, "BLOCK_R": 64, "BLOCK_B": 64},
    {"BLOCK_M": 32, "BLOCK_A": 32, "BLOCK_R": 32, "BLOCK_B": 64},
]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: full precision so results match the reference; 16-bit inputs ignore the flag.
    if _UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.autotune(configs=_configs(_FWD_SPACE, (4, 8)), key=["NB", "P", "S", "RHO"],
                 prune_configs_by={"early_config_prune": _prune(
                     {"BLOCK_P": "P", "BLOCK_R": "RHO", "BLOCK_S": "S"})})
@triton.jit
def _monarch_fwd_kernel(x_ptr, w1_ptr, w2_ptr, y_ptr, M, NB, P, S, RHO,
                        sxm, sxd, s1k, s1r, s1p, s2l, s2s, s2r, sym,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    l = tl.program_id(2)                                              # output block
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_m = offs_m < M
    mask_s = offs_s < S
    acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for k in range(0, NB):                                            # input block
        for r0 in range(0, RHO, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < RHO
            h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)        # h[:, k, l*rho + r]
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask_p = offs_p < P
                xt = tl.load(x_ptr + offs_m[:, None] * sxm + (k * P + offs_p)[None, :] * sxd,
                             mask=mask_m[:, None] & mask_p[None, :], other=0.0)            # (BM, BP)
                w1t = tl.load(w1_ptr + k * s1k + (l * RHO + offs_r)[None, :] * s1r
                              + offs_p[:, None] * s1p,
                              mask=mask_p[:, None] & mask_r[None, :], other=0.0)           # (BP, BR)
                h = _dot(xt, w1t, h, IEEE)
            # Stride permutation: group l of block k meets columns k*rho.. of w2[l].
            w2t = tl.load(w2_ptr + l * s2l + offs_s[None, :] * s2s + (k * RHO + offs_r)[:, None] * s2r,
                          mask=mask_r[:, None] & mask_s[None, :], other=0.0)               # (BR, BS)
            acc = _dot(h.to(w2t.dtype), w2t, acc, IEEE)
    tl.store(y_ptr + offs_m[:, None] * sym + (l * S + offs_s)[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_s[None, :])


@triton.autotune(configs=_configs(_GRAD_SPACE, (4,)), key=["NB", "P", "S", "RHO"],
                 prune_configs_by={"early_config_prune": _prune(
                     {"BLOCK_A": "P", "BLOCK_R": "RHO", "BLOCK_B": "S"})})
@triton.jit
def _monarch_dw2_kernel(x_ptr, w1_ptr, dy_ptr, dw2_ptr, M, NB, P, S, RHO, ROWS_PER_SPLIT,
                        sxm, s1k, s1r, s1p, sdym,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    # dw2[l, s, k*rho + r] = sum_m dy[m, l*S + s] * h[m, k, l*rho + r]; A tiles P, B tiles S.
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_lk = tl.program_id(2)
    split = pid_lk // (NB * NB)
    lk = pid_lk % (NB * NB)
    l = lk // NB
    k = lk % NB
    offs_s = pid_s * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_s = offs_s < S
    mask_r = offs_r < RHO
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    m_start = split * ROWS_PER_SPLIT
    for m0 in range(m_start, m_start + ROWS_PER_SPLIT, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_A):
            offs_p = p0 + tl.arange(0, BLOCK_A)
            mask_p = offs_p < P
            xt = tl.load(x_ptr + offs_m[:, None] * sxm + (k * P + offs_p)[None, :],
                         mask=mask_m[:, None] & mask_p[None, :], other=0.0)                # (BM, BA)
            w1t = tl.load(w1_ptr + k * s1k + (l * RHO + offs_r)[None, :] * s1r + offs_p[:, None] * s1p,
                          mask=mask_p[:, None] & mask_r[None, :], other=0.0)               # (BA, BR)
            h = _dot(xt, w1t, h, IEEE)
        dyt = tl.load(dy_ptr + offs_m[None, :] * sdym + (l * S + offs_s)[:, None],
                      mask=mask_s[:, None] & mask_m[None, :], other=0.0)                   # (BB, BM)
        acc = _dot(dyt, h.to(dyt.dtype), acc, IEEE)
    mid = NB * RHO
    out = dw2_ptr + split * (NB * S * mid) + l * (S * mid)
    tl.store(out + offs_s[:, None] * mid + (k * RHO + offs_r)[None, :], acc,
             mask=mask_s[:, None] & mask_r[None, :])


@triton.autotune(configs=_configs(_GRAD_SPACE, (4,)), key=["NB", "P", "S", "RHO"],
                 prune_configs_by={"early_config_prune": _prune(
                     {"BLOCK_A": "P", "BLOCK_R": "RHO", "BLOCK_B": "S"})})
@triton.jit
def _monarch_dw1_kernel(x_ptr, w2_ptr, dy_ptr, dw1_ptr, M, NB, P, S, RHO, ROWS_PER_SPLIT,
                        sxm, s2l, s2s, s2r, sdym,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    # dw1[k, l*rho + r, p] = sum_m dh[m, k, l*rho + r] * x[m, k*P + p]
    # dh[m, k, l*rho + r] = sum_s dy[m, l*S + s] * w2[l, s, k*rho + r]; A tiles P, B tiles S.
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_kl = tl.program_id(2)
    split = pid_kl // (NB * NB)
    kl = pid_kl % (NB * NB)
    k = kl // NB
    l = kl % NB
    offs_p = pid_p * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_r = offs_r < RHO
    acc = tl.zeros((BLOCK_R, BLOCK_A), dtype=tl.float32)
    m_start = split * ROWS_PER_SPLIT
    for m0 in range(m_start, m_start + ROWS_PER_SPLIT, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        dh = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)                   # dh^T
        for s0 in range(0, S, BLOCK_B):
            offs_s = s0 + tl.arange(0, BLOCK_B)
            mask_s = offs_s < S
            w2t = tl.load(w2_ptr + l * s2l + offs_s[None, :] * s2s + (k * RHO + offs_r)[:, None] * s2r,
                          mask=mask_r[:, None] & mask_s[None, :], other=0.0)               # (BR, BB)
            dyt = tl.load(dy_ptr + offs_m[None, :] * sdym + (l * S + offs_s)[:, None],
                          mask=mask_s[:, None] & mask_m[None, :], other=0.0)               # (BB, BM)
            dh = _dot(w2t, dyt, dh, IEEE)
        xt = tl.load(x_ptr + offs_m[:, None] * sxm + (k * P + offs_p)[None, :],
                     mask=mask_m[:, None] & mask_p[None, :], other=0.0)                    # (BM, BA)
        acc = _dot(dh.to(xt.dtype), xt, acc, IEEE)
    mid = NB * RHO
    out = dw1_ptr + split * (NB * mid * P) + k * (mid * P)
    tl.store(out + (l * RHO + offs_r)[:, None] * P + offs_p[None, :], acc,
             mask=mask_r[:, None] & mask_p[None, :])


def _identity(kernel):
    return kernel


def _check(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int]:
    nb, mid, p = w1.shape
    nb2, s, mid2 = w2.shape
    if nb2 != nb or mid2 != mid or mid % nb != 0:
        raise ValueError(f"monarch_matmul: factor shapes {tuple(w1.shape)} and {tuple(w2.shape)} do not chain")
    if x.shape[-1] != nb * p:
        raise ValueError(f"monarch_matmul: x has {x.shape[-1]} features, factors expect {nb * p}")
    if not (x.dtype == w1.dtype == w2.dtype):
        raise TypeError(f"monarch_matmul: dtypes differ (x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype})")
    return nb, p, s, mid // nb


def monarch_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, wrap=_identity) -> torch.Tensor:
    """Launch the fused forward kernel.

    Args:
        x: (M, nb*P), w1: (nb, nb*rho, P), w2: (nb, S, nb*rho); any strides (the backward passes
            transposed views of the factors).
        wrap: applied to the kernel before launch (``torch.library.wrap_triton`` inside a triton_op).

    Returns:
        (M, nb*S) in x's dtype.
    """
    nb, p, s, rho = _check(x, w1, w2)
    m = x.shape[0]
    y = torch.empty(m, nb * s, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(s, meta["BLOCK_S"]), nb)  # noqa: E731
    wrap(_monarch_fwd_kernel)[grid](
        x, w1, w2, y, m, nb, p, s, rho,
        x.stride(0), x.stride(1), *w1.stride(), *w2.stride(), y.stride(0),
        IEEE=x.dtype == torch.float32)
    return y


def _splits(m: int, programs: int) -> tuple[int, int]:
    # Split the row reduction so that about 256 programs run; each split covers a multiple of 64 rows
    # (every autotune BLOCK_M divides 64, so splits never share a row).
    n = max(1, min(triton.cdiv(256, max(programs, 1)), triton.cdiv(m, 256)))
    rows = max(64, triton.cdiv(triton.cdiv(m, n), 64) * 64)
    return triton.cdiv(max(m, 1), rows), rows


def monarch_backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     wrap=_identity) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`monarch_forward`.

    Args:
        dy: (M, nb*S).  x: (M, nb*P) contiguous.  w1: (nb, nb*rho, P).  w2: (nb, S, nb*rho).

    Returns:
        dx (M, nb*P), dw1 (nb, nb*rho, P), dw2 (nb, S, nb*rho) in the input dtypes.
    """
    nb, p, s, rho = _check(x, w1, w2)
    m = x.shape[0]
    x, dy = x.contiguous(), dy.contiguous()
    # dx = R^T P1^T L^T dy: the same Monarch product with the factors transposed, swapping P and S.
    dx = monarch_forward(dy, w2.transpose(1, 2), w1.transpose(1, 2), wrap)
    base = nb * nb * triton.cdiv(rho, 64) * triton.cdiv(max(p, s), 64)
    n_split, rows = _splits(m, base)
    ieee = x.dtype == torch.float32
    dw1 = torch.empty(n_split, *w1.shape, device=x.device, dtype=torch.float32)
    dw2 = torch.empty(n_split, *w2.shape, device=x.device, dtype=torch.float32)
    grid1 = lambda meta: (triton.cdiv(p, meta["BLOCK_A"]), triton.cdiv(rho, meta["BLOCK_R"]),  # noqa: E731
                          nb * nb * n_split)
    wrap(_monarch_dw1_kernel)[grid1](x, w2, dy, dw1, m, nb, p, s, rho, rows,
                                     x.stride(0), *w2.stride(), dy.stride(0), IEEE=ieee)
    grid2 = lambda meta: (triton.cdiv(s, meta["BLOCK_B"]), triton.cdiv(rho, meta["BLOCK_R"]),  # noqa: E731
                          nb * nb * n_split)
    wrap(_monarch_dw2_kernel)[grid2](x, w1, dy, dw2, m, nb, p, s, rho, rows,
                                     x.stride(0), *w1.stride(), dy.stride(0), IEEE=ieee)
    return dx, dw1.sum(0).to(w1.dtype), dw2.sum(0).to(w2.dtype)


class _MonarchMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, w1, w2):
        ctx.save_for_backward(x2d, w1, w2)
        return monarch_forward(x2d, w1, w2)

    @staticmethod
    def backward(ctx, dy):
        x2d, w1, w2 = ctx.saved_tensors
        return monarch_backward(dy, x2d, w1, w2)


def monarch_matmul_triton(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """y = Monarch(w1, w2) @ x along the last dimension, fused in one Triton kernel (with autograd).

    Same contract as ``reference.monarch_matmul``; x, w1, w2 share a dtype (fp32, bf16 or fp16) and a
    device that Triton runs on (a GPU, or the CPU under TRITON_INTERPRET=1). Accumulation is fp32.

    Args:
        x: (..., nb * P).  w1: (nb, nb * rho, P).  w2: (nb, S, nb * rho).

    Returns:
        (..., nb * S).

    Example:
        >>> from m2convert.kernels.monarch.reference import monarch_matmul
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU needs TRITON_INTERPRET=1
        >>> x = torch.randn(2, 7, 12, device=dev)
        >>> w1, w2 = torch.randn(4, 8, 3, device=dev), torch.randn(4, 5, 8, device=dev)
        >>> y = monarch_matmul_triton(x, w1, w2)  # (2, 7, 4 * 5)
        >>> torch.allclose(y, monarch_matmul(x, w1, w2), atol=1e-4)
        True
    """
    nb, p, s, _ = _check(x, w1, w2)
    lead = x.shape[:-1]
    y = _MonarchMatmul.apply(x.reshape(-1, nb * p).contiguous(), w1, w2)
    return y.reshape(*lead, nb * s)
