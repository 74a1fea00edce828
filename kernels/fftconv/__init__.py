"""Gated long convolution: its O(N^2) definition (direct_long_conv), the torch.fft and Monarch-DFT
references, and the fused Triton kernel."""

from .monarch_dft import monarch_dft, monarch_long_conv
from .reference import direct_long_conv, fft_long_conv, gated_long_conv

# gated_long_conv_triton loads lazily, below.
__all__ = ["direct_long_conv", "fft_long_conv", "gated_long_conv", "monarch_dft", "monarch_long_conv"]


def __getattr__(name):
    # The Triton kernel loads on first use: importing triton (and reading TRITON_INTERPRET) waits until then.
    if name == "gated_long_conv_triton":
        from .triton_fftconv import gated_long_conv_triton
        return gated_long_conv_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
