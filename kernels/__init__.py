"""Kernels: fused Triton implementations beside pure-PyTorch references with the same signatures.

This package imports only torch (and triton, lazily, where a fused kernel is asked for).
"""
