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


import sympy
import torch
from torch import nn

from ..errors import ConfigError, ShapeError, check_choice, check_int
from ..kernels.fftconv.cpu import fft_size, mixer_core
from ..kernels.fftconv.monarch_dft import monarch_long_conv
from ..kernels.fftconv.reference import fft_long_conv
from .base import M2Block, hooked
from .cost import B, N, substitute, fft_conv_flops, linear_flops, monarch_conv_flops
from .filters import ImplicitFilter
from .monarch import MonarchLinear, eager_inference
from .window import WindowAttention
from .spectra import FilterSpectra, _cached_bytes  # noqa: F401  (_cached_bytes: the benchmarks read it here)

MODES = ("bidirectional", "causal", "causal-monarch")
SHORT_KERNEL = 3                # taps of the short convolution before the long one (its default)


class M2SequenceMixer(FilterSpectra, M2Block):
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
        window: add exact softmax attention over the last ``window`` tokens (``window // 2`` on either
            side when bidirectional) to the mixer's channels before out_proj
            (:class:`~m2convert.layers.window.WindowAttention`, its own Q, K, V projections); None: none.
        window_heads: (heads, kv_heads, head_dim) of that attention, heads * head_dim == d_model; default
            one head per 64 channels. window_scale: its softmax scale (default head_dim ** -0.5).
        output_gate: multiply the channels by sigmoid(output_gate(x)) (an nn.Linear H -> D) before out_proj,
            as gated attention does (Qwen3-Next); False: no gate.
        d_inner: the channels D mixed along the sequence (default H): in_proj maps H -> 3D and out_proj
            D -> H, as attention whose heads are wider or narrower than the model (heads x head_dim != H).
            The residual long convolution of the input needs D == H.

    Shapes: forward(x: (B, N, H), mask: (B, N) with 1 = token, 0 = padding, or None, rope: the (cos, sin)
    rotary embeddings the window attention applies, or None) -> (B, N, H).
    Positions where mask == 0 are zeroed before every convolution, so real positions never see
    padding and a sequence's outputs do not depend on how it was batched.

    Filter cache: see :class:`~m2convert.layers.spectra.FilterSpectra`.

    Example:
        >>> mixer = M2SequenceMixer(96, mode="causal")
        >>> mixer(torch.randn(2, 63, 96)).shape
        torch.Size([2, 63, 96])
    """

    def __init__(self, d_model: int, mode: str = "bidirectional", filter_order: int = 128,
                 filter_emb_dim: int = 5, filter_scale: float = 512.0, short_kernel: int = SHORT_KERNEL,
                 residual_conv: bool = True, projection_nblocks: int = 0, projection_rank: int = 1,
                 filter_window: int | None = None, window: int | None = None,
                 window_heads: tuple[int, int, int] | None = None, window_scale: float | None = None,
                 output_gate: bool = False, d_inner: int | None = None, device=None, dtype=None):
        super().__init__()
        check_int("d_model", d_model, low=1)
        d_inner = d_model if d_inner is None else check_int("d_inner", d_inner, low=1)
        if residual_conv and d_inner != d_model:
            raise ConfigError(f"residual_conv=True convolves the input (width {d_model}) into the mixer's "
                              f"{d_inner} channels: pass residual_conv=False where d_inner != d_model")
        check_int("projection_nblocks", projection_nblocks, low=0)
        check_choice("mode", mode, MODES)
        check_int("short_kernel", short_kernel, low=1)
        self.d_model, self.d_inner, self.mode, self.short_kernel = d_model, d_inner, mode, short_kernel
        heads = 2 if mode == "bidirectional" else 1
        factory = {"device": device, "dtype": dtype}
        self.in_proj = _projection(d_model, 3 * d_inner, projection_nblocks, projection_rank, factory)
        self.short_conv = nn.Conv1d(3 * d_inner, 3 * d_inner, short_kernel, groups=3 * d_inner,
                                    padding=short_kernel - 1, **factory)
        local = {"window": filter_window}                            # a local attention layer's offsets
        self.filter = ImplicitFilter(d_inner, heads, filter_order, filter_emb_dim, filter_scale, **local).to(**factory)
        self.D = nn.Parameter(torch.ones(d_inner, **factory))
        self.residual_filter = None
        if residual_conv:
            self.residual_filter = ImplicitFilter(d_model, heads, filter_order, filter_emb_dim,
                                                  filter_scale, **local).to(**factory)
            self.D_res = nn.Parameter(torch.zeros(d_model, **factory))
        self.out_proj = _projection(d_inner, d_model, projection_nblocks, projection_rank, factory)
        self.window_attention = None if window is None else _window_attention(
            d_model, d_inner, window, window_heads, window_scale, mode != "bidirectional", factory)
        self.output_gate = nn.Linear(d_model, d_inner, **factory) if output_gate else None
        self._spectrum_cache = None                                   # (key, (G, H, F) complex)
        with torch.no_grad():
            # Start the short conv as the identity (tap on the current token) so that seeded
            # projections pass through unchanged.
            self.short_conv.weight.zero_()
            self.short_conv.weight[:, 0, -1] = 1.0
            self.short_conv.bias.zero_()

    def seed_projections(self, q, k, v, o) -> None:
        """Copy pretrained attention weights: Q, K, V -> in_proj (x1, x2, v), O -> out_proj.

        Each argument is a (weight, bias or None) pair in nn.Linear convention: Q, K, V (D, H) and
        O (H, D). MonarchLinear projections get the Frobenius projection of the stacked (3D, H) Q|K|V and
        of the (H, D) O weight.
        """
        h, d = self.d_model, self.d_inner
        for name, (w, _) in (("q", q), ("k", k), ("v", v), ("o", o)):
            expected = (h, d) if name == "o" else (d, h)
            if tuple(w.shape) != expected:
                raise ShapeError(f"seed_projections: {name} weight has shape {tuple(w.shape)}, expected {expected}")

        def bias(w, b):
            return b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)

        w_in = torch.cat([q[0], k[0], v[0]])                                  # (3D, H) rows x1 | x2 | v
        b_in = torch.cat([bias(*q), bias(*k), bias(*v)])                      # (3D,)
        _load_projection(self.in_proj, w_in, b_in)
        _load_projection(self.out_proj, o[0], bias(*o))                       # (H, D), (H,)

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

    def _filters(self) -> list[ImplicitFilter]:
        return [self.filter] + ([self.residual_filter] if self.residual_filter is not None else [])

    def _forward_fast(self, x: torch.Tensor, keep: torch.Tensor | None, windowed=None) -> torch.Tensor:
        b, n, h = x.shape
        d = self.d_inner
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
            yt = torch.empty(d, b, n, dtype=x.dtype, device=x.device).transpose(0, 1)
        else:
            yt = torch.empty(b, d, n, dtype=x.dtype, device=x.device)
        yt = mixer_core(zt, x if residual else None, spectrum, self.D, self.D_res if residual else None,
                        self.short_conv.weight[:, 0], self.short_conv.bias, keep, n_fft, out=yt,
                        z_bias=z_bias)                                        # (B, H, N)
        if windowed is not None:
            yt += windowed                                                    # the window attention's channels
        if self.output_gate is not None:
            yt *= torch.sigmoid(self.output_gate(x)).transpose(1, 2)
        if type(proj_out) is nn.Linear:
            # y W^T + b with y read through its transpose: BLAS takes the strided operand as is.
            w = proj_out.weight.t().expand(b, -1, -1)                         # (B, D, H)
            return torch.baddbmm(proj_out.bias.expand(b, n, -1), yt.transpose(1, 2), w)   # (B, N, H)
        if monarch_out:
            y = proj_out.matmul(yt.transpose(0, 1).reshape(d, b * n), x_channels_first=True)   # (B*N, H)
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rope=None) -> torch.Tensor:
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
        windowed = None
        if self.window_attention is not None:
            windowed = self.window_attention(x, mask, rope).transpose(1, 2)   # (B, H, N)
        if self._fast_path(x, mask):
            return self._forward_fast(x, None if keep is None else keep[:, 0], windowed)
        z = self.in_proj(x).transpose(1, 2)                                   # (B, 3H, N)
        if keep is not None:
            z = z * keep
        z = self.short_conv(z)[..., :n]                                       # (B, 3H, N) causal
        x1, x2, v = z.split(self.d_inner, dim=1)                              # 3 x (B, D, N)
        v = v * x1
        if keep is not None:
            v = v * keep
        y = x2 * self.long_conv(v, self.filter, self.D)                       # (B, H, N)
        if self.residual_filter is not None:
            u = x.transpose(1, 2)                                             # (B, H, N)
            if keep is not None:
                u = u * keep
            y = y + self.long_conv(u, self.residual_filter, self.D_res)
        if windowed is not None:
            y = y + windowed
        if self.output_gate is not None:
            y = y * torch.sigmoid(self.output_gate(x)).transpose(1, 2)
        return self.out_proj(y.transpose(1, 2))                               # (B, N, H)

    def flops(self, seq_len=None, batch=None) -> sympy.Expr:
        h, d = self.d_model, self.d_inner
        bidir = self.mode == "bidirectional"
        conv = monarch_conv_flops(d) if self.mode == "causal-monarch" else fft_conv_flops(d, bidir)
        convs = 2 if self.residual_filter is not None else 1
        # Projections swapped for other M2 blocks (e.g. MonarchLinear) report their own cost.
        projections = [p.flops() if isinstance(p, M2Block) else linear_flops(i, f)
                       for p, i, f in ((self.in_proj, h, 3 * d), (self.out_proj, d, h))]
        expr = (sum(projections)
                + B * N * 3 * d * 2 * self.short_kernel                       # depthwise short conv
                + B * N * d * 4                                               # gates and skips
                + convs * conv)
        if self.window_attention is not None:
            expr = expr + self.window_attention.flops() + B * N * d               # its branch and the add
        if self.output_gate is not None:
            expr = expr + linear_flops(h, d) + B * N * d * 2                      # the gate and its product
        return substitute(expr, seq_len, batch)

    def extra_repr(self) -> str:
        inner = f", d_inner={self.d_inner}" if self.d_inner != self.d_model else ""
        return f"d_model={self.d_model}{inner}, mode={self.mode!r}, residual_conv={self.residual_filter is not None}"


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


def _window_attention(d_model: int, d_inner: int, window: int, heads, scale, causal: bool,
                      factory: dict) -> WindowAttention:
    """The window branch of a mixer: ``heads`` = (heads, kv_heads, head_dim) filling its d_inner channels."""
    if heads is None:
        count = max(1, d_inner // 64)
        while d_inner % count:
            count -= 1
        heads = (count, count, d_inner // count)
    heads, kv_heads, head_dim = (int(v) for v in heads)
    if heads * head_dim != d_inner:
        raise ConfigError(f"window_heads={heads, kv_heads, head_dim}: heads x head_dim must be the mixer's "
                          f"{d_inner} channels, the ones the window attention adds to")
    return WindowAttention(d_model, window, heads, kv_heads, head_dim, causal, scale, **factory)


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
