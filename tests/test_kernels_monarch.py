"""The fused Triton Monarch multiply against the PyTorch reference (CPU, Triton interpreter)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernel module is imported

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2convert.kernels.monarch.reference import monarch_matmul
from m2convert.kernels.testing import assert_close, load_interpreted, poison_empty

tm = load_interpreted("m2convert.kernels.monarch.triton_monarch")


@pytest.fixture(autouse=True)
def _nan_outputs():
    with poison_empty():
        yield


def _factors(lead, nb, p, s, rho, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, nb * p, generator=g).to(dtype)
    w1 = torch.randn(nb, nb * rho, p, generator=g).to(dtype)
    w2 = torch.randn(nb, s, nb * rho, generator=g).to(dtype)
    return x, w1, w2


def _check(x, w1, w2, rtol=1e-4, seed=1):
    """Forward and all three gradients of the kernel vs the reference in float64."""
    ins = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    y = tm.monarch_matmul_triton(*ins)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    grads = torch.autograd.grad(y, ins, dy)
    ref_ins = [t.detach().double().requires_grad_() for t in (x, w1, w2)]
    y_ref = monarch_matmul(*ref_ins)
    ref_grads = torch.autograd.grad(y_ref, ref_ins, dy.double())
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, rtol, "y")
    for name, got, want in zip(("dx", "dw1", "dw2"), grads, ref_grads):
        assert got.dtype == x.dtype and got.shape == want.shape
        assert_close(got, want, rtol, name)


# (lead, nb, P, S, rho): odd sizes below one 16-wide tile, sizes spanning several tiles of every loop,
# and enough rows for the weight gradients to split the row reduction.
SHAPES = [
    ((2, 7), 4, 3, 5, 2),
    ((33,), 2, 40, 18, 17),
    ((3,), 3, 1, 1, 1),
    ((5,), 1, 16, 16, 16),
    ((300,), 2, 5, 7, 3),
]


@pytest.mark.parametrize("lead,nb,p,s,rho", SHAPES)
def test_forward_and_grads_match_reference_fp32(lead, nb, p, s, rho):
    _check(*_factors(lead, nb, p, s, rho))


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_half_precision_inputs_accumulate_in_fp32(dtype, rtol):
    _check(*_factors((9,), 2, 20, 6, 3, dtype=dtype), rtol=rtol)


def test_strided_input_and_empty_batch():
    x, w1, w2 = _factors((5, 12), 3, 4, 2, 2)
    xt = x.transpose(0, 1)                                     # (12, 5, 12): non-contiguous
    assert_close(tm.monarch_matmul_triton(xt, w1, w2), monarch_matmul(xt, w1, w2), name="strided")
    assert tm.monarch_matmul_triton(x[:0], w1, w2).shape == (0, 12, 3 * 2)


def test_rejects_bad_shapes_and_mixed_dtypes():
    x, w1, w2 = _factors((4,), 2, 3, 5, 2)
    with pytest.raises(ValueError, match="features"):
        tm.monarch_matmul_triton(x[:, :-1], w1, w2)
    with pytest.raises(ValueError, match="chain"):
        tm.monarch_matmul_triton(x, w1, w2[:, :, :-1])
    with pytest.raises(TypeError, match="dtypes"):
        tm.monarch_matmul_triton(x, w1.double(), w2)


def test_poisoned_allocation_is_active():
    assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2)).isnan().all()


# The autouse poisoning fixture holds no per-example state, so sharing it across examples is fine.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 40), nb=st.integers(1, 4), p=st.integers(1, 20), s=st.integers(1, 20),
       rho=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_random_shapes_match_reference(m, nb, p, s, rho, seed):
    _check(*_factors((m,), nb, p, s, rho, seed=seed), seed=seed + 1)


def test_autotune_pruning_keeps_tiles_within_padded_sizes():
    import triton
    configs = [triton.Config({"BLOCK_P": b, "BLOCK_S": b}) for b in (16, 64, 128)]
    prune = tm._prune({"BLOCK_P": "P", "BLOCK_S": "S"})
    assert [c.kwargs["BLOCK_P"] for c in prune(configs, {"P": 3, "S": 100})] == [16]
    assert [c.kwargs["BLOCK_P"] for c in prune(configs, {"P": 100, "S": 100})] == [16, 64, 128]
    assert len(prune(configs[1:], {"P": 3, "S": 3})) == 1            # none fit: the smallest survives


def test_assert_close_flags_unwritten_outputs():
    with pytest.raises(AssertionError, match="not finite"):
        assert_close(torch.empty(4), torch.zeros(4), name="poisoned")
