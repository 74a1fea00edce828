"""Order-2 Monarch multiply laid out for CPU BLAS, for inference (no autograd).

Computes exactly what :func:`m2convert.kernels.monarch.reference.monarch_matmul` computes, plus the bias,
with the same factors (w1: (nb, nb * rho, P), w2: (nb, S, nb * rho)), but arranged for a CPU:

- The input is read in place: (M, nb * P) rows or (nb * P, M) channels first are both valid BLAS
  operands for the first batched GEMM, so neither layout is copied or transposed.
- The first GEMM runs as w1 @ x^T, leaving the intermediate tokens-last, so the stride permutation
  between the factors moves contiguous runs of tokens (measured 1.3-1.4x over the row-major order at
  nb = 4 and 16, whose permutation moved runs of rho values).
- The bias rides in the second GEMM (baddbmm, beta = 1) instead of a separate pass over the output.
- Tokens are processed in chunks whose intermediates stay a few MiB: glibc hands those back from its
  heap instead of fresh zero-filled pages (tens of MiB intermediates cost a page fault per 4 KiB,
  which measured 25-40% of the whole multiply at d = 4096, nb = 16), and the stride permutation reads
  data that is still in cache.
- Each chunk's result is written straight into its rows of the output, so the block-major GEMM result
  is transposed once, into its final place.
- A handful of rows (one decoded token per sequence) is bound by reading the factors, not by FLOPs: both
  products then run rows-first (x @ w^T), where BLAS reads each factor in the orientation it is stored
  (one-token decoding stores each factor with its longer side contiguous:
  :func:`m2convert.layers.monarch.lay_out_for_decode`); the tokens-last order above reads a (N, P)
  block as N short dot products and ran 2-3x slower at one row.

Example:
    >>> from m2convert.kernels.monarch.reference import monarch_matmul
    >>> x = torch.randn(10, 12)
    >>> w1, w2, b = torch.randn(4, 8, 3), torch.randn(4, 5, 8), torch.randn(20)
    >>> torch.allclose(monarch_linear(x, w1, w2, b), monarch_matmul(x, w1, w2) + b, atol=1e-5)
    True
"""

from __future__ import annotations

import torch

# Elements (not bytes) of the largest per-chunk intermediate: 512 Ki fp32 = 2 MiB, well under glibc's largest
# mmap threshold (32 MiB); 0.5-4 Mi measured within noise of each other at d = 768-4096, 8 Mi slower. The
# three chunk buffers are what a call needs beyond its output, so the smallest of those sizes.
CHUNK_ELEMENTS = 1 << 19
# Fewer rows than this per chunk and the GEMMs get too short to run at full speed.
MIN_CHUNK_ROWS = 256
# Up to this many rows the products run rows-first (see the module notes): measured faster at 1-8 rows.
FEW_ROWS = 8


def chunk_rows(rows: int, width: int) -> int:
    """Rows per chunk so that a (rows, width) intermediate stays near CHUNK_ELEMENTS."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(width, 1)) if rows > MIN_CHUNK_ROWS else max(rows, 1)


def monarch_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None = None,
                   out_features: int | None = None, *, x_t: bool = False, out_t: bool = False,
                   activation=None, out: torch.Tensor | None = None, x_blocks: bool = False,
                   out_blocks: bool = False) -> torch.Tensor:
    """y = Monarch(w1, w2) @ x (+ bias) along the feature dimension, without building an autograd graph.

    Args:
        x: (M, nb * P) rows contiguous, or with ``x_t`` (nb * P, M) channels first (rows of M contiguous).
        w1: (nb, nb * rho, P).  w2: (nb, S, nb * rho).
        bias: (out_features,) or None.
        out_features: keep the first out_features <= nb * S outputs (default all).
        x_t, out_t: input / output channels first. Either way BLAS reads and writes the operands in
            place, so a channels-first neighbour (the long convolution) needs no transpose copy.
        activation: in-place elementwise function (e.g. ``torch._C._nn.gelu_``) applied to each chunk's
            block-major result before it is written out, while it is still in cache: the activation
            costs no pass over, and no second copy of, the (M, out) output. None: no activation.
        out: a (M, out_features) tensor (rows contiguous; not with ``out_t``) to write into, or None.
        x_blocks: x is (nb, M, P) block-major (block k holds input features k * P .. k * P + P - 1), the
            layout ``out_blocks`` returns: a Monarch projection fed by another one whose output blocks are
            its input blocks reads that result as it was written.
        out_blocks: return (nb, M, S) block-major (needs out_features = nb * S, no ``out_t`` / ``out``):
            the result stays as the second GEMM wrote it, without the copy that interleaves the blocks.
            The M rows run as one chunk: pass a cache-sized group of rows (``layers.chained`` does).

    Returns:
        (M, out_features), or (out_features, M) with ``out_t``, or (nb, M, S) with ``out_blocks``; ``out``
        when given, else a new tensor.
    """
    nb, mid, p = w1.shape
    s = w2.shape[1]
    rho = mid // nb
    m = x.shape[1] if (x_t or x_blocks) else x.shape[0]
    if out_blocks and (out_t or out is not None or (out_features or nb * s) != nb * s):
        raise ValueError("monarch_linear: out_blocks needs all nb * S outputs, and neither out_t nor out")
    dest = out
    out = nb * s if out_features is None else out_features
    if bias is not None and out < nb * s:
        bias = torch.nn.functional.pad(bias, (0, nb * s - out))
    if 0 < m <= FEW_ROWS and not out_blocks:
        if x_blocks:
            x, x_t = x.transpose(0, 1).reshape(m, nb * p), False              # (m, nb * P), a few rows
        return _few_rows_out(x.t() if x_t else x, w1, w2, bias, out, activation, dest, out_t)
    if out_blocks:
        y = torch.empty(nb, m, s, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((out, m) if out_t else (m, out), dtype=x.dtype, device=x.device) if dest is None else dest
    if m == 0:
        return y
    r = m if out_blocks else min(chunk_rows(m, nb * max(mid, s)), m)
    # Flat buffers, so a short last chunk gets contiguous views of its own size.
    h = torch.empty(nb * r * mid, dtype=x.dtype, device=x.device)
    hp = torch.empty(nb * r * mid, dtype=x.dtype, device=x.device)
    yb = None if out_blocks else torch.empty(nb * r * s, dtype=x.dtype, device=x.device)
    b = None if bias is None else (bias.view(nb, s, 1) if out_t else bias.view(nb, 1, s))   # over rows
    # Input blocks as (nb_k, P, M) operands, read in place: BLAS takes either orientation.
    xb = x.transpose(1, 2) if x_blocks else x.view(nb, p, m) if x_t else x.view(m, nb, p).permute(1, 2, 0)
    for start in range(0, m, r):
        stop = min(start + r, m)
        n = stop - start
        # The intermediate is kept tokens-last, (.., rho, n): the stride permutation then moves runs
        # of n values instead of runs of rho (3 floats at H = 768, nb = 16, where it dominated).
        hc = h[: nb * n * mid].view(nb, mid, n)                               # (nb_k, nb_l * rho, n)
        torch.bmm(w1, xb[:, :, start:stop], out=hc)
        hpc = hp[: nb * n * mid].view(nb, nb, rho, n)                         # (nb_l, nb_k, rho, n)
        hpc.copy_(hc.view(nb, nb, rho, n).transpose(0, 1))                    # stride permutation P1
        hpc = hpc.view(nb, mid, n)                                            # (nb_l, nb_k * rho, n)
        if out_t:
            ybc = yb[: nb * n * s].view(nb, s, n)                             # (nb_l, S, n)
            a, c = w2, hpc                                                    # y^T = w2 @ h
        else:
            # (nb_l, n, S): straight into its final place with out_blocks, else a chunk buffer.
            ybc = y[:, start:stop] if out_blocks else yb[: nb * n * s].view(nb, n, s)
            a, c = hpc.transpose(1, 2), w2.transpose(1, 2)                    # y = h^T @ w2^T
        if b is None:
            torch.bmm(a, c, out=ybc)
        else:
            torch.baddbmm(b, a, c, out=ybc)
        if activation is not None:
            activation(ybc)
        if not out_blocks:
            _place(ybc, y[:, start:stop] if out_t else y[start:stop], out_t)
    return y


def _few_rows_out(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None, out: int,
                  activation, dest: torch.Tensor | None, out_t: bool) -> torch.Tensor:
    """:func:`monarch_linear`'s result for a few rows x (m, nb * P): (m, out), (out, m) with ``out_t``, or ``dest``."""
    rows = _few_rows(x, w1, w2, bias)                                          # (m, nb * S), a fresh tensor
    if activation is not None:
        activation(rows)
    rows = rows[:, :out]                                                       # (m, out)
    if dest is not None:
        return dest.copy_(rows)
    return (rows.t() if out_t else rows).contiguous()


def _few_rows(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(m, nb * S) = Monarch(w1, w2) @ rows x (m, nb * P) (+ bias (nb * S,)), both products rows-first."""
    nb, mid, p = w1.shape
    s, rho, m = w2.shape[1], mid // nb, x.shape[0]
    h = torch.bmm(x.reshape(m, nb, p).transpose(0, 1), w1.transpose(1, 2))    # (nb_k, m, nb_l * rho)
    h = h.view(nb, m, nb, rho).permute(2, 1, 0, 3).reshape(nb, m, mid)       # P1: (nb_l, m, nb_k * rho)
    if bias is None:
        yb = torch.bmm(h, w2.transpose(1, 2))                                   # (nb_l, m, S)
    else:
        yb = torch.baddbmm(bias.view(nb, 1, s), h, w2.transpose(1, 2))
    return yb.transpose(0, 1).reshape(m, nb * s)


def _place(ybc: torch.Tensor, dest: torch.Tensor, out_t: bool) -> None:
    """Copy a chunk's block-major result into its place in the output, cropping the last block.

    ybc: (nb, S, n) with ``out_t`` else (nb, n, S).  dest: (out, n) with ``out_t`` else (n, out).
    """
    nb, s, n = ybc.shape if out_t else (ybc.shape[0], ybc.shape[2], ybc.shape[1])
    out = dest.shape[0] if out_t else dest.shape[1]
    whole = out // s                                                          # output blocks kept entire
    if out_t:
        dest[: whole * s].view(whole, s, n).copy_(ybc[:whole])
        if whole < nb:
            dest[whole * s:].copy_(ybc[whole, : out - whole * s])             # cropped last block
    else:
        dest[:, : whole * s].view(n, whole, s).copy_(ybc[:whole].transpose(0, 1))
        if whole < nb:
            dest[:, whole * s:].copy_(ybc[whole, :, : out - whole * s])
