"""The one error metric that kernel tests, lowering checks and the GPU benchmark share."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (0 when both are all zero; inf on NaN).

    Example:
        >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
        0.2
    """
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    return err / scale if scale > 0 else err
