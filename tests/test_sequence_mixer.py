"""M2SequenceMixer: causality, prefix and padding invariance, gradients, modes, bad input."""

import pytest
import torch

import m2convert as m2
from m2convert.errors import ConfigError, ShapeError
from m2convert.layers import ImplicitFilter
from m2convert.layers.cost import B, N

H, L = 96, 63
CAUSAL = ["causal", "causal-monarch"]


def mixer(mode, seed=0, **kw):
    torch.manual_seed(seed)
    m = m2.M2SequenceMixer(H, mode=mode, **kw).double()
    with torch.no_grad():  # non-trivial filters and gates so leaks would show
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("mode", CAUSAL)
@pytest.mark.parametrize("t", [1, 31, 62])
def test_future_tokens_do_not_move_the_past(mode, t):
    m = mixer(mode)
    x = torch.randn(2, L, H, dtype=torch.float64)
    x2 = x.clone()
    x2[:, t:] += torch.randn_like(x2[:, t:]) * 10
    y, y2 = m(x), m(x2)
    leak = ((y[:, :t] - y2[:, :t]).abs().max() / y[:, :t].abs().max()).item()
    assert leak < 1e-12, leak
    assert (y[:, t:] - y2[:, t:]).abs().max() > 1e-3  # the perturbation does reach the future


def test_bidirectional_mixer_sees_the_future():
    m = mixer("bidirectional")
    x = torch.randn(1, L, H, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (m(x)[:, 0] - m(x2)[:, 0]).abs().max() > 1e-8


@pytest.mark.parametrize("mode", CAUSAL)
def test_appending_tokens_keeps_the_prefix(mode):
    m = mixer(mode)
    x = torch.randn(2, 100, H, dtype=torch.float64)
    short, long = m(x[:, :L]), m(x)
    assert ((short - long[:, :L]).abs().max() / short.abs().max()).item() < 1e-12


def test_filter_taps_depend_on_offset_only():
    torch.manual_seed(0)
    f = ImplicitFilter(8, heads=2).double()
    torch.testing.assert_close(f(17), f(300)[..., :17], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "causal-monarch"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance(mode, side):
    m = mixer(mode)
    lens = [L, 80, 101]
    seqs = [torch.randn(n, H, dtype=torch.float64) for n in lens]
    alone = [m(s[None])[0] for s in seqs]
    n_max = max(lens)
    x = torch.zeros(len(lens), n_max, H, dtype=torch.float64)
    mask = torch.zeros(len(lens), n_max, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(n_max - len(s), n_max)
        x[i, sl], mask[i, sl] = s, 1
        x[i, mask[i] == 0] = 3.0  # garbage in padded positions must not matter
    batched = m(x, mask)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(n_max - len(s), n_max)
        torch.testing.assert_close(batched[i, sl], alone[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "causal-monarch"])
def test_gradients_flow_and_are_finite(mode):
    torch.manual_seed(0)
    m = m2.M2SequenceMixer(H, mode=mode)
    x = torch.randn(2, L, H, requires_grad=True)
    mask = torch.ones(2, L)
    mask[1, 50:] = 0
    m(x, mask).square().mean().backward()
    for name, p in [("x", x), *m.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0 and m.filter.mlp[0].weight.grad.abs().sum() > 0


def test_causal_modes_share_parameters_and_function():
    a = mixer("causal")
    b = m2.M2SequenceMixer(H, mode="causal-monarch").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, L, H, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=1e-9, atol=1e-9)


def test_seed_projections_copies_weights():
    m = m2.M2SequenceMixer(8, residual_conv=False)
    ws = [(torch.randn(8, 8), torch.randn(8)) for _ in range(4)]
    m.seed_projections(*ws)
    torch.testing.assert_close(m.in_proj.weight, torch.cat([w for w, _ in ws[:3]]))
    torch.testing.assert_close(m.out_proj.bias, ws[3][1])
    with pytest.raises(ShapeError, match="k weight"):
        m.seed_projections(ws[0], (torch.randn(4, 8), None), ws[2], ws[3])


def test_flops_are_subquadratic_symbolic():
    m = m2.M2SequenceMixer(H, mode="bidirectional")
    expr = m.flops()
    assert N in expr.free_symbols and B in expr.free_symbols
    growth = float(m.flops(8192, 1)) / float(m.flops(1024, 1))
    assert growth < 8 * 1.5  # O(N log N), far from the 64x of attention
    assert m.flops(1024, 1) > 0


@pytest.mark.parametrize("kwargs,word", [
    ({"mode": "sideways"}, "mode"), ({"filter_order": 0}, "filter_order"),
    ({"filter_emb_dim": 4}, "filter_emb_dim"), ({"filter_emb_dim": 1}, "filter_emb_dim"), ({"d_model": 0}, "d_model"),
])
def test_bad_configuration(kwargs, word):
    args = {"d_model": 8, **kwargs}
    with pytest.raises(m2.M2Error, match=word):
        m2.M2SequenceMixer(**args)


def test_bad_inputs():
    m = m2.M2SequenceMixer(8)
    with pytest.raises(ShapeError, match="mask must have shape"):
        m(torch.randn(2, 5, 8), torch.ones(2, 6))
    with pytest.raises(ShapeError, match="N = 0"):
        m(torch.randn(2, 0, 8))
    with pytest.raises(ShapeError, match=r"\(B, N, 8\)"):
        m(torch.randn(2, 5, 7))
    assert issubclass(ConfigError, m2.M2Error)


def test_monarch_dft_factors_survive_export():
    # Factors first built while tracing must not leak traced tensors into later eager calls.
    from m2convert.kernels.fftconv.monarch_dft import _dft_factors_f64

    _dft_factors_f64.cache_clear()
    m = m2.M2SequenceMixer(8, mode="causal-monarch").eval()
    x = torch.randn(1, 11, 8)
    ep = torch.export.export(m, (x,), strict=False)
    eager = m(x)
    assert type(eager) is torch.Tensor
    torch.testing.assert_close(ep.module()(x), eager, rtol=1e-5, atol=1e-5)
