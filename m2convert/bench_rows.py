"""One row of the throughput benchmark (one sequence length), and how the timed rounds become it.

Example:
    >>> BenchRow(seq_len=512).converted_status
    'ok'
"""

from __future__ import annotations

import os
import statistics
import time
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


def busy_cores(window: float = 0.5) -> float:
    """Cores other processes kept busy over ``window`` seconds while this one sleeps (Linux /proc/stat; the
    1-minute load average elsewhere, which also counts this process's own recent work)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)          # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    spent = max(total1 - total0, 1)
    return (os.cpu_count() or 1) * (spent - (idle1 - idle0)) / spent


def machine_load(threads: int, before: float | None = None) -> dict:
    """How busy the machine is around a timing run: the cores other processes keep busy now
    (:func:`busy_cores`; ``load_after`` when ``before`` is given, else ``load_before``), the cores, the torch
    threads, and a ``note`` when the load before the run left fewer free cores than the run's threads: then
    other processes took CPU the timing needed, and the converted model (more, smaller parallel regions per
    forward) slows more than the original, so the ratio is unreliable.

    Example:
        >>> sorted(machine_load(1))
        ['cores', 'load_before', 'note', 'threads']
    """
    now = busy_cores()
    cores = os.cpu_count() or 1
    load = {"load_before": round(now if before is None else before, 2), "cores": cores, "threads": threads}
    if before is not None:
        load["load_after"] = round(now, 2)
    busy = load["load_before"] > max(cores - threads, 0) + 0.5
    load["note"] = (f"the machine was busy before the run (other processes kept {load['load_before']:.2f} of "
                    f"{cores} cores busy, {threads} thread(s) timed): they took CPU the timing needed and the "
                    "converted model slows more than the original under contention; rerun on a quiet machine"
                    if busy else None)
    return load
