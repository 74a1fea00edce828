"""M2SequenceMixer: the gated long-convolution mixer that replaces attention.

    x (B, N, H) -> in_proj -> x1, x2, v (each (B, H, N)) -> depthwise short conv (kernel 3)
      -> y = x2 * (long_conv(v * x1, k) + D * (v * x1))            gated long convolution
      -> y += long_conv(x, k_res) + D_res * x                       residual long convolution
      -> out_proj -> (B, N, H)

Modes: "bidirectional" (encoders: forward + reverse filters, FFT of size 2N), "causal" (forward filter,
zero-padded FFT of size 2N) and "causal-monarch" (the same causal convolution evaluated/interpolated
with a Monarch-factorised DFT of length 2N; the same parameters as "causal").

Eager CPU inference in the FFT modes (nothing needs a gradient, not tracing) runs the same arithmetic
through ``kernels.fftconv.cpu``: a 5-smooth FFT length >= N + K - 1, channels in blocks that stay in
cache, and, in eval mode, the filters' spectra cached per length. K is N, or the filters' support
where that is shorter (their decay is fixed, so past K = 4310 taps at the default filter_scale every
tap together holds under 1e-9 of its channel's bound; at N = 8192 the transforms are 12800 points, not
16384, and the filters are made for 4310 offsets, not 8192). Training, tracing (whose graph the lowering
pass rewrites), "causal-monarch" and other devices run the reference below.
"""

from __future__ import annotations

import weakref

import sympy
import torch
from torch import nn

from ..errors import ShapeError, check_choice, check_int
from ..kernels.fftconv.cpu import block_channels, fft_size, fill_taps, mixer_core
from ..kernels.fftconv.monarch_dft import monarch_long_conv
from ..kernels.fftconv.reference import fft_long_conv
from .base import M2Block, hooked
from .cost import B, N, substitute, fft_conv_flops, linear_flops, monarch_conv_flops
from .filters import TAIL_TOL, ImplicitFilter
from .monarch import MonarchLinear, eager_inference

MODES = ("bidirectional", "causal", "causal-monarch")
SHORT_KERNEL = 3                # taps of the short convolution before the long one (its default)
# Mixers that have held a filter-spectrum cache entry (weakly: a dropped model leaves no trace here).
_HOLDERS: "weakref.WeakSet[M2SequenceMixer]" = weakref.WeakSet()
# Filter channels whose taps are made in one GEMM when responses are built block by block: at most
# TAP_CHANNELS, fewer when one filter's (heads, c, N) taps would pass TAP_BYTES (their GEMM, bias and
# decay temporaries otherwise outgrow the convolution's own buffers: 35 MiB at H = 768, N = 8192).
TAP_CHANNELS = 64
TAP_BYTES = 1 << 20


class M2SequenceMixer(M2Block):
    """Sub-quadratic sequence mixer of Monarch Mixer (M2-BERT / M2-GPT style).

    Args:
        d_model: width H.
        mode: "bidirectional" | "causal" | "causal-monarch".
        filter_order: width of the implicit filter MLP (default 128).
        filter_emb_dim: positional features of the filter (odd, default 5).
        filter_scale: tokens per unit offset in the filter features (fixes its frequencies/decay).
        short_kernel: depthwise short convolution width (default 3, causal).
        residual_conv: add the residual long convolution of the input with its skip D.
        projection_nblocks: 0 (default) for dense nn.Linear in/out projections; n >= 1 for MonarchLinear
            ones with n blocks per factor (n <= d_model) and rank ``projection_rank``.
        filter_window: keep only the long filters' offsets 0..filter_window-1 per direction (a converted
            local attention layer: each output then sees at most filter_window + short_kernel - 1 tokens
            back, and filter_window ahead when bidirectional). None: every offset.

    Shapes: forward(x: (B, N, H), mask: (B, N) with 1 = token, 0 = padding, or None) -> (B, N, H).
    Positions where mask == 0 are zeroed before every convolution, so real positions never see
    padding and a sequence's outputs do not depend on how it was batched.

    Filter cache: in eval mode, under ``torch.no_grad()`` / ``torch.inference_mode()``, the filters'
    spectra for the last sequence length are kept: one (G, H, L/2 + 1) complex tensor, G = 2 with the
    residual conv, about 16 * H * N bytes in fp32 (twice one attention layer's fp32 K/V cache; 48 MiB
    at H = 768, N = 4096), when it fits both ``filter_cache_bytes`` (this mixer; default 256 MiB) and
    what ``filter_cache_total_bytes`` (all mixers of the process together; default 16 MiB) leaves after
    the other mixers' entries. A 12-layer H = 768 encoder keeps every layer's spectra up to N ~ 100 and
    a few layers' up to N ~ 1000, so its memory stays that of its activations at any N. The others make
    their filters per call, a channel block at a time inside the convolution (one real FFT per filter
    and block; at H = 768, 20-25% more mixer time than a cached call at N = 2048, which a whole
    BERT-base forward does not resolve from timing noise, and 28% more at N = 8192, about 15% of a
    BERT-base forward there). The entry is rebuilt when any filter parameter
    or buffer changes (tensor identity, storage or in-place version), the dtype or device changes, and
    dropped on ``train()``/``eval()``, ``.to()`` and when a call at another length does not fit. Set
    either limit (class or instance) to trade memory for time; 0 turns the cache off.

    Example:
        >>> mixer = M2SequenceMixer(96, mode="causal")
        >>> mixer(torch.randn(2, 63, 96)).shape
        torch.Size([2, 63, 96])
    """

    filter_cache_bytes = 256 << 20
    filter_cache_total_bytes = 16 << 20

    def __init__(self, d_model: int, mode: str = "bidirectional", filter_order: int = 128,
                 filter_emb_dim: int = 5, filter_scale: float = 512.0, short_kernel: int = SHORT_KERNEL,
                 residual_conv: bool = True, projection_nblocks: int = 0, projection_rank: int = 1,
                 filter_window: int | None = None, device=None, dtype=None):
        super().__init__()
        check_int("d_model", d_model, low=1)
        check_int("projection_nblocks", projection_nblocks, low=0)
        check_choice("mode", mode, MODES)
        check_int("short_kernel", short_kernel, low=1)
        self.d_model, self.mode, self.short_kernel = d_model, mode, short_kernel
        heads = 2 if mode == "bidirectional" else 1
        factory = {"device": device, "dtype": dtype}
        self.in_proj = _projection(d_model, 3 * d_model, projection_nblocks, projection_rank, factory)
        self.short_conv = nn.Conv1d(3 * d_model, 3 * d_model, short_kernel, groups=3 * d_model,
                                    padding=short_kernel - 1, **factory)
        local = {"window": filter_window}                            # a local attention layer's offsets
        self.filter = ImplicitFilter(d_model, heads, filter_order, filter_emb_dim, filter_scale, **local).to(**factory)
        self.D = nn.Parameter(torch.ones(d_model, **factory))
        self.residual_filter = None
        if residual_conv:
            self.residual_filter = ImplicitFilter(d_model, heads, filter_order, filter_emb_dim,
                                                  filter_scale, **local).to(**factory)
            self.D_res = nn.Parameter(torch.zeros(d_model, **factory))
        self.out_proj = _projection(d_model, d_model, projection_nblocks, projection_rank, factory)
        self._spectrum_cache = None                                   # (key, (G, H, F) complex)
        with torch.no_grad():
            # Start the short conv as the identity (tap on the current token) so that seeded
            # projections pass through unchanged.
            self.short_conv.weight.zero_()
            self.short_conv.weight[:, 0, -1] = 1.0
            self.short_conv.bias.zero_()

    def seed_projections(self, q, k, v, o) -> None:
        """Copy pretrained attention weights: Q, K, V -> in_proj (x1, x2, v), O -> out_proj.

        Each argument is a (weight (H, H), bias (H,) or None) pair in nn.Linear convention. MonarchLinear
        projections get the Frobenius projection of the stacked (3H, H) Q|K|V and of the (H, H) O weight.
        """
        h = self.d_model
        for name, (w, _) in (("q", q), ("k", k), ("v", v), ("o", o)):
            if tuple(w.shape) != (h, h):
                raise ShapeError(f"seed_projections: {name} weight has shape {tuple(w.shape)}, expected {(h, h)}")

        def bias(w, b):
            return b if b is not None else torch.zeros(h, dtype=w.dtype, device=w.device)

        w_in = torch.cat([q[0], k[0], v[0]])                                  # (3H, H) rows x1 | x2 | v
        b_in = torch.cat([bias(*q), bias(*k), bias(*v)])                      # (3H,)
        _load_projection(self.in_proj, w_in, b_in)
        _load_projection(self.out_proj, o[0], bias(*o))                       # (H, H), (H,)

    def long_conv(self, u: torch.Tensor, filt: ImplicitFilter, D: torch.Tensor) -> torch.Tensor:
        """Long convolution of u (B, H, N) with the filter's taps and skip D, in this mixer's mode."""
        taps = filt(u.shape[-1])                                              # (heads, H, N)
        if self.mode == "bidirectional":
            return fft_long_conv(u, taps[0], taps[1], D)
        if self.mode == "causal":
            return fft_long_conv(u, taps[0], None, D)
        return monarch_long_conv(u, taps[0], D)

    def train(self, mode: bool = True):
        self._spectrum_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._spectrum_cache = None
        return super()._apply(fn, recurse)

    def _filter_state(self):
        """Identity, storage and version of every filter tensor; None when they cannot be tracked."""
        state = []
        for f in self._filters():
            for t in (*f.parameters(), *f.buffers()):
                if t.is_inference():                     # no version counter: changes would go unseen
                    return None
                state.append((id(t), t.data_ptr(), t._version))
        return tuple(state)

    def _filters(self) -> list[ImplicitFilter]:
        return [self.filter] + ([self.residual_filter] if self.residual_filter is not None else [])

    def channel_taps(self, n: int, dtype: torch.dtype = torch.float32) -> list[int]:
        """Taps per direction the eager CPU path convolves each channel with at length n: n, or the
        filters' support for it (:meth:`ImplicitFilter.channel_support`, the longer filter's) when that
        is shorter: the taps past it add at most TAIL_TOL of the channel's amplitude bound (1e-9 in
        float32, 1e-18 in float64), and a block of channels with K taps needs a transform of only
        n + K - 1 points.

        Example:
            >>> mixer = M2SequenceMixer(8, filter_scale=16.0)
            >>> max(mixer.channel_taps(100)), max(mixer.channel_taps(10_000)) == mixer.filter.support()
            (100, True)
        """
        # Filters without a bound (a RecurrentFilter's modes need not decay) keep every tap.
        each = [f.channel_support(TAIL_TOL[dtype]) if isinstance(f, ImplicitFilter) else None
                for f in self._filters()]
        if None in each:
            return [n] * self.d_model
        return [min(n, max(ks)) for ks in zip(*each)]

    def spectrum_blocks(self, n: int, dtype: torch.dtype, taps: list[int] | None = None):
        """``block(start, stop, size=None) -> (G, stop - start, L // 2 + 1)`` complex responses for a
        length-n input of channels [start, stop), each cut to its ``taps`` (default n; see
        :meth:`channel_taps`), at FFT length L = ``size`` or else the block's own fft_size(n, K), K the
        block's longest taps (the convolution reads L back from the response's length).

        For increasing, adjacent blocks (as the convolution asks for them). The filter MLP trunks run
        once, here; taps are made for up to TAP_CHANNELS channels at a time (a GEMM wide enough to run
        at speed, about TAP_BYTES) and transformed block by block, so no (heads, H, N) tensor is built.
        """
        taps = [n] * self.d_model if taps is None else taps
        longest = max(taps)
        trunks = [(f, f.trunk(longest).to(dtype)) for f in self._filters()]   # (K, order) each
        bidirectional = self.mode == "bidirectional"
        heads = 2 if bidirectional else 1
        width = max(1, min(TAP_CHANNELS, TAP_BYTES // (heads * longest * torch.finfo(dtype).bits // 8)))
        held = {"range": (0, 0), "taps": None}

        def block(start: int, stop: int, size: int | None = None) -> torch.Tensor:
            lo, hi = held["range"]
            if not (lo <= start and stop <= hi):
                lo, hi = start, min(max(stop, start + width), self.d_model)
                k = max(taps[lo:hi])
                held["range"], held["taps"] = (lo, hi), [f.taps(t[:k], lo, hi) for f, t in trunks]
            k = max(taps[start:stop])
            pad = torch.zeros(len(trunks), stop - start, size or fft_size(n, k), dtype=dtype,
                              device=self.D.device)                           # (G, c, L)
            for g, made in enumerate(held["taps"]):                           # (heads, hi - lo, >= k)
                kb = made[:, start - lo: stop - lo, :k]
                fill_taps(pad[g], kb[0], kb[1] if bidirectional else None)
            return torch.fft.rfft(pad)                                        # (G, c, F)
        return block

    def filter_spectrum(self, n: int, n_fft: int, dtype: torch.dtype, taps: list[int] | None = None):
        """(G, H, n_fft // 2 + 1) complex responses of the gated (and residual) filters for a length-n
        input, each channel cut to its ``taps`` (default n; n_fft >= n + max(taps) - 1).

        Cached for the last (n, n_fft, dtype) in eval mode when gradients are off (see the class notes);
        when the entry would exceed ``filter_cache_bytes`` this returns :meth:`spectrum_blocks`'s
        callable instead, and the convolution makes each block's responses as it goes.
        """
        g, f = len(self._filters()), n_fft // 2 + 1
        cplx = torch.complex128 if dtype == torch.float64 else torch.complex64
        nbytes = g * self.d_model * f * cplx.itemsize
        key = None
        if not self.training and not torch.is_grad_enabled():
            state = self._filter_state()
            key = None if state is None else (n, n_fft, self.mode, dtype, self.D.device, state)
            cached = getattr(self, "_spectrum_cache", None)
            if key is not None and cached is not None and cached[0] == key:
                return cached[1]
            self._spectrum_cache = None                  # stale: its bytes go back to the shared budget
            if nbytes > min(self.filter_cache_bytes, self.filter_cache_total_bytes - _cached_bytes()):
                key = None
        block = self.spectrum_blocks(n, dtype, taps)
        if key is None:
            return block
        spectrum = torch.empty(g, self.d_model, f, dtype=cplx, device=self.D.device)
        step = block_channels(1, g, n_fft, self.d_model)
        for start in range(0, self.d_model, step):
            stop = min(start + step, self.d_model)
            spectrum[:, start:stop] = block(start, stop, n_fft)
        self._spectrum_cache = (key, spectrum)
        _HOLDERS.add(self)
        return spectrum

    def _forward_fast(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, n, h = x.shape
        taps = self.channel_taps(n, x.dtype)
        n_fft = fft_size(n, max(taps))
        proj_in, proj_out = self.in_proj, self.out_proj
        # Both projections hand the long convolution channels-first data without a transpose copy.
        z_bias = None
        if type(proj_in) is nn.Linear:
            # W @ x^T a group of channels at a time, inside the core: no (B, 3H, N) tensor is made.
            zt, z_bias = _rows_of(proj_in, x), proj_in.bias
        elif isinstance(proj_in, MonarchLinear):
            zt = proj_in.matmul(x.reshape(b * n, h), out_channels_first=True)   # (3H, B*N)
            zt = zt.view(-1, b, n).transpose(0, 1)                            # (B, 3H, N)
        else:
            zt = proj_in(x).transpose(1, 2)                                   # (B, 3H, N)
        spectrum = self.filter_spectrum(n, n_fft, x.dtype, taps)              # (G, H, F) or blocks
        residual = self.residual_filter is not None
        monarch_out = isinstance(proj_out, MonarchLinear)
        if monarch_out:
            yt = torch.empty(h, b, n, dtype=x.dtype, device=x.device).transpose(0, 1)
        else:
            yt = torch.empty(b, h, n, dtype=x.dtype, device=x.device)
        yt = mixer_core(zt, x if residual else None, spectrum, self.D, self.D_res if residual else None,
                        self.short_conv.weight[:, 0], self.short_conv.bias, keep, n_fft, out=yt,
                        z_bias=z_bias)                                        # (B, H, N)
        if type(proj_out) is nn.Linear:
            # y W^T + b with y read through its transpose: BLAS takes the strided operand as is.
            w = proj_out.weight.t().expand(b, -1, -1)                         # (B, H, H)
            return torch.baddbmm(proj_out.bias.expand(b, n, -1), yt.transpose(1, 2), w)   # (B, N, H)
        if monarch_out:
            y = proj_out.matmul(yt.transpose(0, 1).reshape(h, b * n), x_channels_first=True)   # (B*N, H)
            return y.view(b, n, -1)
        return proj_out(yt.transpose(1, 2))                                   # (B, N, H)

    def _fast_path(self, x: torch.Tensor, mask: torch.Tensor | None) -> bool:
        if self.mode == "causal-monarch" or x.dtype not in (torch.float32, torch.float64):
            return False
        if self.short_conv.padding != (self.short_kernel - 1,) or self.D.dtype != x.dtype:
            return False
        # The fast path reads the projections' and filters' weights without calling them: hooks and
        # parametrizations on them would be skipped, so it steps aside when there are any.
        return eager_inference(x, mask, *self.parameters(), path="mixer") and not hooked(*self.children())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ShapeError(f"M2SequenceMixer expects x of shape (B, N, {self.d_model}), got {tuple(x.shape)}")
        b, n, h = x.shape
        if n == 0:
            raise ShapeError("M2SequenceMixer got an empty sequence (N = 0); inputs need N >= 1")
        keep = None
        if mask is not None:
            if tuple(mask.shape) != (b, n):
                raise ShapeError(f"mask must have shape (B, N) = {(b, n)}, got {tuple(mask.shape)}")
            keep = mask.to(x.dtype)[:, None, :]                               # (B, 1, N)
        if self._fast_path(x, mask):
            return self._forward_fast(x, None if keep is None else keep[:, 0])
        z = self.in_proj(x).transpose(1, 2)                                   # (B, 3H, N)
        if keep is not None:
            z = z * keep
        z = self.short_conv(z)[..., :n]                                       # (B, 3H, N) causal
        x1, x2, v = z.split(h, dim=1)                                         # 3 x (B, H, N)
        v = v * x1
        if keep is not None:
            v = v * keep
        y = x2 * self.long_conv(v, self.filter, self.D)                       # (B, H, N)
        if self.residual_filter is not None:
            u = x.transpose(1, 2)                                             # (B, H, N)
            if keep is not None:
                u = u * keep
            y = y + self.long_conv(u, self.residual_filter, self.D_res)
        return self.out_proj(y.transpose(1, 2))                               # (B, N, H)

    def flops(self, seq_len=None, batch=None) -> sympy.Expr:
        h = self.d_model
        bidir = self.mode == "bidirectional"
        conv = monarch_conv_flops(h) if self.mode == "causal-monarch" else fft_conv_flops(h, bidir)
        convs = 2 if self.residual_filter is not None else 1
        # Projections swapped for other M2 blocks (e.g. MonarchLinear) report their own cost.
        projections = [p.flops() if isinstance(p, M2Block) else linear_flops(h, f)
                       for p, f in ((self.in_proj, 3 * h), (self.out_proj, h))]
        expr = (sum(projections)
                + B * N * 3 * h * 2 * self.short_kernel                       # depthwise short conv
                + B * N * h * 4                                               # gates and skips
                + convs * conv)
        return substitute(expr, seq_len, batch)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, mode={self.mode!r}, residual_conv={self.residual_filter is not None}"


def _rows_of(proj: nn.Linear, x: torch.Tensor):
    """``(start, stop) -> (B, 3, stop - start, N)``: the x1 | x2 | v rows of channels [start, stop) of
    ``x W^T`` for x (B, N, H), channels first, without the bias (``mixer_core`` adds it a block at a
    time: a GEMM started from the broadcast bias first copies it over the whole group)."""
    b, n, h = x.shape
    w3 = proj.weight.view(3, -1, h)                                           # (3, H, H)
    xt = x.transpose(1, 2)                                                    # (B, H, N), read in place

    def rows(start: int, stop: int) -> torch.Tensor:
        w = w3[:, start:stop].reshape(-1, h).expand(b, -1, -1)                # (B, 3c, H)
        return torch.bmm(w, xt).view(b, 3, stop - start, n)                   # (B, 3c, N)
    return rows


def _cached_bytes() -> int:
    """Bytes of filter spectra that live mixers hold in their caches right now."""
    total = 0
    for mixer in list(_HOLDERS):
        cached = getattr(mixer, "_spectrum_cache", None)
        if cached is not None:
            total += cached[1].numel() * cached[1].element_size()
    return total


def _projection(in_features: int, out_features: int, nblocks: int, rank: int, factory: dict) -> nn.Module:
    """Dense nn.Linear (nblocks 0) or MonarchLinear (nblocks >= 1) in -> out projection."""
    if nblocks == 0:
        return nn.Linear(in_features, out_features, **factory)
    return MonarchLinear(in_features, out_features, nblocks=nblocks, rank=rank, **factory)


def _load_projection(proj: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Set a projection to the dense (out, in) ``weight`` and (out,) ``bias``; projected if Monarch."""
    with torch.no_grad():
        if isinstance(proj, MonarchLinear):
            fit = MonarchLinear.from_weight(weight, bias, nblocks=proj.nblocks, rank=proj.rank)
            for name in ("w1", "w2", "bias"):
                getattr(proj, name).copy_(getattr(fit, name))
        else:
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
