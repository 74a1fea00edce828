"""Symbolic cost formulas (sympy) shared by the layers and the rewrite plan.

Every formula is forward FLOPs (a multiply-add counts 2) in the symbols ``N`` (tokens per sequence)
and ``B`` (batch), so the plan can print how cost grows and evaluate it at any N.

Example:
    >>> from m2convert.layers.cost import N, B, attention_flops, evaluate
    >>> evaluate(attention_flops(384), seq_len=512)
    402653184
"""

from __future__ import annotations

import sympy

N, B = sympy.symbols("N B", positive=True, integer=True)


def linear_flops(in_features: int, out_features: int, bias: bool = True) -> sympy.Expr:
    """A dense linear layer applied to every token: 2 * in * out multiply-adds (+ out for bias)."""
    return B * N * (2 * in_features * out_features + (out_features if bias else 0))


def attention_flops(hidden: int, keys: int | None = None) -> sympy.Expr:
    """The core of softmax attention (scores Q K^T and the weighted sum of V): O(N^2), or O(N keys) when
    each query sees at most ``keys`` keys (a sliding window).

    Example:
        >>> attention_flops(64, keys=128).subs({B: 1, N: 1024}) / attention_flops(64).subs({B: 1, N: 1024})
        1/8
    """
    if keys is None:
        return B * 4 * N**2 * hidden
    return B * 4 * N * sympy.Min(N, keys) * hidden


def fft_conv_flops(channels: int, bidirectional: bool = False) -> sympy.Expr:
    """One long convolution per channel through real FFTs of size 2N, O(N log N).

    Counts the forward transform of the input, the filter transform(s) and the inverse transform at
    the usual 2.5 n log2 n FLOPs of a real FFT of size n, plus the pointwise complex product.
    """
    n_fft = 2 * N
    transforms = 3 + (1 if bidirectional else 0)
    one_fft = sympy.Rational(5, 2) * n_fft * sympy.log(n_fft, 2)
    # Filter FFTs do not scale with the batch; signal FFTs and the pointwise product do.
    signal = B * channels * (2 * one_fft + 6 * (N + 1))
    filters = channels * (transforms - 2) * one_fft
    return signal + filters


def evaluate(expr: sympy.Expr, seq_len: int, batch: int = 1) -> int:
    """Evaluate a cost formula at a given sequence length and batch; rounds to an integer."""
    return int(round(float(sympy.sympify(expr).subs({N: seq_len, B: batch}))))


def monarch_conv_flops(channels: int) -> sympy.Expr:
    """One causal long convolution by Monarch-DFT evaluation/interpolation at n = 2N points.

    Each complex DFT of length n = n1 * n2 (n1 ~ n2 ~ sqrt(n)) is two block GEMMs, 8 n (n1 + n2)
    real FLOPs, plus 6 n for the twiddles: O(N^(3/2)); three transforms (signal, filter, inverse).
    """
    n = 2 * N
    one = 8 * n * 2 * sympy.sqrt(n) + 6 * n
    return B * channels * (2 * one + 6 * n) + channels * one


def substitute(expr: sympy.Expr, seq_len=None, batch=None) -> sympy.Expr:
    """Fix N and/or B in a formula; a fully numeric result is simplified to a number."""
    fixed = {sym: val for sym, val in ((N, seq_len), (B, batch)) if val is not None}
    out = expr.subs(fixed)
    return sympy.simplify(out) if not out.free_symbols else out
