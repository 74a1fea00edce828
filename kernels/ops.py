"""The fused kernels as torch.library operators, so torch.compile and torch.export see ``m2::`` ops.

    m2::monarch_matmul(Tensor x, Tensor w1, Tensor w2) -> Tensor
    m2::monarch_matmul_backward(Tensor dy, Tensor x, Tensor w1, Tensor w2) -> (Tensor, Tensor, Tensor)
    m2::monarch_linear(Tensor x, Tensor w1, Tensor w2, Tensor? bias, int out_features, str activation) -> Tensor
    m2::gated_long_conv(Tensor v, Tensor x1, Tensor x2, Tensor k, Tensor? k_rev, Tensor? D) -> Tensor
    m2::gated_long_conv_backward(Tensor dy, Tensor v, Tensor x1, Tensor x2, Tensor k, Tensor? k_rev,
                                 Tensor? D) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)

On GPUs each op launches the Triton kernels through ``wrap_triton`` (inductor can see and schedule
them); on the CPU the forward ops run the CPU kernels, which compute what the references compute in
bounded memory: ``m2::monarch_linear`` (a Monarch projection with its bias and activation, what an MLP's
projections lower to) the chunked product of ``kernels.monarch.cpu`` with the activation applied as each
chunk is written, ``m2::gated_long_conv`` the channel-blocked ``fftconv.cpu.gated_conv``; the others, and
the backward ops, run the PyTorch references. Backward
ops are ops too, so a compiled or exported training graph holds them instead of opaque Python. The
conv backward returns zero-size tensors in place of the gradients of an absent k_rev or D.

Importing this module does not import triton: the kernel modules load on the first GPU call.
"""

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from .activations import activation as _activation
from .fftconv.cpu import gated_conv
from .fftconv.reference import fft_long_conv, gated_long_conv
from .monarch.cpu import monarch_linear as _monarch_linear_cpu
from .monarch.reference import monarch_matmul
from .tracing import traced

Tensor = torch.Tensor


def _on_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu"


def _check_conv(v: Tensor, k: Tensor, k_rev: Optional[Tensor], D: Optional[Tensor]) -> None:
    # The reference zero-pads short filters silently; the op's gradients must match its inputs' shapes.
    h, n = v.shape[-2:]
    if v.dim() != 3 or k.shape != (h, n) or (k_rev is not None and k_rev.shape != (h, n)):
        raise ValueError(f"m2::gated_long_conv: v must be (B, H, N) and k, k_rev (H, N); got v {tuple(v.shape)}, "
                         f"k {tuple(k.shape)}" + ("" if k_rev is None else f", k_rev {tuple(k_rev.shape)}"))
    if D is not None and D.shape != (h,):
        raise ValueError(f"m2::gated_long_conv: D must be ({h},), got {tuple(D.shape)}")


def _conv_reference(v, x1, x2, k, k_rev, D):
    _check_conv(v, k, k_rev, D)
    return gated_long_conv(v, x1, x2, k, k_rev, D)


def _conv_cpu(v, x1, x2, k, k_rev, D):
    """The CPU kernel: channel-blocked (``fftconv.cpu.gated_conv``) in float32 / float64, else the reference."""
    _check_conv(v, k, k_rev, D)
    tensors = [t for t in (v, x1, x2, k, k_rev, D) if t is not None]
    plain = not any(traced(t) for t in tensors)                  # traced calls keep the reference's graph
    if plain and v.dtype in (torch.float32, torch.float64) and all(t.dtype == v.dtype for t in tensors):
        return gated_conv(v, x1, x2, k, k_rev, D)
    return gated_long_conv(v, x1, x2, k, k_rev, D)


def _monarch_backward_reference(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor):
    nb, mid, p = w1.shape
    s, rho = w2.shape[1], mid // nb
    # dx = R^T P1^T L^T dy: the Monarch product of the transposed factors.
    dx = monarch_matmul(dy, w2.transpose(1, 2), w1.transpose(1, 2))
    xb = x.reshape(-1, nb, p).transpose(0, 1)                                  # (nb_k, M, P)
    dyb = dy.reshape(-1, nb, s).transpose(0, 1)                                # (nb_l, M, S)
    h = torch.bmm(xb, w1.transpose(1, 2))                                      # (nb_k, M, nb_l * rho)
    h = h.reshape(nb, -1, nb, rho).permute(2, 1, 0, 3).reshape(nb, -1, mid)    # (nb_l, M, nb_k * rho)
    dw2 = torch.bmm(dyb.transpose(1, 2), h)                                    # (nb_l, S, nb_k * rho)
    dh = torch.bmm(dyb, w2)                                                    # (nb_l, M, nb_k * rho)
    dh = dh.reshape(nb, -1, nb, rho).permute(2, 1, 0, 3).reshape(nb, -1, mid)  # (nb_k, M, nb_l * rho)
    dw1 = torch.bmm(dh.transpose(1, 2), xb)                                    # (nb_k, nb_l * rho, P)
    return dx, dw1, dw2


def _conv_backward_reference(dy, v, x1, x2, k, k_rev, D):
    n = v.shape[-1]
    work = torch.promote_types(v.dtype, torch.float32)
    u = (v * x1).to(work)                                                      # (B, H, N)
    c = fft_long_conv(u, k, k_rev, D)                                          # (B, H, N) pre-gate output
    g = dy.to(work) * x2.to(work)                                              # dL/dc
    # The adjoint of a Toeplitz convolution is the same convolution in reversed time (J C^T J = C).
    du = fft_long_conv(g.flip(-1), k, k_rev, D).flip(-1)
    # dk_full[t] = sum_b,s g[s] u[s - t]: the cross-correlation, lags t = 0..N-1 and 2N-d (d = 1..N-1).
    q = torch.fft.rfft(g, n=2 * n) * torch.fft.rfft(u, n=2 * n).conj()         # (B, H, N + 1)
    q = torch.fft.irfft(q.sum(0), n=2 * n)                                     # (H, 2N)
    dk = q[:, :n].to(k.dtype)
    dk_rev = (torch.cat([torch.zeros_like(q[:, :1]), q.flip(-1)[:, : n - 1]], dim=-1).to(k_rev.dtype)
              if k_rev is not None else v.new_empty(0))
    dD = (g * u).sum((0, 2)).to(D.dtype) if D is not None else v.new_empty(0)
    return ((du * x1).to(v.dtype), (du * v).to(x1.dtype), (dy.to(work) * c).to(x2.dtype), dk, dk_rev, dD)


@triton_op("m2::monarch_matmul", mutates_args=())
def _monarch_matmul(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    if _on_cpu(x):
        return monarch_matmul(x, w1, w2)
    from .monarch.triton_monarch import monarch_forward
    nb, s = w2.shape[0], w2.shape[1]
    y = monarch_forward(x.reshape(-1, x.shape[-1]).contiguous(), w1, w2, wrap=wrap_triton)
    return y.reshape(*x.shape[:-1], nb * s)


@triton_op("m2::monarch_matmul_backward", mutates_args=())
def _monarch_matmul_backward(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if _on_cpu(x):
        return _monarch_backward_reference(dy, x, w1, w2)
    from .monarch.triton_monarch import monarch_backward
    d_in, d_out = x.shape[-1], dy.shape[-1]
    dx, dw1, dw2 = monarch_backward(dy.reshape(-1, d_out), x.reshape(-1, d_in), w1, w2, wrap=wrap_triton)
    return dx.reshape(x.shape), dw1, dw2


@triton_op("m2::gated_long_conv", mutates_args=())
def _gated_long_conv(v: Tensor, x1: Tensor, x2: Tensor, k: Tensor, k_rev: Optional[Tensor],
                     D: Optional[Tensor]) -> Tensor:
    if _on_cpu(v):
        return _conv_cpu(v, x1, x2, k, k_rev, D)
    from .fftconv.triton_fftconv import gated_conv_forward
    return gated_conv_forward(v, x1, x2, k, k_rev, D, wrap=wrap_triton)


@triton_op("m2::gated_long_conv_backward", mutates_args=())
def _gated_long_conv_backward(dy: Tensor, v: Tensor, x1: Tensor, x2: Tensor, k: Tensor,
                              k_rev: Optional[Tensor], D: Optional[Tensor]
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _on_cpu(v):
        return _conv_backward_reference(dy, v, x1, x2, k, k_rev, D)
    from .fftconv.triton_fftconv import gated_conv_backward
    grads = gated_conv_backward(dy, v, x1, x2, k, k_rev, D, wrap=wrap_triton)
    return tuple(v.new_empty(0) if g is None else g for g in grads)


@torch.library.custom_op("m2::monarch_linear", mutates_args=())
def _monarch_linear(x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], out_features: int,
                    activation: str) -> Tensor:
    if _on_cpu(x) and not any(traced(t) for t in (x, w1, w2, bias) if t is not None):
        act = _activation(activation).inplace if activation else None
        rows = x.reshape(-1, x.shape[-1]).contiguous()                            # (M, nb * P)
        y = _monarch_linear_cpu(rows, w1, w2, bias, out_features, activation=act)  # (M, out)
        return y.view(*x.shape[:-1], out_features)
    return _monarch_linear_reference(x, w1, w2, bias, out_features, activation)


def _monarch_linear_reference(x, w1, w2, bias, out_features: int, activation: str):
    y = torch.ops.m2.monarch_matmul(x, w1, w2)[..., :out_features]                # (..., out)
    if bias is not None:
        y = y + bias
    return _activation(activation).apply(y) if activation else y


@_monarch_linear.register_fake
def _(x, w1, w2, bias, out_features, activation):
    return x.new_empty(*x.shape[:-1], out_features)


def _linear_setup(ctx, inputs, output):
    x, w1, w2, bias, out_features, activation = inputs
    ctx.out_features, ctx.activation, ctx.has_bias = out_features, activation, bias is not None
    ctx.save_for_backward(x, w1, w2, bias)


def _linear_grad(ctx, dy):
    x, w1, w2, bias = ctx.saved_tensors
    if ctx.activation:
        pre = torch.ops.m2.monarch_matmul(x, w1, w2)[..., : ctx.out_features]     # recomputed, not stored
        if bias is not None:
            pre = pre + bias
        dy = _activation(ctx.activation).backward(dy, pre)
    full = w2.shape[0] * w2.shape[1]
    if full != ctx.out_features:
        dy = torch.nn.functional.pad(dy, (0, full - ctx.out_features))            # the cropped outputs
    dx, dw1, dw2 = torch.ops.m2.monarch_matmul_backward(dy.contiguous(), x, w1, w2)
    db = dy[..., : ctx.out_features].reshape(-1, ctx.out_features).sum(0) if ctx.has_bias else None
    return dx, dw1, dw2, db, None, None


_monarch_linear.register_autograd(_linear_grad, setup_context=_linear_setup)


# CPU kernels: the references (the GPU branch above is never taken for CPU tensors).
_monarch_matmul.register_kernel("cpu")(monarch_matmul)
_monarch_matmul_backward.register_kernel("cpu")(_monarch_backward_reference)
_gated_long_conv.register_kernel("cpu")(_conv_cpu)
_gated_long_conv_backward.register_kernel("cpu")(_conv_backward_reference)


@_monarch_matmul.register_fake
def _(x, w1, w2):
    return x.new_empty(*x.shape[:-1], w2.shape[0] * w2.shape[1])


@_monarch_matmul_backward.register_fake
def _(dy, x, w1, w2):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


@_gated_long_conv.register_fake
def _(v, x1, x2, k, k_rev, D):
    _check_conv(v, k, k_rev, D)
    return torch.empty_like(v)


@_gated_long_conv_backward.register_fake
def _(dy, v, x1, x2, k, k_rev, D):
    return (torch.empty_like(v), torch.empty_like(x1), torch.empty_like(x2), torch.empty_like(k),
            v.new_empty(0) if k_rev is None else torch.empty_like(k_rev),
            v.new_empty(0) if D is None else torch.empty_like(D))


def _monarch_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _monarch_grad(ctx, dy):
    return tuple(torch.ops.m2.monarch_matmul_backward(dy, *ctx.saved_tensors))


def _conv_setup(ctx, inputs, output):
    v, x1, x2, k, k_rev, D = inputs
    ctx.has_rev, ctx.has_d = k_rev is not None, D is not None
    ctx.save_for_backward(v, x1, x2, k, k_rev, D)


def _conv_grad(ctx, dy):
    dv, dx1, dx2, dk, dk_rev, dD = torch.ops.m2.gated_long_conv_backward(dy, *ctx.saved_tensors)
    return dv, dx1, dx2, dk, dk_rev if ctx.has_rev else None, dD if ctx.has_d else None


_monarch_matmul.register_autograd(_monarch_grad, setup_context=_monarch_setup)
_gated_long_conv.register_autograd(_conv_grad, setup_context=_conv_setup)


def monarch_matmul_op(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``torch.ops.m2.monarch_matmul``: y = Monarch(w1, w2) @ x, differentiable.

    Args:
        x: (..., nb * P).  w1: (nb, nb * rho, P).  w2: (nb, S, nb * rho).

    Returns:
        (..., nb * S).

    Example:
        >>> monarch_matmul_op(torch.randn(2, 12), torch.randn(4, 8, 3), torch.randn(4, 5, 8)).shape
        torch.Size([2, 20])
    """
    return torch.ops.m2.monarch_matmul(x, w1, w2)


def monarch_linear_op(x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor] = None,
                      out_features: Optional[int] = None, activation: str = "") -> Tensor:
    """``torch.ops.m2.monarch_linear``: y = act(Monarch(w1, w2) @ x [..., :out_features] + bias), differentiable.

    Args:
        x: (..., nb * P).  w1: (nb, nb * rho, P).  w2: (nb, S, nb * rho).  bias: (out_features,) or None.
        out_features: outputs kept (default nb * S).  activation: a name in ``kernels.activations``, or "".

    Returns:
        (..., out_features).

    Example:
        >>> monarch_linear_op(torch.randn(2, 12), torch.randn(4, 8, 3), torch.randn(4, 5, 8), torch.zeros(18),
        ...                   18, "gelu").shape
        torch.Size([2, 18])
    """
    out = w2.shape[0] * w2.shape[1] if out_features is None else out_features
    return torch.ops.m2.monarch_linear(x, w1, w2, bias, out, activation)


def gated_long_conv_op(v: Tensor, x1: Tensor, x2: Tensor, k: Tensor, k_rev: Optional[Tensor] = None,
                       D: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.m2.gated_long_conv``: y = x2 * (conv(v * x1, k, k_rev) + D * (v * x1)), differentiable.

    Args:
        v, x1, x2: (B, H, N).  k, k_rev: (H, N) (k_rev None: causal).  D: (H,) or None.

    Returns:
        (B, H, N).

    Example:
        >>> v, x1, x2 = torch.randn(3, 2, 4, 16).unbind(0)
        >>> gated_long_conv_op(v, x1, x2, torch.randn(4, 16)).shape
        torch.Size([2, 4, 16])
    """
    return torch.ops.m2.gated_long_conv(v, x1, x2, k, k_rev, D)
