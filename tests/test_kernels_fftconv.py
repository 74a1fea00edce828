"""The fused Monarch-FFT gated long convolution against the torch.fft reference (CPU, Triton interpreter)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernel module is imported

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2convert.errors import KernelError
from m2convert.kernels.fftconv.reference import gated_long_conv
from m2convert.kernels.testing import assert_close, load_interpreted, poison_empty

tf = load_interpreted("m2convert.kernels.fftconv.triton_fftconv")


@pytest.fixture(autouse=True)
def _nan_outputs():
    with poison_empty():
        yield


def _inputs(b, h, n, bidirectional, skip, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, x1, x2 = (torch.randn(b, h, n, generator=g).to(dtype) for _ in range(3))
    k = (torch.randn(h, n, generator=g) / n ** 0.5).to(dtype)
    k_rev = (torch.randn(h, n, generator=g) / n ** 0.5).to(dtype) if bidirectional else None
    D = torch.randn(h, generator=g).to(dtype) if skip else None
    return v, x1, x2, k, k_rev, D


def _check(args, rtol=1e-4, seed=1):
    """Forward and the gradient of every given input vs the reference in float64."""
    present = [i for i, t in enumerate(args) if t is not None]
    ins = [t.detach().clone().requires_grad_() if t is not None else None for t in args]
    y = tf.gated_long_conv_triton(*ins)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    grads = torch.autograd.grad(y, [ins[i] for i in present], dy)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    y_ref = gated_long_conv(*ref)
    ref_grads = torch.autograd.grad(y_ref, [ref[i] for i in present], dy.double())
    assert y.dtype == args[0].dtype
    assert_close(y, y_ref, rtol, "y")
    names = ("dv", "dx1", "dx2", "dk", "dk_rev", "dD")
    for i, got, want in zip(present, grads, ref_grads):
        assert got.dtype == args[i].dtype
        assert_close(got, want, rtol, names[i])


# (B, H, N): N below one 16 x 16 tile, N = 1, a non-square 16 x 32 tile (N = 200 -> L = 512) and a
# 32 x 32 one (N = 300 -> L = 1024).
SHAPES = [(2, 3, 5), (1, 1, 1), (2, 2, 200), (1, 2, 300)]


@pytest.mark.parametrize("b,h,n", SHAPES)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_forward_and_grads_match_reference_fp32(b, h, n, bidirectional):
    _check(_inputs(b, h, n, bidirectional, skip=True))


def test_without_skip_term():
    _check(_inputs(2, 2, 37, bidirectional=True, skip=False))


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_half_precision_inputs(dtype, rtol):
    _check(_inputs(2, 3, 100, bidirectional=True, skip=True, dtype=dtype), rtol=rtol)


def test_causal_kernel_never_looks_ahead():
    v, x1, x2, k, _, D = _inputs(1, 2, 64, bidirectional=False, skip=True)
    y = tf.gated_long_conv_triton(v, x1, x2, k, None, D)
    v2 = v.clone()
    v2[..., 40] += 100.0                                       # a large change at t = 40
    y2 = tf.gated_long_conv_triton(v2, x1, x2, k, None, D)
    assert (y2[..., :40] - y[..., :40]).abs().max() < 1e-3 * y.abs().max()
    assert (y2[..., 40:] - y[..., 40:]).abs().max() > 1.0


def test_fft_size_factors():
    assert tf.fft_size(1) == (256, 16, 16)
    assert tf.fft_size(200) == (512, 16, 32)
    assert tf.fft_size(tf.MAX_N) == (2 * tf.MAX_N, 128, 128)


def test_rejects_unsupported_length_and_bad_shapes():
    v, x1, x2, k, k_rev, D = _inputs(1, 1, tf.MAX_N + 1, bidirectional=False, skip=False)
    with pytest.raises(KernelError, match="N <="):
        tf.gated_long_conv_triton(v, x1, x2, k)
    v, x1, x2, k, k_rev, D = _inputs(1, 2, 8, bidirectional=True, skip=True)
    with pytest.raises(ValueError, match="filters"):
        tf.gated_long_conv_triton(v, x1, x2, k[:, :-1], k_rev, D)
    with pytest.raises(ValueError, match="D must be"):
        tf.gated_long_conv_triton(v, x1, x2, k, k_rev, D[:1])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 260), bidirectional=st.booleans(),
       skip=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_reference(b, h, n, bidirectional, skip, seed):
    _check(_inputs(b, h, n, bidirectional, skip, seed=seed), seed=seed + 1)
