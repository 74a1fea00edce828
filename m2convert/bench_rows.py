"""One row of the throughput benchmark (one sequence length), and how the timed rounds become it.

Example:
    >>> BenchRow(seq_len=512).converted_status
    'ok'
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class BenchRow:
    """One sequence length. ``*_tokens_per_ms`` = batch * N / median latency; None where it did not run."""

    seq_len: int
    original_tokens_per_ms: float | None = None
    converted_tokens_per_ms: float | None = None
    ratio: float | None = None                 # converted / original (the model's own attention, SDPA)
    original_peak_mb: float | None = None
    converted_peak_mb: float | None = None
    original_predicted_mb: float | None = None     # the plan's prediction (RewritePlan.memory) of the peaks
    converted_predicted_mb: float | None = None
    eager_tokens_per_ms: float | None = None
    eager_ratio: float | None = None           # converted / original with eager attention
    eager_peak_mb: float | None = None
    original_latency_ms: float | None = None
    eager_latency_ms: float | None = None
    converted_latency_ms: float | None = None
    original_status: str = "ok"
    eager_status: str = "ok"
    converted_status: str = "ok"
    repeats: int = 0


def row_from_times(n: int, batch: int, rounds: int, times: dict, status: dict, peaks: dict, conv_key) -> BenchRow:
    """The row of length ``n`` for one converted model, from what the rounds measured.

    ``times`` / ``status`` / ``peaks`` are keyed by variant ("original", "eager", or ``conv_key`` for the
    converted model): call times in seconds per round, "ok" or why it did not run, peak MiB. Ratios are
    medians of per-round ratios, so load that hits one round hits both sides.

    Example:
        >>> times = {"original": [0.002, 0.004], ("converted", "m2"): [0.001, 0.001]}
        >>> row = row_from_times(64, 1, 2, times, {}, {}, ("converted", "m2"))
        >>> row.ratio, row.converted_tokens_per_ms, row.eager_status
        (3.0, 64.0, 'ok')
    """
    row = BenchRow(seq_len=n, repeats=rounds)
    for key, field_ in (("original", "original"), ("eager", "eager"), (conv_key, "converted")):
        setattr(row, f"{field_}_status", status.get(key, "ok"))
        if key in peaks and peaks[key] is not None:
            setattr(row, f"{field_}_peak_mb", round(peaks[key], 1))
        if key in times:
            med = statistics.median(times[key])
            setattr(row, f"{field_}_latency_ms", round(med * 1e3, 2))
            setattr(row, f"{field_}_tokens_per_ms", round(batch * n / (med * 1e3), 4))
    if conv_key in times:
        for base, attr in (("original", "ratio"), ("eager", "eager_ratio")):
            if base in times:
                ratio = statistics.median(a / b for a, b in zip(times[base], times[conv_key]))
                setattr(row, attr, round(ratio, 3))
    return row
