"""The M2 mixer's convolutions laid out for a CPU, for inference (no autograd).

Same arithmetic as the references (``reference.fft_long_conv`` and the mixer's short conv), arranged so
that nothing large is allocated and data stays in cache:

- FFT length: the smallest 2^a 3^b 5^c >= N + K - 1 for K taps each way (K <= N; the mixer passes the
  filters' support, ``ImplicitFilter.support``, when it is shorter than N). Any such length gives the
  same linear convolution (nothing wraps onto outputs 0..N-1), and 5-smooth lengths are the ones FFT
  libraries run fastest.
- Filter spectra (:func:`conv_spectrum`): one real FFT per filter, the anti-causal taps written
  reversed at the end of the same zero-padded signal; cached by the caller or made per channel block.
- :func:`mixer_core` runs short conv, gates, both long convolutions and the skips one block of channels
  at a time. Convolutions never mix channels, so a block of c channels needs only (B, c, L) buffers:
  a few MiB, recycled by the allocator, where whole-width intermediates of tens to hundreds of MiB each
  cost a page fault per 4 KiB on every call (the dominant cost at N >= 8192 on a busy machine).
  Given the in-projection as a callable, it also makes the projection's rows group by group, so a
  mixer's prefill holds no (B, 3H, N) tensor (150 MiB at H = 768, N = 16384), only its (B, H, N) output.

Shapes: B batch, N tokens, H channels, L FFT length, F = L // 2 + 1 frequencies.

Example:
    >>> fft_size(2048), fft_size(509), fft_size(1)
    (4096, 1024, 2)
"""

from __future__ import annotations

from functools import lru_cache

import torch

# Bytes of one block's complex spectrum (B, G, c, F): small enough for the allocator to recycle, and
# small enough that the few (B, G, c, L) buffers of a block are a few MiB against the (B, 3H, N)
# input (1 MiB measured as fast as 4 MiB at H = 768, N = 2048-8192, and 25 MiB less peak memory).
BLOCK_BYTES = 1 << 20


# A callable in-projection (see :func:`mixer_core`) is asked for rows of at least PROJECT_CHANNELS
# channels (3x that many GEMM rows: at H = 768 a 192-row GEMM ran 20-50% below a 768-row one, which reads
# the whole input once per group as well), and of about PROJECT_BYTES when more channels fit in that.
PROJECT_CHANNELS = 256
PROJECT_BYTES = 4 << 20


@lru_cache(maxsize=256)
def fft_size(n: int, taps: int | None = None) -> int:
    """The smallest 5-smooth multiple of 8 (below 8: power of two) >= n + taps - 1: a linear, not
    circular, convolution of a length-n input with ``taps`` causal (and as many anti-causal) taps
    (default n: >= 2n).

    A multiple of 8 because a real FFT of length L runs as a complex one of L / 2: 5-smooth lengths with
    only one or two factors of 2 (12500 = 4 * 5^5, 3750 = 2 * 3 * 5^4, 2916 = 4 * 3^6) measured
    1.2-1.6x the time per point of their multiple-of-8 neighbours (12800, 3840, 3072).

    Example:
        >>> fft_size(8192), fft_size(8192, taps=4300), fft_size(1)
        (16384, 12800, 2)
    """
    target = max(n + (n if taps is None else taps) - 1, 2)
    best = 1 << (target - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = 8 * p35                                   # a multiple of 8 (see above)
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

    Example:
        >>> k, k_rev = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
        >>> two = torch.fft.rfft(k, n=10) + torch.fft.rfft(k_rev, n=10).conj() - k_rev[:, :1]
        >>> torch.allclose(conv_spectrum(k, k_rev, 10), two)
        True
    """
    buf = k.new_zeros(*k.shape[:-1], n_fft)
    fill_taps(buf, k, k_rev)
    return torch.fft.rfft(buf)


def fill_taps(buf: torch.Tensor, k: torch.Tensor, k_rev: torch.Tensor | None) -> torch.Tensor:
    """Write taps into a zero-padded (..., L) signal whose real FFT is their response (L >= 2N - 1).

    k goes to offsets 0..N-1 and k_rev[1:] to offsets L-1 down to L-N+1 (reversal modulo L conjugates a
    real signal's spectrum; offset 0 is counted once, by k), so a bidirectional filter costs one
    transform instead of two. Only those ranges are written: the rest of ``buf`` must be (and stays) zero.

    Args:
        buf: (..., L) output.  k: (..., N).  k_rev: (..., N) or None.

    Returns:
        ``buf``.

    Example:
        >>> fill_taps(torch.zeros(7), torch.tensor([1., 2., 3.]), torch.tensor([9., 4., 5.]))
        tensor([1., 2., 3., 0., 0., 5., 4.])
    """
    n, size = k.shape[-1], buf.shape[-1]
    buf[..., :n] = k
    if k_rev is not None and n > 1:
        buf[..., size - n + 1:] = k_rev[..., 1:].flip(-1)
    return buf


def block_channels(batch: int, groups: int, n_fft: int, channels: int) -> int:
    """Channels per block so that a block's (B, G, c, F) complex spectrum is about BLOCK_BYTES."""
    per_channel = batch * groups * (n_fft // 2 + 1) * 8
    return max(1, min(channels, BLOCK_BYTES // per_channel))


def mixer_core(zt, x: torch.Tensor | None, spectrum, D: torch.Tensor,
               D_res: torch.Tensor | None, short_w: torch.Tensor, short_b: torch.Tensor | None,
               keep: torch.Tensor | None, n_fft: int, out: torch.Tensor | None = None,
               z_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The M2 mixer between its projections, channel block by channel block.

        c = short_conv(z * keep)                  z = in_proj(x), channels x1 | x2 | v
        u = v * x1 * keep
        y = x2 * (conv(u, spectrum[0]) + D * u) + conv(x * keep, spectrum[1]) + D_res * x * keep

    Args:
        zt: (B, 3H, N) in-projection output, channels first (rows of N contiguous is fastest; any
            strides work, e.g. ``z.transpose(1, 2)`` of a (B, N, 3H) tensor); or a callable
            (start, stop) -> (B, 3, stop - start, N) making the x1 | x2 | v rows of channels
            [start, stop) (bias included unless given as ``z_bias``) as the loop reaches them, so no
            (B, 3H, N) tensor exists: it is asked for PROJECT_BYTES-sized groups of whole blocks (then
            ``out`` is required).
        x: (B, N, H) mixer input for the residual convolution, or None (no residual conv). Its transpose
            is staged in the output, which must not overlap x.
        spectrum: (G, H, F) complex filter responses from :func:`conv_spectrum`, G = 1 + (x is not None),
            or a callable (start, stop) -> (G, stop - start, F_b) making them one channel block at a time,
            each block at its own FFT length 2 (F_b - 1) <= n_fft (one long enough for its taps).
        D, D_res: (H,) skips.  short_w: (3H, K) causal depthwise taps (nn.Conv1d weight[:, 0]).
        short_b: (3H,) or None.  keep: (B, N) 0/1 in zt's dtype, or None.  n_fft: L >= N + K - 1, the
            longest block's FFT length (K taps each way).
        out: (B, H, N) tensor to write into (any strides), or None for a new contiguous one.
        z_bias: (3H,) in-projection bias still to be added to ``zt`` or to the callable's rows, or None.
            Without ``keep`` it is folded into the short conv's bias (no pass over the rows at all);
            with ``keep`` it is added to each block's rows before the mask.

    Returns:
        (B, H, N): the input of the out-projection, channels first (``out`` when given).
    """
    if callable(zt):
        if out is None:
            raise ValueError("mixer_core: a callable zt needs out= (B, H, N) to give the shapes")
        project, (b, h, n), dtype = zt, out.shape, out.dtype
    else:
        b, h3, n = zt.shape
        h, dtype = h3 // 3, zt.dtype
        zg = zt.unflatten(1, (3, h))                                          # (B, x1|x2|v, H, N)
        project = lambda start, stop: zg[:, :, start:stop]                    # noqa: E731
    groups = 1 if x is None else 2
    respond = spectrum if callable(spectrum) else lambda start, stop: spectrum[:, start:stop]
    yt = torch.empty(b, h, n, dtype=dtype, device=D.device) if out is None else out
    w = short_w.view(3, h, short_w.shape[-1])                                 # (3, H, K)
    bias = None if short_b is None else short_b.view(3, h)
    zb = None if z_bias is None else z_bias.view(3, h)
    step = block_channels(b, groups, n_fft, h)
    # Projected rows come in groups of whole blocks, wide enough for a GEMM to run at speed.
    per_block = 3 * b * n * yt.element_size() * step                         # bytes of one block's rows
    wide = min(h, step * max(PROJECT_BYTES // per_block, -(-PROJECT_CHANNELS // step), 1))
    # Zero-padded transform input, reused by every block: only [..., :N] is ever written.
    pad = torch.zeros(b, groups, step, n_fft, dtype=dtype, device=D.device)
    if x is not None:
        # x^T staged in the output: one whole-matrix transpose (blocked, 2.3-2.6x faster than gathering each
        # block's channels from x's rows, measured at N = 2048-8192, H = 768), no extra memory: each block
        # copies its channels into its transform buffer before it writes its own output there.
        for i in range(b):
            yt[i].copy_(x[i].t())                                             # (H, N)
    for p0 in range(0, h, wide):
        zp = project(p0, min(p0 + wide, h))                                   # (B, 3, <= wide, N)
        for c0 in range(p0, min(p0 + wide, h), step):
            c1 = min(c0 + step, p0 + wide, h)
            zc = zp[:, :, c0 - p0: c1 - p0]                                   # (B, 3, c, N)
            zbc = None if zb is None else zb[:, c0:c1]
            if keep is not None:
                zc = zc * keep[:, None, None, :] if zbc is None else (zc + zbc[..., None]) * keep[:, None, None, :]
                zbc = None
            sc = _short_conv(zc, w[:, c0:c1], None if bias is None else bias[:, c0:c1], zbc)
            response = respond(c0, c1)                                        # (G, c, L_b // 2 + 1)
            size = 2 * (response.shape[-1] - 1)                               # this block's FFT length
            _conv_block(sc, pad[:, :, : c1 - c0, :size], None if x is None else yt[:, c0:c1], keep, response,
                        D[c0:c1], None if D_res is None else D_res[c0:c1], yt[:, c0:c1])
    return yt


def gated_conv(v: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, k: torch.Tensor, k_rev: torch.Tensor | None,
               D: torch.Tensor | None) -> torch.Tensor:
    """y = x2 * (conv(v * x1, k, k_rev) + D * v * x1), one block of channels at a time.

    What ``reference.gated_long_conv`` computes (and the CPU kernel of ``m2::gated_long_conv``, so an
    exported, lowered model runs it), with a 5-smooth FFT length and only (B + 1, c, L) transform buffers
    per block of c channels: the whole-width (B, H, L / 2 + 1) complex spectra never exist.

    Args:
        v, x1, x2: (B, H, N) float32 / float64.  k, k_rev: (H, N) taps (k_rev None: causal).  D: (H,) or None.

    Returns:
        (B, H, N), contiguous.

    Example:
        >>> from m2convert.kernels.fftconv.reference import gated_long_conv
        >>> v, x1, x2 = torch.randn(3, 2, 4, 9, dtype=torch.float64).unbind(0)
        >>> k, k_rev, D = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        >>> torch.allclose(gated_conv(v, x1, x2, k, k_rev, D), gated_long_conv(v, x1, x2, k, k_rev, D))
        True
    """
    b, h, n = v.shape
    n_fft = fft_size(n)
    y = torch.empty(b, h, n, dtype=v.dtype, device=v.device)
    step = block_channels(b + 1, 1, n_fft, h)                                 # signals and the filter
    # Zero-padded transform inputs, reused by every block: only their tap / signal ranges are written.
    pad = torch.zeros(b, 1, step, n_fft, dtype=v.dtype, device=v.device)    # (B, G = 1, c, L)
    kpad = torch.zeros(step, n_fft, dtype=v.dtype, device=v.device)         # (c, L)
    for c0 in range(0, h, step):
        c1 = min(c0 + step, h)
        u = pad[:, 0, : c1 - c0, :n]                                           # (B, c, N)
        torch.mul(v[:, c0:c1], x1[:, c0:c1], out=u)
        response = torch.fft.rfft(fill_taps(kpad[: c1 - c0], k[c0:c1], None if k_rev is None else k_rev[c0:c1]))
        _gated_block(pad[:, :, : c1 - c0], response[None], u, None if D is None else D[c0:c1], x2[:, c0:c1],
                     y[:, c0:c1])
    return y


def _conv_block(sc, buf, xc, keep, response, D, D_res, y) -> None:
    """Gates and long convolutions of one channel block: sc (B, 3, c, N) short-conv output, buf
    (B, G, c, L) zeroed transform input, xc (B, c, N) or None (read before y is written: it may be y),
    response (G, c, F); writes y (B, c, N)."""
    x1, x2, v = sc.unbind(1)                                                  # 3 x (B, c, N)
    u, xr = _fill_conv_inputs(buf, v, x1, xc, keep)
    conv = _gated_block(buf, response, u, D, x2, y)
    if xr is not None:
        y.add_(conv[:, 1]).addcmul_(xr, D_res[:, None])


def _gated_block(buf: torch.Tensor, response: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None,
                 x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gated long convolution of one channel block, the step both CPU kernels share.

    Transforms the zero-padded inputs ``buf`` (B, G, c, L) (group 0 holds u), multiplies by ``response``
    (G, c, L // 2 + 1), transforms back and writes y (B, c, N) = x2 * (conv_0 + D * u) (D (c,) or None).
    Returns every group's convolution (B, G, c, N), a view the caller may still read (group 1 onward).
    """
    n_fft, n = buf.shape[-1], u.shape[-1]
    spec = torch.fft.rfft(buf, n=n_fft)                                       # (B, G, c, F)
    spec.mul_(response)
    conv = torch.fft.irfft(spec, n=n_fft)[..., :n]                            # (B, G, c, N)
    if D is None:
        y.copy_(conv[:, 0])
    else:
        torch.addcmul(conv[:, 0], u, D[:, None], out=y)
    y.mul_(x2)
    return conv


def _short_conv(zc: torch.Tensor, wc: torch.Tensor, bc: torch.Tensor | None,
                zb: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise conv of one channel block: zc (B, 3, c, N) by taps wc (3, c, K), plus bias bc (3, c).

    zb: (3, c) bias of the input not yet added to zc, or None. It rides in the conv's own bias instead of
    a pass over zc: conv(z + zb) = conv(z) + zb * (the sum of the taps that reach inside the sequence),
    all K taps from step K - 1 on, fewer before.
    """
    n, kernel = zc.shape[-1], wc.shape[-1]
    if zb is not None:
        folded = zb * wc.sum(-1)                                              # (3, c)
        bc = folded if bc is None else bc + folded
    # Tap i reads the input K - 1 - i steps back; the last tap reads the current step.
    sc = zc * wc[..., kernel - 1, None]                                       # (B, 3, c, N)
    if bc is not None:
        # A pass of its own: addcmul with the bias broadcast as its first operand ran 2x slower than
        # this multiply and add together (the broadcast operand keeps it off the vectorized loop).
        sc.add_(bc[..., None])
    for i in range(kernel - 1):
        shift = kernel - 1 - i
        if shift < n:
            sc[..., shift:].addcmul_(zc[..., : n - shift], wc[..., i, None])
        if zb is not None:
            # Steps before ``shift``: this tap reads the zero padding, not zb.
            sc[..., : min(shift, n)] -= (zb * wc[..., i])[..., None]
    return sc


def _fill_conv_inputs(buf: torch.Tensor, v: torch.Tensor, x1: torch.Tensor, xc: torch.Tensor | None,
                      keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Write one block's long-convolution inputs into its zero-padded buffer ``buf`` (B, G, c, L):
    u = v * x1 * keep in group 0 and, when ``xc`` (B, c, N) is given, xc * keep in group 1.
    Returns their (B, c, N) views (None for the second without ``xc``)."""
    n = v.shape[-1]
    u = buf[:, 0, :, :n]
    torch.mul(v, x1, out=u)
    if keep is not None:
        u.mul_(keep[:, None, :])
    if xc is None:
        return u, None
    xr = buf[:, 1, :, :n]
    xr.copy_(xc)                                                              # (B, c, N)
    if keep is not None:
        xr.mul_(keep[:, None, :])
    return u, xr
