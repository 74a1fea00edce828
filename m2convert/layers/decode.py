"""Incremental decoding for causal M2 sequence mixers: a new token from a state instead of an FFT pass.

Every long-conv tap depends on its offset alone, so the output at position t is

    y_t = x2_t * (sum_{d<=t} k[d] * w_{t-d} + D * w_t) + sum_{d<=t} k_res[d] * u_{t-d} + D_res * u_t

with w = v * x1 (after the short conv) and u the mixer input. :class:`DecodeState` keeps the past
w and u (and the short conv's last inputs); :func:`decode_step` computes y_t directly from them.
Filter taps are generated once for a capacity that doubles when outgrown (a longer filter's prefix
equals the shorter one), so a step never regenerates the filter MLP.

A mixer whose filters are in modal form (:class:`~m2convert.layers.recurrent.RecurrentFilter`, made by
:func:`~m2convert.layers.recurrent.to_recurrent`) decodes recurrently instead: :class:`RecurrentState`
has a fixed size and :func:`recurrent_step` costs O(H S) whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError, ShapeError
from .modal import mode_powers
from .monarch import eager_inference
from .recurrent import RecurrentFilter
from .window import WindowCache


class _PerSequence:
    """Base of the decoding states: the fields named in ``per_sequence`` hold one row per sequence."""

    per_sequence: ClassVar[tuple[str, ...]] = ()
    z_tail: torch.Tensor

    @property
    def batch(self) -> int:
        return self.z_tail.shape[0]

    def map_batch(self, fn) -> None:
        """Apply a batch operation (index, repeat) to every per-sequence tensor."""
        for name in self.per_sequence:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.map_batch(fn) if hasattr(value, "map_batch") else fn(value))


@dataclass
class DecodeState(_PerSequence):
    """Past inputs of one causal mixer for a batch of sequences.

    Attributes:
        z_tail: (B, 3H, kernel-1) last in_proj outputs, the short conv's window.
        w: (B, H, capacity) gated long-conv inputs w = v * x1; the first ``length`` are filled.
        u: (B, H, capacity) or None: the residual long-conv inputs.
        taps: (H, capacity) and res_taps: (H, capacity) or None: filter taps in reversed offset order
            (column capacity-1-d holds offset d), so the taps of a step are one contiguous slice.
        seen: an empty (0, length) tensor whose last size is the number of tokens seen (``length``).
        window: the window attention's last keys and values (a mixer with ``window``), or None.
    """

    z_tail: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor | None
    taps: torch.Tensor
    res_taps: torch.Tensor | None
    seen: torch.Tensor
    window: WindowCache | None = None
    per_sequence: ClassVar[tuple[str, ...]] = ("z_tail", "w", "u", "window")

    @property
    def length(self) -> int:
        return self.seen.shape[-1]

    @length.setter
    def length(self, value: int) -> None:
        self.seen = self.seen.new_empty(1, value)


def _check_causal(mixer) -> None:
    if mixer.mode not in ("causal", "causal-monarch"):
        raise ConfigError(f"incremental decoding needs a causal mixer, this one is mode={mixer.mode!r}")


def _grow(buf: torch.Tensor, capacity: int) -> torch.Tensor:
    out = buf.new_zeros(*buf.shape[:-1], capacity)
    out[..., : buf.shape[-1]] = buf
    return out


def _ring_taps(flipped: torch.Tensor) -> torch.Tensor:
    """(H, 2W) reversed taps written twice: a local mixer's inputs sit in a ring of W slots (the input of time
    tau in slot tau % W), and the taps that meet the ring at time t >= W are one slice of this."""
    return torch.cat([flipped, flipped], dim=-1)


def _step_slots(mixer, state: DecodeState, t: int) -> tuple[int, tuple]:
    """(slot of token t's input, (start, length) of the reversed taps that meet slots 0..length-1).

    Inputs at times 0..t meet taps of offsets t..0: one slice of the reversed taps. A full ring (t >= W)
    holds time tau in slot tau % W, whose offset t - tau is (t - slot) % W: the slice starting at
    (W - 1 - t) % W of the doubled taps.
    """
    if window_taps(mixer) is None:
        return t, (state.taps.shape[-1] - 1 - t, t + 1)
    ring = state.w.shape[-1]
    if t < ring:
        return t, (2 * ring - 1 - t, t + 1)
    return t % ring, ((ring - 1 - t) % ring, ring)


def window_taps(mixer) -> int | None:
    """The offsets a local mixer's filters keep (``filter_window``), or None: decoding then keeps only
    that many past inputs, a fixed-size state that gives the same outputs."""
    return getattr(mixer.filter, "window", None)


def _ensure_capacity(mixer, state: DecodeState, needed: int) -> None:
    capacity = state.w.shape[-1]
    if needed <= capacity or window_taps(mixer) is not None:
        return
    capacity = max(needed, 2 * capacity)
    state.w = _grow(state.w, capacity)
    if state.u is not None:
        state.u = _grow(state.u, capacity)
    state.taps = mixer.filter(capacity)[0].flip(-1)
    if mixer.residual_filter is not None:
        state.res_taps = mixer.residual_filter(capacity)[0].flip(-1)


def _prompt_inputs(mixer, x: torch.Tensor, mask: torch.Tensor | None):
    """(z_tail (B, 3D, kernel-1), w (B, D, N), u (B, H, N) or None) of a prompt, padding zeroed."""
    n, h = x.shape[1], mixer.d_inner
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
    return z_tail, w, u


def prefill(mixer, x: torch.Tensor, mask: torch.Tensor | None = None, capacity: int | None = None, rope=None):
    """Run the mixer on a prompt and return (output (B, N, H), DecodeState for what follows).

    Args:
        mixer: a causal :class:`M2SequenceMixer`.
        x: (B, N, H) prompt activations.  mask: (B, N) 1 = token, 0 = padding, or None.
        capacity: positions to reserve (prompt + new tokens); grows by doubling when exceeded.
        rope: the prompt's rotary (cos, sin) for a mixer with a window attention, or None.
    """
    _check_causal(mixer)
    n = x.shape[1]
    z_tail, w, u = _prompt_inputs(mixer, x, mask)
    cap, ring = max(capacity or 0, n, 1), window_taps(mixer) is not None
    if ring:                                                # a ring of the window's last inputs
        cap = window_taps(mixer)
        w, u = (None if b is None else torch.roll(b[..., -cap:], n % cap, dims=-1) for b in (w, u))
    taps, res_taps = (None if f is None else f(cap)[0].flip(-1) for f in (mixer.filter, mixer.residual_filter))
    if ring:
        taps, res_taps = _ring_taps(taps), None if res_taps is None else _ring_taps(res_taps)
    state = DecodeState(z_tail=z_tail, w=_grow(w, cap), u=None if u is None else _grow(u, cap), taps=taps,
                        res_taps=res_taps, seen=x.new_empty(1, n, dtype=torch.uint8),
                        window=_window_cache(mixer, x, mask, rope))
    return mixer(x, mask, rope), state


def decode_step(mixer, x_t: torch.Tensor, state: DecodeState, rope=None) -> torch.Tensor:
    """Output for one new token per sequence, updating ``state`` in place.

    Args:
        mixer: the causal mixer the state came from.  x_t: (B, 1, H) or (B, H).
        state: from :func:`prefill` or an earlier step.  rope: this token's rotary (cos, sin), or None.

    Returns:
        (B, 1, H) (or (B, H), matching x_t).
    """
    _check_causal(mixer)
    squeeze = x_t.dim() == 2
    x = x_t if squeeze else x_t[:, 0]                                          # (B, H)
    if x.dim() != 2 or x.shape[-1] != mixer.d_model:
        raise ShapeError(f"decode_step expects x_t of shape (B, 1, {mixer.d_model}), got {tuple(x_t.shape)}")
    h, t = mixer.d_inner, state.length
    _ensure_capacity(mixer, state, t + 1)
    z = mixer.in_proj(x)                                                       # (B, 3H)
    window = torch.cat([state.z_tail, z[..., None]], dim=-1)                   # (B, 3H, kernel)
    c = (window * mixer.short_conv.weight[:, 0, :]).sum(-1) + mixer.short_conv.bias   # (B, 3H)
    state.z_tail = window[..., 1:]
    x1, x2, v = c.split(h, dim=-1)
    slot, (start, used) = _step_slots(mixer, state, t)
    state.w.narrow(-1, slot, 1).copy_((v * x1)[..., None])    # narrow, not w[..., t]: a compiled step keeps t symbolic
    y = x2 * (torch.einsum("bhs,hs->bh", state.w[..., :used], state.taps.narrow(-1, start, used))
              + mixer.D * v * x1)
    if state.u is not None:
        state.u.narrow(-1, slot, 1).copy_(x[..., None])
        y = (y + torch.einsum("bhs,hs->bh", state.u[..., :used], state.res_taps.narrow(-1, start, used))
             + mixer.D_res * x)
    y = _gated(mixer, x, _window_step(mixer, x, state, t, rope, y))
    state.length = t + 1
    out = mixer.out_proj(y)                                                    # (B, H)
    return out if squeeze else out[:, None]


def _window_cache(mixer, x: torch.Tensor, mask, rope) -> WindowCache | None:
    branch = getattr(mixer, "window_attention", None)
    return None if branch is None else branch.cache(x, mask, rope)


def _window_step(mixer, x: torch.Tensor, state, t: int, rope, y: torch.Tensor) -> torch.Tensor:
    """y (B, H) plus the window attention's output for token t (x (B, H)), where the mixer has one."""
    if state.window is None:
        return y
    return y + mixer.window_attention.step(x, state.window, t, rope).to(y.dtype)


def _gated(mixer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (B, H) times sigmoid(output_gate(x)) where the mixer gates its output, else y."""
    gate = getattr(mixer, "output_gate", None)
    return y if gate is None else y * torch.sigmoid(gate(x))


def is_recurrent(mixer) -> bool:
    """True when ``mixer``'s filters are in modal form (see :func:`~m2convert.layers.recurrent.to_recurrent`).

    Example:
        >>> from m2convert.layers import M2SequenceMixer
        >>> is_recurrent(M2SequenceMixer(8, mode="causal"))
        False
    """
    return isinstance(getattr(mixer, "filter", None), RecurrentFilter)


@dataclass
class RecurrentState(_PerSequence):
    """Fixed-size decoding state of one recurrent mixer for a batch of sequences.

    Attributes:
        z_tail: (B, 3H, kernel-1) last in_proj outputs, the short conv's window.
        modes: (B, H, S) complex: sum_j lam^(n-1-j) w_j over the n tokens seen (complex64 for float32 inputs).
        res_modes: (B, H, S) complex or None: the same for the residual filter and the mixer input u.
        length: 0-dim int64 tensor, tokens seen (a tensor: a compiled step has no guard on it).
        window: the window attention's last keys and values (a mixer with ``window``), or None.
    """

    z_tail: torch.Tensor
    modes: torch.Tensor
    res_modes: torch.Tensor | None
    length: torch.Tensor
    window: WindowCache | None = None
    per_sequence: ClassVar[tuple[str, ...]] = ("z_tail", "modes", "res_modes", "window")

    def nbytes(self) -> int:
        """Bytes held: independent of the number of tokens seen."""
        return sum(t.numel() * t.element_size() for t in (self.z_tail, self.modes, self.res_modes, self.length)
                   if t is not None) + (0 if self.window is None else self.window.nbytes())


def _scan(lam: torch.Tensor, w: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """(B, H, S) sum_j lam^(N-1-j) w_j of poles lam (H, S) and inputs w (B, H, N): chunks of ``chunk``
    tokens, each one contraction against the powers, then one against the chunks' decay."""
    b, h, n = w.shape
    q = -(-n // chunk)
    w = torch.nn.functional.pad(w, (q * chunk - n, 0)).view(b, h, q, chunk).to(lam.dtype)   # zeros first
    within = _powers_flipped(lam, chunk)                                   # (H, S, chunk): lam^(chunk-1-i)
    across = _powers_flipped(within[..., 0] * lam, q)                      # (H, S, q): lam^(chunk (q-1-p))
    return torch.einsum("bhpi,hsi,hsp->bhs", w, within, across).contiguous()


def _powers_flipped(lam: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) powers lam^(n-1-i), i = 0..n-1 (newest input last)."""
    return mode_powers(lam, n).flip(-1)


def recurrent_prefill(mixer, x: torch.Tensor, mask: torch.Tensor | None = None, rope=None):
    """Run a recurrent mixer on a prompt: (output (B, N, H) by the FFT path, :class:`RecurrentState`).

    Padded positions (mask 0) contribute nothing to the state, so left-padded batches decode as if
    each sequence were alone.

    Example:
        >>> from m2convert.layers import M2SequenceMixer, to_recurrent
        >>> mixer = to_recurrent(M2SequenceMixer(16, mode="causal").eval(), 4, 512).model
        >>> y, state = recurrent_prefill(mixer, torch.randn(2, 7, 16))
        >>> y.shape, state.modes.shape, int(state.length)
        (torch.Size([2, 7, 16]), torch.Size([2, 16, 4]), 7)
    """
    _check_recurrent(mixer)
    z_tail, w, u = _prompt_inputs(mixer, x, mask)
    cplx = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    lam = mixer.filter.modes(torch.float64)[0].to(cplx)
    res_modes = None
    if u is not None:
        res_modes = _scan(mixer.residual_filter.modes(torch.float64)[0].to(cplx), u)
    length = torch.tensor(x.shape[1], dtype=torch.int64, device=x.device)
    return mixer(x, mask, rope), RecurrentState(z_tail.contiguous(), _scan(lam, w), res_modes, length,
                                                _window_cache(mixer, x, mask, rope))


def _check_recurrent(mixer) -> None:
    _check_causal(mixer)
    if not is_recurrent(mixer):
        raise ConfigError("recurrent decoding needs a mixer whose filters are in modal form; this one has "
                          f"{type(mixer.filter).__name__}: call m2.to_recurrent(model) first")


def recurrent_step(mixer, x_t: torch.Tensor, state: RecurrentState, rope=None) -> torch.Tensor:
    """Output for one new token per sequence at O(H S), updating ``state`` in place.

    ``y = x2 * (Re(sum_s r * modes) + (h0 + D) * w)`` with the state before this token, then
    ``modes = lam * modes + w`` (the residual filter likewise on the input).

    Args:
        mixer: the recurrent mixer the state came from.  x_t: (B, 1, H) or (B, H).
        state: from :func:`recurrent_prefill` or an earlier step.

    Returns:
        (B, 1, H) (or (B, H), matching x_t).

    Example:
        >>> from m2convert.layers import M2SequenceMixer, to_recurrent
        >>> mixer, x = to_recurrent(M2SequenceMixer(16, mode="causal").eval(), 4, 512).model, torch.randn(1, 6, 16)
        >>> _, state = recurrent_prefill(mixer, x[:, :5])
        >>> torch.allclose(recurrent_step(mixer, x[:, 5:], state), mixer(x)[:, 5:], atol=1e-5)
        True
    """
    squeeze = x_t.dim() == 2
    x = x_t if squeeze else x_t[:, 0]                                          # (B, H)
    if x.dim() != 2 or x.shape[-1] != mixer.d_model:
        raise ShapeError(f"recurrent_step expects x_t of shape (B, 1, {mixer.d_model}), got {tuple(x_t.shape)}")
    h = mixer.d_inner
    z = mixer.in_proj(x)                                                       # (B, 3H)
    c = _short_conv_step(mixer.short_conv, state.z_tail, z)                    # (B, 3H)
    # The prefill's layout, so a compiled step sees equal strides.
    state.z_tail = torch.cat([state.z_tail[..., 1:], z[..., None]], dim=-1)    # (B, 3H, kernel-1)
    x1, x2, v = c.split(h, dim=-1)
    y, state.modes = _mode_step(mixer.filter, state.modes, v * x1, mixer.D)
    y = x2 * y
    if state.res_modes is not None:
        y_res, state.res_modes = _mode_step(mixer.residual_filter, state.res_modes, x, mixer.D_res)
        y = y + y_res
    if state.window is not None:                          # the ring's slot: a plain int (a guard when compiled)
        y = _window_step(mixer, x, state, int(state.length), rope, y)
    y = _gated(mixer, x, y)
    state.length = state.length + 1
    out = mixer.out_proj(y)                                                    # (B, H)
    return out if squeeze else out[:, None]


def _short_conv_step(conv: torch.nn.Conv1d, tail: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv output (B, C) at the newest input z (B, C), the earlier ones in tail (B, C, K-1):
    one multiply-add per tap (a product and a sum over the K-wide window cost more ops at one token)."""
    weight = conv.weight[:, 0]                                                 # (C, K)
    c = torch.addcmul(conv.bias, z, weight[:, -1]) if conv.bias is not None else z * weight[:, -1]
    for k in range(tail.shape[-1]):
        c = torch.addcmul(c, tail[..., k], weight[:, k])
    return c


def _mode_step(filt: RecurrentFilter, modes: torch.Tensor, w: torch.Tensor, skip: torch.Tensor):
    """(convolution output (B, H), next modes (B, H, S)) of one input w (B, H) through modal filter ``filt``."""
    real = torch.float64 if w.dtype == torch.float64 else torch.float32       # half types: complex64 states
    lam, residue, h0 = filt.modes(real)                                        # (H, S), (H, S), (H,)
    wr = w.to(real)
    y = torch.addcmul(torch.einsum("bhs,hs->bh", modes, residue).real, h0 + skip.to(real), wr)   # (B, H)
    if eager_inference(modes, wr, lam, path="mixer"):
        # In place: a batch of thousands of sequences makes no (B, H, S) temporaries per step.
        return y.to(w.dtype), modes.mul_(lam).add_(wr[..., None])
    return y.to(w.dtype), lam * modes + wr[..., None]
