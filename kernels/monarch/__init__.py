"""Fused order-2 Monarch multiply (Triton) and its PyTorch reference."""

from .reference import monarch_matmul, monarch_to_dense

__all__ = ["monarch_matmul", "monarch_to_dense"]
