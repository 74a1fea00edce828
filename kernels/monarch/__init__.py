"""Fused order-2 Monarch multiply (Triton) and its PyTorch reference."""

from .reference import monarch_matmul, monarch_to_dense

__all__ = ["monarch_matmul", "monarch_to_dense"]  # monarch_matmul_triton loads lazily, below


def __getattr__(name):
    # The Triton kernel loads on first use: importing triton (and reading TRITON_INTERPRET) waits until then.
    if name == "monarch_matmul_triton":
        from .triton_monarch import monarch_matmul_triton
        return monarch_matmul_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
