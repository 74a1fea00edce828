"""The filter spectra of a sequence mixer: made per call in channel blocks, or cached per length.

:class:`FilterSpectra` is the part of :class:`~m2convert.layers.sequence.M2SequenceMixer` that turns its
implicit filters into the frequency responses the CPU long convolution multiplies by.
"""

from __future__ import annotations

import weakref

import torch

from ..kernels.fftconv.cpu import block_channels, fft_size, fill_taps
from .filters import TAIL_TOL, ImplicitFilter

# Mixers that have held a filter-spectrum cache entry (weakly: a dropped model leaves no trace here).
_HOLDERS: "weakref.WeakSet[M2SequenceMixer]" = weakref.WeakSet()
# Filter channels whose taps are made in one GEMM when responses are built block by block: at most
# TAP_CHANNELS, fewer when one filter's (heads, c, N) taps would pass TAP_BYTES (their GEMM, bias and
# decay temporaries otherwise outgrow the convolution's own buffers: 35 MiB at H = 768, N = 8192).
TAP_CHANNELS = 64
TAP_BYTES = 1 << 20


class FilterSpectra:
    """Filter spectra of a mixer (``_filters()``, ``mode``, ``d_inner``, ``D`` and ``_spectrum_cache``).

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
    """

    filter_cache_bytes = 256 << 20
    filter_cache_total_bytes = 16 << 20

    def _filter_state(self):
        """Identity, storage and version of every filter tensor; None when they cannot be tracked."""
        state = []
        for f in self._filters():
            for t in (*f.parameters(), *f.buffers()):
                if t.is_inference():                     # no version counter: changes would go unseen
                    return None
                state.append((id(t), t.data_ptr(), t._version))
        return tuple(state)

    def channel_taps(self, n: int, dtype: torch.dtype = torch.float32) -> list[int]:
        """Taps per direction the eager CPU path convolves each channel with at length n: n, or the
        filters' support for it (:meth:`ImplicitFilter.channel_support`, the longer filter's) when that
        is shorter: the taps past it add at most TAIL_TOL of the channel's amplitude bound (1e-9 in
        float32, 1e-18 in float64), and a block of channels with K taps needs a transform of only
        n + K - 1 points.

        Example:
            >>> from m2convert.layers import M2SequenceMixer
            >>> mixer = M2SequenceMixer(8, filter_scale=16.0)
            >>> max(mixer.channel_taps(100)), max(mixer.channel_taps(10_000)) == mixer.filter.support()
            (100, True)
        """
        # Filters without a bound (a RecurrentFilter's modes need not decay) keep every tap.
        each = [f.channel_support(TAIL_TOL[dtype]) if isinstance(f, ImplicitFilter) else None
                for f in self._filters()]
        if None in each:
            return [n] * self.d_inner
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
        taps = [n] * self.d_inner if taps is None else taps
        longest = max(taps)
        trunks = [(f, f.trunk(longest).to(dtype)) for f in self._filters()]   # (K, order) each
        bidirectional = self.mode == "bidirectional"
        heads = 2 if bidirectional else 1
        width = max(1, min(TAP_CHANNELS, TAP_BYTES // (heads * longest * torch.finfo(dtype).bits // 8)))
        held = {"range": (0, 0), "taps": None}

        def block(start: int, stop: int, size: int | None = None) -> torch.Tensor:
            lo, hi = held["range"]
            if not (lo <= start and stop <= hi):
                lo, hi = start, min(max(stop, start + width), self.d_inner)
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
        nbytes = g * self.d_inner * f * cplx.itemsize
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
        spectrum = torch.empty(g, self.d_inner, f, dtype=cplx, device=self.D.device)
        step = block_channels(1, g, n_fft, self.d_inner)
        for start in range(0, self.d_inner, step):
            stop = min(start + step, self.d_inner)
            spectrum[:, start:stop] = block(start, stop, n_fft)
        self._spectrum_cache = (key, spectrum)
        _HOLDERS.add(self)
        return spectrum


def _cached_bytes() -> int:
    """Bytes of filter spectra that live mixers hold in their caches right now."""
    total = 0
    for mixer in list(_HOLDERS):
        cached = getattr(mixer, "_spectrum_cache", None)
        if cached is not None:
            total += cached[1].numel() * cached[1].element_size()
    return total
