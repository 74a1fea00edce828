"""Where a converted encoder's prefill memory goes: the breakdown ``benchmarks/throughput.py`` reports.

For one N: the whole model's peak (measured: resident-set growth; predicted: the plan's
``RewritePlan.memory``), the tensors live at its peak (glibc's in-use heap and mapped bytes, polled after
every op), and the pieces: filter spectra the mixers keep, the FFT channel-block buffers, one in-projection
group, the MLP intermediate (whole, or one chained token group), and one layer's mixer and MLP measured alone.

Example (a smoke run): python benchmarks/throughput.py --smoke
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m2convert.bench import measure_peak_mb
from m2convert.kernels.fftconv import cpu as conv_cpu
from m2convert.layers import chained, sequence


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    path = ctypes.util.find_library("c")
    lib = ctypes.CDLL(path) if path else None
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    lib.mallinfo2.restype = _MallInfo2
    return lib


class _LivePeak(TorchDispatchMode):
    """Largest malloc'd-and-in-use byte count seen after any op (glibc ``mallinfo2``: heap + mapped)."""

    def __init__(self, libc):
        super().__init__()
        self.libc, self.peak = libc, 0
        self.base = self.now()

    def now(self) -> int:
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.now() - self.base)
        return out


def live_peak_mb(fn) -> float | None:
    """MiB of tensors (and other malloc'd memory) alive at once during ``fn()``; None without glibc."""
    libc = _libc()
    if libc is None:
        return None
    libc.malloc_trim(0)
    with _LivePeak(libc) as mode:
        fn()
    return mode.peak / 2**20


def fft_buffer_mb(n: int, hidden: int, groups: int = 2, batch: int = 1) -> float:
    """MiB of one mixer call's transform buffers: the zero-padded (B, G, c, L) input, its (B, G, c, F)
    spectrum and inverse, and one block's (G, c, F) filter responses, c channels per block."""
    n_fft = conv_cpu.fft_size(n)
    step = conv_cpu.block_channels(batch, groups, n_fft, hidden)
    f = n_fft // 2 + 1
    real = batch * groups * step * n_fft * 4 * 2                    # padded input + inverse output
    spectra = batch * groups * step * f * 8 + groups * step * f * 8 + groups * step * n_fft * 4
    return (real + spectra) / 2**20


def breakdown(converted, n: int, vocab: int = 1000) -> dict:
    """The memory picture of ``converted`` (a BERT-style encoder) at length n, batch 1 (see module notes)."""
    config = converted.config
    h, inner = config.hidden_size, config.intermediate_size
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))
    layer = converted.encoder.layer[0]
    x = torch.randn(1, n, h)
    with torch.inference_mode():
        live = live_peak_mb(lambda: converted(input_ids=ids))
        spectra = sequence._cached_bytes() / 2**20
        mixer_mb, a = measure_peak_mb(lambda: layer.attention(x)[0])
        mlp_mb, _ = measure_peak_mb(lambda: layer.output(layer.intermediate(a), a))
    fc1 = layer.intermediate.dense
    is_chained = getattr(fc1, "chain_output", False)
    group = chained.chain_rows(inner, 4) if is_chained else n
    channels = min(h, max(conv_cpu.PROJECT_CHANNELS, 1))
    return {"N": n, "live_tensors_mb": live, "spectra_kept_mb": spectra,
            "fft_buffers_mb": fft_buffer_mb(n, h), "in_projection_group_mb": 3 * channels * n * 4 / 2**20,
            "mlp_intermediate_mb": min(group, n) * inner * 4 / 2**20, "mlp_chained": is_chained,
            "layer_mixer_mb": mixer_mb, "layer_mlp_mb": mlp_mb}


def breakdown_table(rows: list[dict]) -> str:
    """Markdown table of :func:`breakdown` rows (MiB)."""
    lines = ["| N | tensors live at the peak | filter spectra kept | FFT block buffers | in-projection group | "
             "MLP intermediate | one layer: mixer / MLP (measured alone) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        live = "-" if r["live_tensors_mb"] is None else f"{r['live_tensors_mb']:.0f}"
        what = "one token group" if r["mlp_chained"] else "whole"
        lines.append(f"| {r['N']} | {live} | {r['spectra_kept_mb']:.0f} | {r['fft_buffers_mb']:.1f} | "
                     f"{r['in_projection_group_mb']:.1f} | {r['mlp_intermediate_mb']:.1f} ({what}) | "
                     f"{r['layer_mixer_mb']:.0f} / {r['layer_mlp_mb']:.0f} |")
    return "\n".join(lines)
