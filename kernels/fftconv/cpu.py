"""The M2 mixer's convolutions laid out for a CPU, for inference (no autograd).

Same arithmetic as the references (``reference.fft_long_conv`` and the mixer's short conv), arranged so
that nothing large is allocated and data stays in cache:

- FFT length: the smallest 2^a 3^b 5^c >= 2N. Any length >= 2N - 1 gives the same linear convolution
  (nothing wraps onto outputs 0..N-1), and 5-smooth lengths are the ones FFT libraries run fastest.
- Filter spectra are computed once (:func:`conv_spectrum`) and can be cached by the caller.
- :func:`mixer_core` runs short conv, gates, both long convolutions and the skips one block of channels
  at a time. Convolutions never mix channels, so a block of c channels needs only (B, c, L) buffers:
  a few MiB, recycled by the allocator, where whole-width intermediates of tens to hundreds of MiB each
  cost a page fault per 4 KiB on every call (the dominant cost at N >= 8192 on a busy machine).

Shapes: B batch, N tokens, H channels, L FFT length, F = L // 2 + 1 frequencies.

Example:
    >>> fft_size(2048), fft_size(509), fft_size(1)
    (4096, 1024, 2)
"""

from __future__ import annotations

from functools import lru_cache

import torch

# Bytes of one block's complex spectrum (B, G, c, F): small enough for the allocator to recycle.
BLOCK_BYTES = 4 << 20


@lru_cache(maxsize=256)
def fft_size(n: int) -> int:
    """The smallest even 5-smooth length >= 2n (a linear, not circular, convolution of length-n inputs)."""
    target = max(2 * n, 2)
    best = 1 << (target - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = 2 * p35                                   # even: a real FFT of half the length
            while size < target:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def conv_spectrum(k: torch.Tensor, k_rev: torch.Tensor | None, n_fft: int) -> torch.Tensor:
    """Frequency response of causal taps k (and anti-causal taps k_rev) for a length-n_fft transform.

    Args:
        k: (..., N) taps by offset 0..N-1.  k_rev: (..., N) or None.  n_fft >= 2N - 1.

    Returns:
        (..., n_fft // 2 + 1) complex: exactly the product operand of ``reference.fft_long_conv``.
    """
    k_f = torch.fft.rfft(k, n=n_fft)
    if k_rev is not None:
        # Reversal modulo n_fft conjugates the spectrum; offset 0 is counted once, by k.
        k_f += torch.fft.rfft(k_rev, n=n_fft).conj()
        k_f -= k_rev[..., :1]
    return k_f


def block_channels(batch: int, groups: int, n_fft: int, channels: int) -> int:
    """Channels per block so that a block's (B, G, c, F) complex spectrum is about BLOCK_BYTES."""
    per_channel = batch * groups * (n_fft // 2 + 1) * 8
    return max(1, min(channels, BLOCK_BYTES // per_channel))


def mixer_core(zt: torch.Tensor, x: torch.Tensor | None, spectrum, D: torch.Tensor,
               D_res: torch.Tensor | None, short_w: torch.Tensor, short_b: torch.Tensor | None,
               keep: torch.Tensor | None, n_fft: int, out: torch.Tensor | None = None,
               z_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The M2 mixer between its projections, channel block by channel block.

        c = short_conv(z * keep)                  z = in_proj(x), channels x1 | x2 | v
        u = v * x1 * keep
        y = x2 * (conv(u, spectrum[0]) + D * u) + conv(x * keep, spectrum[1]) + D_res * x * keep

    Args:
        zt: (B, 3H, N) in-projection output, channels first (rows of N contiguous is fastest; any
            strides work, e.g. ``z.transpose(1, 2)`` of a (B, N, 3H) tensor).
        x: (B, N, H) mixer input for the residual convolution, or None (no residual conv).
        spectrum: (G, H, F) complex filter responses from :func:`conv_spectrum`, G = 1 + (x is not None),
            or a callable (start, stop) -> (G, stop - start, F) making them one channel block at a time.
        D, D_res: (H,) skips.  short_w: (3H, K) causal depthwise taps (nn.Conv1d weight[:, 0]).
        short_b: (3H,) or None.  keep: (B, N) 0/1 in zt's dtype, or None.  n_fft: L >= 2N - 1.
        out: (B, H, N) tensor to write into (any strides), or None for a new contiguous one.
        z_bias: (3H,) in-projection bias still to be added to ``zt`` (added block by block, which
            spares a full pass over (B, 3H, N)), or None.

    Returns:
        (B, H, N): the input of the out-projection, channels first (``out`` when given).
    """
    b, h3, n = zt.shape
    h = h3 // 3
    groups = 1 if x is None else 2
    respond = spectrum if callable(spectrum) else lambda start, stop: spectrum[:, start:stop]
    yt = torch.empty(b, h, n, dtype=zt.dtype, device=zt.device) if out is None else out
    zg = zt.unflatten(1, (3, h))                                              # (B, x1|x2|v, H, N)
    w = short_w.view(3, h, short_w.shape[-1])                                 # (3, H, K)
    bias = None if short_b is None else short_b.view(3, h)
    zb = None if z_bias is None else z_bias.view(3, h)
    mask = None if keep is None else keep[:, None, None, :]                   # (B, 1, 1, N)
    step = block_channels(b, groups, n_fft, h)
    # Zero-padded transform input, reused by every block: only [..., :N] is ever written.
    pad = torch.zeros(b, groups, step, n_fft, dtype=zt.dtype, device=zt.device)
    for c0 in range(0, h, step):
        c1 = min(c0 + step, h)
        zc = zg[:, :, c0:c1]                                                  # (B, 3, c, N)
        if zb is not None:
            zc = zc + zb[:, c0:c1, None]
        if mask is not None:
            zc = zc * mask
        sc = _short_conv(zc, w[:, c0:c1], None if bias is None else bias[:, c0:c1])
        x1, x2, v = sc.unbind(1)                                              # 3 x (B, c, N)
        buf = pad[:, :, : c1 - c0]                                            # (B, G, c, L)
        u, xr = _fill_conv_inputs(buf, v, x1, None if x is None else x[..., c0:c1], keep)
        spec = torch.fft.rfft(buf, n=n_fft)                                   # (B, G, c, F)
        spec.mul_(respond(c0, c1))
        conv = torch.fft.irfft(spec, n=n_fft)[..., :n]                        # (B, G, c, N)
        y = yt[:, c0:c1]                                                      # (B, c, N)
        torch.addcmul(conv[:, 0], u, D[c0:c1, None], out=y)
        y.mul_(x2)
        if groups == 2:
            y.add_(conv[:, 1]).addcmul_(xr, D_res[c0:c1, None])
    return yt


def _short_conv(zc: torch.Tensor, wc: torch.Tensor, bc: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv of one channel block: zc (B, 3, c, N) by taps wc (3, c, K), plus bias bc (3, c)."""
    n, kernel = zc.shape[-1], wc.shape[-1]
    # Tap i reads the input K - 1 - i steps back; the last tap reads the current step.
    sc = zc * wc[..., kernel - 1, None]                                       # (B, 3, c, N)
    if bc is not None:
        sc += bc[..., None]
    for i in range(kernel - 1):
        shift = kernel - 1 - i
        if shift < n:
            sc[..., shift:].addcmul_(zc[..., : n - shift], wc[..., i, None])
    return sc


def _fill_conv_inputs(buf: torch.Tensor, v: torch.Tensor, x1: torch.Tensor, xc: torch.Tensor | None,
                      keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Write one block's long-convolution inputs into its zero-padded buffer ``buf`` (B, G, c, L):
    u = v * x1 * keep in group 0 and, when ``xc`` (B, N, c) is given, xc * keep in group 1.
    Returns their (B, c, N) views (None for the second without ``xc``)."""
    n = v.shape[-1]
    u = buf[:, 0, :, :n]
    torch.mul(v, x1, out=u)
    if keep is not None:
        u.mul_(keep[:, None, :])
    if xc is None:
        return u, None
    xr = buf[:, 1, :, :n]
    xr.copy_(xc.transpose(1, 2))                                              # (B, c, N)
    if keep is not None:
        xr.mul_(keep[:, None, :])
    return u, xr
