"""MonarchLinear: structure, projection optimality, odd sizes, bad arguments."""

import pytest
import sympy
import torch
from torch import nn

import m2convert as m2
from m2convert.errors import ConfigError, ShapeError
from m2convert.kernels.monarch import monarch_matmul, monarch_to_dense
from m2convert.layers.cost import B, N


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(96, 96), (96, 80), (384, 1536), (37, 53), (53, 37), (7, 5)])
@pytest.mark.parametrize("nblocks", [1, 2, 4])
def test_forward_matches_dense(shape, nblocks):
    torch.manual_seed(0)
    layer = m2.MonarchLinear(*shape, nblocks=nblocks).double()
    x = torch.randn(2, 3, shape[0], dtype=torch.float64)
    expected = x @ layer.to_dense().T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_reference_matches_blockwise_dense():
    torch.manual_seed(1)
    w1, w2 = torch.randn(4, 8, 3, dtype=torch.float64), torch.randn(4, 5, 8, dtype=torch.float64)
    x = torch.randn(6, 12, dtype=torch.float64)
    dense = monarch_to_dense(w1, w2)
    assert dense.shape == (20, 12)
    # Block (l, k) of the dense matrix has rank rho = 2 by construction.
    for l in range(4):
        for k in range(4):
            assert torch.linalg.matrix_rank(dense[l * 5:(l + 1) * 5, k * 3:(k + 1) * 3]) <= 2
    torch.testing.assert_close(monarch_matmul(x, w1, w2), x @ dense.T)


@pytest.mark.parametrize("shape,nblocks,rank", [((96, 96), 4, 1), ((96, 80), 4, 2), ((37, 53), 3, 1), ((64, 256), 8, 1)])
def test_projection_recovers_monarch_exactly(shape, nblocks, rank):
    torch.manual_seed(2)
    source = m2.MonarchLinear(*shape, nblocks=nblocks, rank=rank).double()
    target = source.to_dense()
    projected = m2.MonarchLinear.from_weight(target, source.bias, nblocks=nblocks, rank=rank)
    assert rel(projected.to_dense(), target) < 1e-5
    torch.testing.assert_close(projected.bias, source.bias)


def test_projection_beats_random_perturbations():
    torch.manual_seed(3)
    dense = torch.randn(80, 96, dtype=torch.float64)
    best = m2.MonarchLinear.from_weight(dense, nblocks=4)
    best_err = (best.to_dense() - dense).norm()
    for _ in range(100):
        other = m2.MonarchLinear(96, 80, nblocks=4, bias=False).double()
        with torch.no_grad():
            other.w1.copy_(best.w1 + 0.05 * torch.randn_like(best.w1))
            other.w2.copy_(best.w2 + 0.05 * torch.randn_like(best.w2))
        assert (other.to_dense() - dense).norm() >= best_err


def test_projection_error_decreases_with_rank():
    torch.manual_seed(4)
    dense = torch.randn(96, 96, dtype=torch.float64)
    errs = [rel(m2.MonarchLinear.from_weight(dense, nblocks=4, rank=r).to_dense(), dense) for r in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-10  # full block rank holds every dense matrix


def test_projection_error_grows_with_blocks_and_params_shrink():
    torch.manual_seed(5)
    lin = nn.Linear(96, 192)
    layers = [m2.MonarchLinear.from_dense(lin, nblocks=nb) for nb in (2, 4, 8)]
    errs = [rel(l.to_dense().double(), lin.weight.double()) for l in layers]
    params = [l.w1.numel() + l.w2.numel() for l in layers]
    assert errs == sorted(errs) and params == sorted(params, reverse=True)
    assert params[1] < lin.weight.numel()


def test_from_dense_keeps_dtype_and_bias():
    lin = nn.Linear(48, 40).to(torch.bfloat16)
    layer = m2.MonarchLinear.from_dense(lin, nblocks=4)
    assert layer.w1.dtype == torch.bfloat16 and layer(torch.randn(3, 48, dtype=torch.bfloat16)).shape == (3, 40)
    torch.testing.assert_close(layer.bias, lin.bias)


def test_gradients_flow_odd_sizes():
    torch.manual_seed(6)
    layer = m2.MonarchLinear(95, 63, nblocks=4, rank=2)
    x = torch.randn(2, 63, 95, requires_grad=True)
    layer(x).square().mean().backward()
    for p in [x, *layer.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_flops_and_params_are_symbolic():
    layer = m2.MonarchLinear(384, 1536, nblocks=4)
    expr = layer.flops()
    assert expr.free_symbols == {N, B}
    weights = layer.w1.numel() + layer.w2.numel()
    assert layer.flops(128, 2) == 2 * 128 * (2 * weights + 1536)
    assert layer.num_parameters() == weights + 1536
    assert weights < 384 * 1536 / 3


@pytest.mark.parametrize("kwargs,word", [
    ({"nblocks": 0}, "nblocks"), ({"nblocks": 97}, "nblocks"), ({"rank": 0}, "rank"),
    ({"nblocks": 2.5}, "nblocks"), ({"rank": True}, "rank"),
])
def test_bad_arguments_name_the_argument_and_range(kwargs, word):
    with pytest.raises(ConfigError, match=word) as info:
        m2.MonarchLinear(96, 120, **kwargs)
    assert isinstance(info.value, m2.M2Error)


def test_bad_inputs():
    layer = m2.MonarchLinear(16, 16)
    with pytest.raises(ShapeError, match="last dim 16"):
        layer(torch.randn(2, 15))
    with pytest.raises(ConfigError, match="nn.Linear"):
        m2.MonarchLinear.from_dense(nn.Conv1d(3, 3, 1))
    with pytest.raises(ShapeError, match="2-D"):
        m2.MonarchLinear.from_weight(torch.randn(3, 4, 5))
