"""Kernels: fused Triton implementations beside pure-PyTorch references with the same signatures.

This package imports only torch (and triton, lazily, where a fused kernel is asked for).
"""

if __name__ != "m2convert.kernels":        # loaded from the repository root as `kernels`: see _toplevel.py
    from ._toplevel import hand_over
    hand_over(__name__, __file__)
