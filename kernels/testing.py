"""Helpers shared by the kernel tests and the GPU benchmark: one error metric, NaN-poisoned allocation,
and loading a Triton kernel module under the interpreter."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch

from .numerics import rel_err  # noqa: F401  re-exported for the tests


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, name: str = "") -> None:
    """Fail unless ``rel_err(actual, expected) <= rtol``; NaN (an unwritten poisoned output) always fails.

    Example:
        >>> assert_close(torch.ones(3), torch.ones(3) + 1e-6)
    """
    n_bad = (~torch.isfinite(actual)).sum().item()
    if n_bad:
        raise AssertionError(f"{name}: {n_bad} of {actual.numel()} values are not finite (unwritten output?)")
    err = rel_err(actual, expected)
    if err > rtol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {rtol:.1e} (shape {tuple(actual.shape)})")


@contextlib.contextmanager
def poison_empty():
    """Within the block, torch.empty / torch.empty_like fill floating tensors with NaN.

    Kernels allocate outputs with torch.empty; poisoning them makes any element a kernel fails to
    write show up as NaN instead of as stale memory that happens to look right.

    Example:
        >>> with poison_empty():
        ...     torch.empty(3)
        tensor([nan, nan, nan])
    """
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *args, **kwargs: fill(empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: fill(empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def load_interpreted(module: str):
    """Import a kernel module with TRITON_INTERPRET=1, reloading it if it was decorated without.

    ``triton.jit`` reads TRITON_INTERPRET when a kernel is defined, so the variable must be set before
    the module's first import; a module another test imported earlier for a GPU is imported again.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module(module)
    if not getattr(mod, "_INTERPRET", False):
        mod = importlib.reload(sys.modules[module])
    return mod
