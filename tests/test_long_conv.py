"""Long-convolution references: FFT vs direct sums, and the Monarch DFT vs torch.fft."""

import pytest
import torch

from m2convert.kernels.fftconv import direct_long_conv, fft_long_conv, gated_long_conv, monarch_dft, monarch_long_conv
from m2convert.kernels.fftconv.monarch_dft import split_length

f64 = torch.float64


@pytest.mark.parametrize("n", [1, 2, 7, 63, 64, 97])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_conv_equals_direct_sum(n, bidirectional):
    torch.manual_seed(n)
    u, k = torch.randn(2, 5, n, dtype=f64), torch.randn(5, n, dtype=f64)
    k_rev = torch.randn(5, n, dtype=f64) if bidirectional else None
    D = torch.randn(5, dtype=f64)
    torch.testing.assert_close(fft_long_conv(u, k, k_rev, D), direct_long_conv(u, k, k_rev, D), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 6, 63, 98, 128])
def test_monarch_dft_equals_torch_fft(n):
    torch.manual_seed(n)
    x = torch.randn(3, 2 * n, dtype=torch.complex128)
    torch.testing.assert_close(monarch_dft(x), torch.fft.fft(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(monarch_dft(x, inverse=True), torch.fft.ifft(x), rtol=1e-6, atol=1e-6)


def test_split_length_factors():
    assert split_length(2 * 63) == (9, 14)
    assert split_length(1024) == (32, 32)
    assert split_length(2 * 97) == (2, 97)


@pytest.mark.parametrize("n", [5, 63])
def test_monarch_conv_equals_fft_conv(n):
    torch.manual_seed(0)
    u, k, D = torch.randn(2, 4, n, dtype=f64), torch.randn(4, n, dtype=f64), torch.randn(4, dtype=f64)
    torch.testing.assert_close(monarch_long_conv(u, k, D), fft_long_conv(u, k, None, D), rtol=1e-10, atol=1e-10)


def test_gated_conv_definition():
    torch.manual_seed(1)
    v, x1, x2 = (torch.randn(2, 3, 9, dtype=f64) for _ in range(3))
    k, k_rev, D = torch.randn(3, 9, dtype=f64), torch.randn(3, 9, dtype=f64), torch.randn(3, dtype=f64)
    expected = x2 * direct_long_conv(v * x1, k, k_rev, D)
    torch.testing.assert_close(gated_long_conv(v, x1, x2, k, k_rev, D), expected)
