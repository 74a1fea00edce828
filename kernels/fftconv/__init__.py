"""Gated long convolution: torch.fft and Monarch-DFT references, and the fused Triton kernel."""

from .monarch_dft import monarch_dft, monarch_long_conv
from .reference import direct_long_conv, fft_long_conv, gated_long_conv

__all__ = ["direct_long_conv", "fft_long_conv", "gated_long_conv", "monarch_dft", "monarch_long_conv"]
