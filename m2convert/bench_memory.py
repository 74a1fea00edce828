"""Live-tensor peak of a call: the most bytes allocated and in use at once, polled after every op.

The resident-set peak (``m2convert.bench.measure_peak_mb``) is what the process takes from the system; it
also holds freed blocks the C allocator keeps for reuse. This counts what is in use: glibc's ``mallinfo2``
(heap in use plus mapped blocks) read after every aten op, from a ``TorchDispatchMode``; it is what the
plan's memory prediction (``RewritePlan.memory``) predicts. None where glibc's ``mallinfo2`` is missing.

Example:
    >>> mb = live_peak_mb(lambda: torch.ones(1 << 20).sum())
    >>> mb is None or mb >= 4                                # a 4 MiB tensor was alive
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    path = ctypes.util.find_library("c")
    lib = ctypes.CDLL(path) if path else None
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    lib.mallinfo2.restype = _MallInfo2
    return lib


class _LivePeak(TorchDispatchMode):
    """Largest malloc'd-and-in-use byte count seen after any op (glibc ``mallinfo2``: heap + mapped)."""

    def __init__(self, libc):
        super().__init__()
        self.libc, self.peak = libc, 0
        self.base = self.now()

    def now(self) -> int:
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.now() - self.base)
        return out


def live_peak_mb(fn) -> float | None:
    """MiB of tensors (and other malloc'd memory) alive at once during ``fn()``; None without glibc."""
    libc = _libc()
    if libc is None:
        return None
    libc.malloc_trim(0)
    with _LivePeak(libc) as mode:
        fn()
    return mode.peak / 2**20
