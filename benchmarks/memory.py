"""Where a converted encoder's prefill memory goes: the breakdown ``benchmarks/throughput.py`` reports.

For one N: the whole model's peak (measured: resident-set growth; predicted: the plan's
``RewritePlan.memory``), the tensors live at its peak (glibc's in-use heap and mapped bytes, polled after
every op), and the pieces: filter spectra the mixers keep, the FFT channel-block buffers, one in-projection
group, the MLP intermediate (whole, or one chained token group), and one layer's mixer and MLP measured alone.

Example (a smoke run): python benchmarks/throughput.py --smoke
"""

from __future__ import annotations

import torch

from m2convert.bench import measure_peak_mb, predicted_mb
from m2convert.bench_memory import live_peak_mb
from m2convert.kernels.fftconv import cpu as conv_cpu
from m2convert.layers import chained, sequence


def fft_buffer_mb(n: int, hidden: int, groups: int = 2, batch: int = 1, taps: int | None = None) -> float:
    """MiB of one mixer call's transform buffers: the zero-padded (B, G, c, L) input, its (B, G, c, F)
    spectrum and inverse, and one block's (G, c, F) filter responses, c channels per block, at the
    longest block's FFT length L (filters of ``taps`` taps each way, default n)."""
    n_fft = conv_cpu.fft_size(n, taps)
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
    mixer = next(m for m in layer.modules() if isinstance(m, sequence.M2SequenceMixer))
    fc1 = layer.intermediate.dense
    is_chained = getattr(fc1, "chain_output", False)
    group = chained.chain_rows(inner, 4)
    is_chained = is_chained and n > group                        # shorter inputs make the intermediate whole
    group = group if is_chained else n
    channels = min(h, max(conv_cpu.PROJECT_CHANNELS, 1))
    predicted = predicted_mb(converted, n, 1, torch.float32)[1]
    return {"N": n, "live_tensors_mb": live, "predicted_mb": predicted, "spectra_kept_mb": spectra,
            "fft_buffers_mb": fft_buffer_mb(n, h, taps=max(mixer.channel_taps(n))),
            "in_projection_group_mb": 3 * channels * n * 4 / 2**20,
            "mlp_intermediate_mb": min(group, n) * inner * 4 / 2**20, "mlp_chained": is_chained,
            "layer_mixer_mb": mixer_mb, "layer_mlp_mb": mlp_mb}


def breakdown_table(rows: list[dict]) -> str:
    """Markdown table of :func:`breakdown` rows (MiB)."""
    lines = ["| N | tensors live at the peak: measured / predicted (plan) | filter spectra kept | FFT block buffers | "
             "in-projection group | MLP intermediate | one layer: mixer / MLP (measured alone) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        live = "-" if r["live_tensors_mb"] is None else f"{r['live_tensors_mb']:.0f}"
        what = "one token group" if r["mlp_chained"] else "whole"
        lines.append(f"| {r['N']} | {live} / {r['predicted_mb']:.0f} | {r['spectra_kept_mb']:.0f} | {r['fft_buffers_mb']:.1f} | "
                     f"{r['in_projection_group_mb']:.1f} | {r['mlp_intermediate_mb']:.1f} ({what}) | "
                     f"{r['layer_mixer_mb']:.0f} / {r['layer_mlp_mb']:.0f} |")
    return "\n".join(lines)
