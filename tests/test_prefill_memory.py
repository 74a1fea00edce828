"""Prefill memory: one-FFT filter responses, filters made per channel block within a bounded tap buffer,
the shared filter-cache budget, and MonarchLinear's fused activation, each equal to its reference."""

import pytest
import torch

import m2convert as m2
from m2convert.errors import ConfigError
from m2convert.kernels.fftconv import cpu as conv_cpu
from m2convert.kernels.fftconv.reference import fft_long_conv
from m2convert.kernels.monarch import cpu as monarch_cpu
from m2convert.layers import ImplicitFilter
from m2convert.layers import monarch as monarch_layer
from m2convert.layers import sequence as sequence_layer
from m2convert.layers import spectra as spectra_layer

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("n", [1, 2, 7, 64, 101])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_one_fft_spectrum_equals_two_transforms(n, bidirectional):
    torch.manual_seed(n)
    k, k_rev = torch.randn(2, 5, n, dtype=torch.float64).unbind(0)
    n_fft = conv_cpu.fft_size(n)
    expected = torch.fft.rfft(k, n=n_fft)
    if bidirectional:
        expected = expected + torch.fft.rfft(k_rev, n=n_fft).conj() - k_rev[:, :1]
    got = conv_cpu.conv_spectrum(k, k_rev if bidirectional else None, n_fft)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The response convolves like the reference (2N transform, two spectra).
    u = torch.randn(3, 5, n, dtype=torch.float64)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n_fft) * got, n=n_fft)[..., :n]
    torch.testing.assert_close(y, fft_long_conv(u, k, k_rev if bidirectional else None), rtol=1e-10, atol=1e-10)


def reference_mixer(m, x, mask=None):
    with torch.no_grad(), monarch_layer.fast_paths(mixer=False, monarch=False):
        return m(x, mask)


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filters_made_per_block_equal_the_reference(monkeypatch, one_thread, mode, residual, dtype):
    torch.manual_seed(1)
    h, n = 24, 77                                                     # odd N, blocks that do not divide H
    m = m2.M2SequenceMixer(h, mode=mode, residual_conv=residual).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, n, h, dtype=dtype)
    mask = torch.ones(2, n, dtype=dtype)
    mask[1, 60:] = 0                                                  # a padded second sequence
    expected = reference_mixer(m, x, mask)
    groups = 2 if residual else 1
    # Five channels per convolution block, taps made three channels at a time: both chunkings exercised.
    monkeypatch.setattr(conv_cpu, "BLOCK_BYTES", groups * 2 * (conv_cpu.fft_size(n) // 2 + 1) * 8 * 5)
    monkeypatch.setattr(spectra_layer, "TAP_BYTES", 3 * 2 * n * dtype.itemsize)
    # In-projection rows made inside the core two blocks at a time: groups [0, 10), [10, 20), [20, 24).
    monkeypatch.setattr(conv_cpu, "PROJECT_CHANNELS", 8)
    monkeypatch.setattr(conv_cpu, "PROJECT_BYTES", 0)
    monkeypatch.setattr(m, "filter_cache_bytes", 0)
    with torch.no_grad():
        got = m(x, mask)
    assert m._spectrum_cache is None
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_tap_buffer_stays_within_its_byte_bound(monkeypatch):
    torch.manual_seed(2)
    m = m2.M2SequenceMixer(40).double().eval()
    widths = []
    real = ImplicitFilter.taps

    def taps(self, trunk, start=0, stop=None):
        out = real(self, trunk, start, stop)
        widths.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(ImplicitFilter, "taps", taps)
    monkeypatch.setattr(spectra_layer, "TAP_BYTES", 2 * 300 * 8 * 12)        # 12 channels of 2 heads, N = 300
    block = m.spectrum_blocks(300, torch.float64)
    with torch.no_grad():
        for start in range(0, 40, 4):
            block(start, min(start + 4, 40))
    assert widths and max(widths) <= spectra_layer.TAP_BYTES
    assert len(widths) == 2 * 4                                       # 40 channels, 12 per GEMM, 2 filters


def test_shared_budget_keeps_the_first_mixers_and_matches_uncached(monkeypatch):
    torch.manual_seed(3)
    mixers = [m2.M2SequenceMixer(16).double().eval() for _ in range(4)]
    x = torch.randn(1, 50, 16, dtype=torch.float64)
    entry = 2 * 16 * (conv_cpu.fft_size(50) // 2 + 1) * 16
    with torch.no_grad():
        for m in mixers:
            m.filter_cache_total_bytes = 0
        uncached = [m(x) for m in mixers]
        held = sequence_layer._cached_bytes()
        for m in mixers:
            m.filter_cache_total_bytes = held + 3 * entry - 1             # room for two entries, not three
        cached = [m(x) for m in mixers]
    assert [m._spectrum_cache is not None for m in mixers] == [True, True, False, False]
    assert sequence_layer._cached_bytes() - held == 2 * entry
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", sorted(monarch_layer.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,nblocks", [((48, 96), 4), ((37, 53), 3)])
def test_fused_activation_equals_activation_after_the_layer(monkeypatch, one_thread, activation, dtype, shape,
                                                            nblocks):
    torch.manual_seed(4)
    plain = m2.MonarchLinear(*shape, nblocks=nblocks).to(dtype)
    fused = m2.MonarchLinear(*shape, nblocks=nblocks, activation=activation).to(dtype)
    fused.load_state_dict(plain.state_dict())
    act = monarch_layer.ACTIVATIONS[activation].apply
    x = torch.randn(2, 45, shape[0], dtype=dtype)                      # 90 rows: chunks of 8, last short
    monkeypatch.setattr(monarch_cpu, "CHUNK_ELEMENTS", 8 * nblocks * 2 * max(fused.w1.shape[1], fused.w2.shape[1]))
    monkeypatch.setattr(monarch_cpu, "MIN_CHUNK_ROWS", 8)
    with torch.no_grad():
        expected = act(plain(x))
        got = fused(x)
        channels_first = fused.matmul(x.reshape(-1, shape[0]).t().contiguous(), x_channels_first=True,
                                      out_channels_first=True)
        with monarch_layer.fast_paths(monarch=False):
            reference = fused(x)
    for y in (got, reference, channels_first.t().reshape(got.shape)):
        torch.testing.assert_close(y, expected, rtol=TOL[dtype], atol=TOL[dtype])
    y = fused(x)                                                      # with autograd: the reference path
    y.sum().backward()
    assert fused.w1.grad is not None


def test_unknown_activation_is_refused():
    with pytest.raises(ConfigError, match="activation"):
        m2.MonarchLinear(8, 8, nblocks=2, activation="softmax")
