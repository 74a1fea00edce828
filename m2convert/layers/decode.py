"""Incremental decoding for causal M2 sequence mixers: O(N) per new token instead of an FFT pass.

Every long-conv tap depends on its offset alone, so the output at position t is

    y_t = x2_t * (sum_{d<=t} k[d] * w_{t-d} + D * w_t) + sum_{d<=t} k_res[d] * u_{t-d} + D_res * u_t

with w = v * x1 (after the short conv) and u the mixer input. :class:`DecodeState` keeps the past
w and u (and the short conv's last inputs); :func:`decode_step` computes y_t directly from them.
Filter taps are generated once for a capacity that doubles when outgrown (a longer filter's prefix
equals the shorter one), so a step never regenerates the filter MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, ShapeError


@dataclass
class DecodeState:
    """Past inputs of one causal mixer for a batch of sequences.

    Attributes:
        z_tail: (B, 3H, kernel-1) last in_proj outputs, the short conv's window.
        w: (B, H, capacity) gated long-conv inputs w = v * x1; the first ``length`` are filled.
        u: (B, H, capacity) or None: the residual long-conv inputs.
        taps: (H, capacity) and res_taps: (H, capacity) or None: filter taps in reversed offset order
            (column capacity-1-d holds offset d), so the taps of a step are one contiguous slice.
        length: tokens seen so far.
    """

    z_tail: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor | None
    taps: torch.Tensor
    res_taps: torch.Tensor | None
    length: int


def _check_causal(mixer) -> None:
    if mixer.mode not in ("causal", "causal-monarch"):
        raise ConfigError(f"incremental decoding needs a causal mixer, this one is mode={mixer.mode!r}")


def _grow(buf: torch.Tensor, capacity: int) -> torch.Tensor:
    out = buf.new_zeros(*buf.shape[:-1], capacity)
    out[..., : buf.shape[-1]] = buf
    return out


def _ensure_capacity(mixer, state: DecodeState, needed: int) -> None:
    capacity = state.w.shape[-1]
    if needed <= capacity:
        return
    capacity = max(needed, 2 * capacity)
    state.w = _grow(state.w, capacity)
    if state.u is not None:
        state.u = _grow(state.u, capacity)
    state.taps = mixer.filter(capacity)[0].flip(-1)
    if mixer.residual_filter is not None:
        state.res_taps = mixer.residual_filter(capacity)[0].flip(-1)


def prefill(mixer, x: torch.Tensor, mask: torch.Tensor | None = None, capacity: int | None = None):
    """Run the mixer on a prompt and return (output (B, N, H), DecodeState for what follows).

    Args:
        mixer: a causal :class:`M2SequenceMixer`.
        x: (B, N, H) prompt activations.  mask: (B, N) 1 = token, 0 = padding, or None.
        capacity: positions to reserve (prompt + new tokens); grows by doubling when exceeded.
    """
    _check_causal(mixer)
    b, n, h = x.shape
    keep = None if mask is None else mask.to(x.dtype)[:, None, :]             # (B, 1, N)
    z = mixer.in_proj(x).transpose(1, 2)                                       # (B, 3H, N)
    if keep is not None:
        z = z * keep
    k = mixer.short_kernel
    z_tail = torch.nn.functional.pad(z, (k - 1, 0))[..., -(k - 1):] if k > 1 else z[..., :0]
    c = mixer.short_conv(z)[..., :n]                                           # (B, 3H, N)
    x1, _, v = c.split(h, dim=1)
    w = v * x1
    if keep is not None:
        w = w * keep
    u = None
    if mixer.residual_filter is not None:
        u = x.transpose(1, 2) if keep is None else x.transpose(1, 2) * keep    # (B, H, N)
    cap = max(capacity or 0, n, 1)
    state = DecodeState(z_tail=z_tail, w=_grow(w, cap), u=None if u is None else _grow(u, cap),
                        taps=mixer.filter(cap)[0].flip(-1),
                        res_taps=None if mixer.residual_filter is None else mixer.residual_filter(cap)[0].flip(-1),
                        length=n)
    return mixer(x, mask), state


def decode_step(mixer, x_t: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Output for one new token per sequence, updating ``state`` in place.

    Args:
        mixer: the causal mixer the state came from.  x_t: (B, 1, H) or (B, H).
        state: from :func:`prefill` or an earlier step.

    Returns:
        (B, 1, H) (or (B, H), matching x_t).
    """
    _check_causal(mixer)
    squeeze = x_t.dim() == 2
    x = x_t if squeeze else x_t[:, 0]                                          # (B, H)
    if x.dim() != 2 or x.shape[-1] != mixer.d_model:
        raise ShapeError(f"decode_step expects x_t of shape (B, 1, {mixer.d_model}), got {tuple(x_t.shape)}")
    h, t = mixer.d_model, state.length
    _ensure_capacity(mixer, state, t + 1)
    z = mixer.in_proj(x)                                                       # (B, 3H)
    window = torch.cat([state.z_tail, z[..., None]], dim=-1)                   # (B, 3H, kernel)
    c = (window * mixer.short_conv.weight[:, 0, :]).sum(-1) + mixer.short_conv.bias   # (B, 3H)
    state.z_tail = window[..., 1:]
    x1, x2, v = c.split(h, dim=-1)
    state.w[..., t] = v * x1
    # Inputs at times 0..t meet taps of offsets t..0: one slice of the reversed taps, one dot product.
    offsets = slice(state.taps.shape[-1] - 1 - t, None)
    y = x2 * (torch.einsum("bhs,hs->bh", state.w[..., : t + 1], state.taps[:, offsets]) + mixer.D * state.w[..., t])
    if state.u is not None:
        state.u[..., t] = x
        y = (y + torch.einsum("bhs,hs->bh", state.u[..., : t + 1], state.res_taps[:, offsets])
             + mixer.D_res * x)
    state.length = t + 1
    out = mixer.out_proj(y)                                                    # (B, H)
    return out if squeeze else out[:, None]
