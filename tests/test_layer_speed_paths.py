"""CPU fast paths of the M2 layers: equal to the references, taken only when allowed, caches invalidated."""

import pytest
import torch

import m2convert as m2
from m2convert.kernels.fftconv import cpu as conv_cpu
from m2convert.kernels.monarch import cpu as monarch_cpu
from m2convert.kernels.monarch.reference import monarch_matmul
from m2convert.layers import ImplicitFilter
from m2convert.layers import monarch as monarch_layer
from m2convert.layers import sequence as sequence_layer
from m2convert.layers import spectra as spectra_layer

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def spy(monkeypatch, module, name):
    """Count calls of ``module.name`` (still running it)."""
    calls = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape,nblocks,rank", [((96, 96), 4, 1), ((96, 80), 4, 2), ((37, 53), 3, 1),
                                                 ((53, 37), 4, 1), ((256, 256), 16, 1), ((64, 256), 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_monarch_fast_path_equals_reference(monkeypatch, shape, nblocks, rank, dtype, bias):
    torch.manual_seed(0)
    layer = m2.MonarchLinear(*shape, nblocks=nblocks, rank=rank, bias=bias).to(dtype)
    # Small chunks: several chunks per call and a short last one.
    monkeypatch.setattr(monarch_cpu, "CHUNK_ELEMENTS", 64 * shape[1])
    monkeypatch.setattr(monarch_cpu, "MIN_CHUNK_ROWS", 16)
    calls = spy(monkeypatch, monarch_layer, "monarch_linear")
    x = torch.randn(3, 97, shape[0], dtype=dtype)
    expected = layer(x)                                              # grad enabled: the reference
    assert not calls
    with torch.no_grad():
        fast = layer(x)
    assert calls and fast.shape == expected.shape and fast.is_contiguous()
    assert rel(fast, expected) < TOL[dtype]
    with torch.inference_mode():
        torch.testing.assert_close(layer(x[0, :5]), expected[0, :5], rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("rows", [0, 1, 255, 256, 257, 1000])
def test_monarch_kernel_chunk_boundaries(rows):
    torch.manual_seed(1)
    w1, w2, b = torch.randn(4, 64, 64), torch.randn(4, 48, 64), torch.randn(192)
    x = torch.randn(rows, 256)
    out = monarch_cpu.monarch_linear(x, w1, w2, b)
    assert out.shape == (rows, 192)
    if rows:
        assert rel(out, monarch_matmul(x, w1, w2) + b) < 1e-5


@pytest.mark.parametrize("shape,nblocks", [((96, 80), 4), ((37, 53), 3), ((256, 256), 16)])
@pytest.mark.parametrize("x_t,out_t", [(False, False), (True, False), (False, True), (True, True)])
def test_monarch_matmul_layouts(monkeypatch, shape, nblocks, x_t, out_t):
    torch.manual_seed(2)
    layer = m2.MonarchLinear(*shape, nblocks=nblocks).double()
    monkeypatch.setattr(monarch_cpu, "CHUNK_ELEMENTS", 64 * shape[1])
    monkeypatch.setattr(monarch_cpu, "MIN_CHUNK_ROWS", 16)
    x = torch.randn(201, shape[0], dtype=torch.float64)
    expected = layer(x)
    with torch.no_grad():
        y = layer.matmul(x.t().contiguous() if x_t else x, x_channels_first=x_t, out_channels_first=out_t)
    assert y.is_contiguous()
    torch.testing.assert_close(y.t() if out_t else y, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(m2.M2Error, match="features"):
        layer.matmul(x, x_channels_first=True)


def test_monarch_training_and_tracing_keep_the_reference(monkeypatch):
    layer = m2.MonarchLinear(32, 48, nblocks=4)
    calls = spy(monkeypatch, monarch_layer, "monarch_linear")
    x = torch.randn(5, 32)
    layer(x).sum().backward()                                         # gradients: reference
    assert not calls and layer.w1.grad is not None
    with torch.no_grad():
        program = torch.export.export(layer, (x,), strict=False)
    assert not calls                                                  # the lowering pass sees the bmm chain
    assert any("bmm" in str(n.target) for n in program.graph.nodes)
    layer.requires_grad_(False)
    xg = torch.randn(5, 32, requires_grad=True)
    layer(xg).sum().backward()                                        # input gradient: reference
    assert not calls and xg.grad is not None


def mixer(mode="bidirectional", residual=True, dtype=torch.float64, h=40, seed=0):
    torch.manual_seed(seed)
    m = m2.M2SequenceMixer(h, mode=mode, residual_conv=residual).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 63, 100])
def test_mixer_fast_path_equals_reference(monkeypatch, mode, residual, dtype, n):
    m = mixer(mode, residual, dtype)
    # A few channels per block: several blocks and a short last one.
    monkeypatch.setattr(conv_cpu, "BLOCK_BYTES", 3 * 2 * (conv_cpu.fft_size(n) // 2 + 1) * 8 * 7)
    calls = spy(monkeypatch, sequence_layer, "mixer_core")
    x = torch.randn(3, n, 40, dtype=dtype)
    mask = torch.ones(3, n)
    mask[1, (n + 1) // 2:] = 0
    mask[2, : n // 3] = 0
    for mk in (None, mask):
        expected = m(x, mk)                                           # grad enabled: the reference
        assert not calls
        with torch.no_grad():
            fast = m(x, mk)
        assert calls
        assert rel(fast, expected) < TOL[dtype]
        calls.clear()


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cached", [False, True])
def test_mixer_fast_path_stops_the_filters_at_their_support(monkeypatch, mode, dtype, cached):
    torch.manual_seed(3)
    m = m2.M2SequenceMixer(24, mode=mode, filter_scale=8.0).to(dtype).eval()   # support ~60 / ~110 taps
    m.filter_cache_bytes = m.filter_cache_bytes if cached else 0
    n = 700
    each = m.channel_taps(n, dtype)
    taps = max(each)
    assert taps == m.filter.support(spectra_layer.TAIL_TOL[dtype]) < n // 4 and min(each) < taps / 3
    monkeypatch.setattr(conv_cpu, "BLOCK_BYTES", 2 * 2 * (conv_cpu.fft_size(n, taps) // 2 + 1) * 8 * 5)
    sizes, trunks = [], spy(monkeypatch, ImplicitFilter, "trunk")
    real = conv_cpu._conv_block
    monkeypatch.setattr(conv_cpu, "_conv_block", lambda sc, buf, *a: sizes.append(buf.shape[-1]) or real(sc, buf, *a))
    x = torch.randn(2, n, 24, dtype=dtype)
    expected = m(x)                                                   # grad enabled: every tap
    with torch.no_grad():
        fast = m(x)
    # Five channels a block, each made at the length its own taps need (the cached spectrum: the longest).
    if cached:
        assert m._spectrum_cache is not None and sizes == [conv_cpu.fft_size(n, taps)] * 5
    else:
        assert sizes == [conv_cpu.fft_size(n, max(each[c:c + 5])) for c in range(0, 24, 5)]
    assert max(sizes) == conv_cpu.fft_size(n, taps) < conv_cpu.fft_size(n) and (cached or min(sizes) < max(sizes))
    assert rel(fast, expected) < TOL[dtype]
    assert len(trunks) == 2 + 2                                       # reference, then the fast path's two filters


def test_filter_support_is_none_without_a_bound():
    f = ImplicitFilter(8, scale=8.0)
    assert f.support() is not None and f.support(1e-18) > f.support(1e-9)
    f.decay_rates[0] = 0.0                                            # a channel that never decays
    assert f.support() is None
    g = ImplicitFilter(8)
    g.mlp[-2] = torch.nn.Identity()                                  # the trunk no longer ends bounded
    assert g.support() is None
    m = m2.M2SequenceMixer(8)
    m.filter.decay_rates.fill_(-1.0)
    assert m.channel_taps(10_000) == [10_000] * 8


@pytest.mark.parametrize("nblocks", [4, 3])
def test_mixer_fast_path_with_monarch_projections(nblocks):
    m = mixer(h=48)
    m.in_proj = m2.MonarchLinear.from_dense(m.in_proj, nblocks=nblocks)
    m.out_proj = m2.MonarchLinear.from_dense(m.out_proj, nblocks=nblocks)
    x = torch.randn(3, 37, 48, dtype=torch.float64)
    mask = torch.ones(3, 37)
    mask[0, 30:] = 0
    expected = m(x, mask)
    with torch.inference_mode():
        assert rel(m(x, mask), expected) < 1e-10


def test_mixer_monarch_mode_and_training_use_the_reference(monkeypatch):
    calls = spy(monkeypatch, sequence_layer, "mixer_core")
    x = torch.randn(2, 30, 40, dtype=torch.float64)
    with torch.no_grad():
        mixer("causal-monarch")(x)
    mixer().train()(x).sum().backward()
    with torch.no_grad():
        torch.export.export(mixer(), (x,), strict=False)
    assert not calls


@pytest.mark.parametrize("n,taps", [(1, None), (2, None), (3, None), (7, None), (63, None), (64, None),
                                    (97, None), (509, None), (1000, None), (2048, 1703), (8192, 4300)])
def test_fft_size_is_the_smallest_smooth_multiple_of_eight(n, taps):
    def fits(k):
        if k < 8:
            return k & (k - 1) == 0                     # below 8: powers of two
        if k % 8:
            return False
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        return k == 1

    target = n + (n if taps is None else taps) - 1
    size = conv_cpu.fft_size(n, taps)
    assert size >= max(target, 2) and fits(size)
    assert not any(fits(k) for k in range(max(target, 2), size))


def test_filter_cache_reuses_and_invalidates(monkeypatch):
    m = mixer()
    x = torch.randn(2, 50, 40, dtype=torch.float64)
    calls = spy(monkeypatch, ImplicitFilter, "trunk")
    with torch.no_grad():
        first = m(x)
        assert len(calls) == 2                                        # gated + residual filter
        torch.testing.assert_close(m(x), first, rtol=0, atol=0)
        assert len(calls) == 2                                        # cached
        m(x[:, :40])
        assert len(calls) == 4                                        # another length
        m.filter.mlp[0].weight.add_(0.1)                              # in-place change (optimizer step)
        changed = m(x)
        assert len(calls) == 6
    torch.testing.assert_close(changed, m(x), rtol=1e-10, atol=1e-10)  # reference on the new weights
    assert (changed - first).abs().max() > 1e-6


def test_filter_cache_sees_loads_swaps_modes_and_casts(monkeypatch):
    m, other = mixer(seed=0), mixer(seed=1)
    x = torch.randn(1, 30, 40, dtype=torch.float64)
    calls = spy(monkeypatch, ImplicitFilter, "trunk")
    with torch.no_grad():
        m(x)
        m.load_state_dict(other.state_dict())                         # copy_ bumps versions
        torch.testing.assert_close(m(x), other(x), rtol=1e-12, atol=1e-12)
        m.residual_filter.decay_rates.data = m.residual_filter.decay_rates.data * 2   # new storage
        n_before = len(calls)
        m(x)
        assert len(calls) == n_before + 2
        m.train()
        assert m._spectrum_cache is None
        m(x)
        assert m._spectrum_cache is None                              # not cached in train mode
        m.eval()
        m(x)
        assert m._spectrum_cache is not None
        m.float()
        assert m._spectrum_cache is None
        assert m(x.float()).dtype == torch.float32
    with torch.enable_grad():
        m._spectrum_cache = None
        m(x.float())
        assert m._spectrum_cache is None                              # gradients on: nothing cached


def test_filter_cache_limit_and_off_switch(monkeypatch):
    m = mixer()
    x = torch.randn(2, 30, 40, dtype=torch.float64)
    expected = m(x)
    # Past the limit the responses are made block by block inside the convolution.
    monkeypatch.setattr(conv_cpu, "BLOCK_BYTES", 2 * 2 * (conv_cpu.fft_size(30) // 2 + 1) * 8 * 7)
    with torch.no_grad():
        m.filter_cache_bytes = 0
        assert rel(m(x), expected) < 1e-12
        assert m._spectrum_cache is None
        m.filter_cache_bytes = 2 * 40 * (conv_cpu.fft_size(30) // 2 + 1) * 16    # exactly the entry
        assert rel(m(x), expected) < 1e-12
        assert m._spectrum_cache is not None
        assert conv_cpu.fft_size(40) > conv_cpu.fft_size(30)
        m(torch.randn(1, 40, 40, dtype=torch.float64))                # larger than the limit: none kept
        assert m._spectrum_cache is None


def test_filter_cache_budget_is_shared_by_all_mixers(monkeypatch):
    mixers = [mixer(seed=s) for s in range(3)]
    x = torch.randn(1, 30, 40, dtype=torch.float64)
    entry = 2 * 40 * (conv_cpu.fft_size(30) // 2 + 1) * 16                   # one mixer's spectra, bytes
    with torch.no_grad():
        expected = [m(x) for m in mixers]
        for m in mixers:
            m._spectrum_cache = None
        held = sequence_layer._cached_bytes()                         # other live mixers' entries
        monkeypatch.setattr(m2.M2SequenceMixer, "filter_cache_total_bytes", held + 2 * entry)
        got = [m(x) for m in mixers]
        assert [m._spectrum_cache is not None for m in mixers] == [True, True, False]
        for a, b in zip(got, expected):
            assert rel(a, b) < 1e-12
        mixers[0](torch.randn(1, 50, 40, dtype=torch.float64))        # too large now: its old entry goes
        assert mixers[0]._spectrum_cache is None
        mixers[2](x)                                                  # and frees room for another mixer
        assert mixers[2]._spectrum_cache is not None


def test_filter_taps_by_block_equal_the_whole_filter():
    torch.manual_seed(3)
    f = ImplicitFilter(40, heads=2).double()
    whole = f(300)
    trunk = f.trunk(300)
    torch.testing.assert_close(torch.cat([f.taps(trunk, 0, 17), f.taps(trunk, 17, 40)], dim=1), whole,
                               rtol=1e-12, atol=1e-14)
    t = torch.arange(300, dtype=torch.float64) / f.scale
    exact = torch.exp(-f.decay_rates.double()[:, None] * t[None, :])
    torch.testing.assert_close(f.decay(300, dtype=torch.float64), exact, rtol=1e-14, atol=0)


def test_block_built_responses_equal_the_cached_spectrum():
    m = mixer()
    with torch.no_grad():
        n, n_fft = 70, conv_cpu.fft_size(70)
        full = m.filter_spectrum(n, n_fft, torch.float64)
        block = m.spectrum_blocks(n, torch.float64)
        parts = torch.cat([block(0, 9), block(9, 30), block(30, 40)], dim=1)
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)


def test_mixer_flops_follow_monarch_projections():
    m = m2.M2SequenceMixer(64)
    dense = m.flops(256, 1)
    m.in_proj = m2.MonarchLinear.from_dense(m.in_proj, nblocks=4)
    m.out_proj = m2.MonarchLinear.from_dense(m.out_proj, nblocks=4)
    assert m.flops(256, 1) < dense


def test_fast_paths_switch_each_path_and_restore(monkeypatch):
    from m2convert.layers.monarch import fast_paths
    torch.manual_seed(0)
    mixer = m2.M2SequenceMixer(32, filter_order=8, mode="bidirectional").eval()
    mixer.in_proj = m2.MonarchLinear.from_dense(mixer.in_proj, nblocks=4)
    x = torch.randn(2, 40, 32)
    monarch_calls = spy(monkeypatch, monarch_layer, "monarch_linear")
    mixer_calls = spy(monkeypatch, sequence_layer, "mixer_core")
    with torch.no_grad():
        fast = mixer(x)
        assert monarch_calls and mixer_calls
        monarch_calls.clear(), mixer_calls.clear()
        with fast_paths(mixer=False):
            no_mixer = mixer(x)
            assert monarch_calls and not mixer_calls            # the reference mixer, Monarch still fast
            monarch_calls.clear()
            with fast_paths(monarch=False):
                ref = mixer(x)
            assert not monarch_calls and not mixer_calls
        after = mixer(x)                                         # both switched back on
        assert monarch_calls and mixer_calls
    for out in (no_mixer, ref, after):
        assert rel(out, fast) < 1e-5
    with pytest.raises(m2.M2Error, match="unknown paths"):
        with fast_paths(fft=False):
            pass


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("x_t,out_t", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("decode_layout", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_monarch_few_rows_equal_the_reference(monkeypatch, rows, x_t, out_t, decode_layout, bias):
    # Up to FEW_ROWS rows take the rows-first products; 9 rows the chunked path. Either reads the factors
    # in both storage orders (lay_out_for_decode transposes the longer-output factors in memory).
    from m2convert.layers.gemv import lay_out_for_decode

    torch.manual_seed(rows)
    layer = m2.MonarchLinear(37, 70, nblocks=3, bias=bias).double()          # padded input, cropped output
    x = torch.randn(rows, 37, dtype=torch.float64)
    expected = layer(x)                                                         # grad enabled: the reference
    if decode_layout:
        assert lay_out_for_decode(layer) >= 1 and not layer.w2.is_contiguous()
    calls = spy(monkeypatch, monarch_cpu, "_few_rows")
    with torch.no_grad():
        y = layer.matmul(x.t().contiguous() if x_t else x, x_channels_first=x_t, out_channels_first=out_t)
    assert bool(calls) == (rows <= monarch_cpu.FEW_ROWS)
    assert y.is_contiguous() and y.shape == ((70, rows) if out_t else (rows, 70))
    torch.testing.assert_close(y.t() if out_t else y, expected, rtol=1e-10, atol=1e-10)
