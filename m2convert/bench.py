"""Throughput of a model against its M2 conversion, measured side by side in one process.

The library side of ``m2convert bench MODEL --seq-lens 512,2048,8192 [--batch B] [--dtype D]``::

    from m2convert.bench import bench
    result = bench("all-MiniLM-L6-v2", seq_lens=[512, 2048], batch=1, dtype="float32")
    print(result.table())                                  # markdown, one row per sequence length
    result.write("benchmarks/results", "throughput")       # .json + .md (+ .png when matplotlib is there)

Several conversions of one model against the same original, in the same rounds: :func:`bench_many`.
Rows: ``m2convert.bench_rows``; reports (markdown table, JSON, log-log plot): ``m2convert.bench_report``.

Method: both models get the same random token ids (batch, N) and run under ``torch.inference_mode()``.
After one warm-up call each, the calls are interleaved (original, eager original, converted, again...)
for ``repeats`` rounds, fewer at lengths where a round is slow, with the order rotated each round;
latency is the median call and the ratio is the median of the per-round ratios, so a burst of load on
a shared machine hits both sides.
Peak memory is the growth of the process's resident set during the warm-up call: the kernel's
high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` just before it. It counts what
the call touches (activations, workspaces, the converted model's filter cache), not weights or inputs;
freed heap memory is returned to the OS first (glibc ``malloc_trim``) so reuse does not hide it. It
reads None where ``/proc`` is missing.

A variant that cannot run at a length says why instead of a number: past its position table, out of
memory (eager attention's (B, heads, N, N) scores are sized before the call and skipped when they
would not fit), or over ``max_call_s`` (predicted from the previous lengths' slope, or from one
length: quadratic for the originals, linear for converted models). The converted model's number
stands on its own.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .bench_report import rows_table, write_report
from .bench_rows import BenchRow, machine_load, row_from_times
from .errors import ConfigError
from .hf import attention_implementation, set_attention
from .loading import load_model
from .passes.pipeline import plan_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class BenchResult:
    """Rows of one model; ``meta`` holds the settings (model, batch, dtype, threads, config...)."""

    name: str
    rows: list[BenchRow]
    meta: dict = field(default_factory=dict)

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def table(self) -> str:
        """Markdown table of the rows (status text where a variant did not run), then the rounds, threads and
        machine load it was measured with, and a warning when that load makes the ratios unreliable."""
        meta = self.meta
        lines = [rows_table(self.rows)]
        if "load_before" in meta:
            lines.append(f"\nmedian of up to {meta.get('max_repeats')} interleaved rounds per length, "
                         f"{meta.get('threads')} thread(s); other processes kept {meta['load_before']:.2f} of "
                         f"{meta.get('cores')} cores busy before the run, {meta.get('load_after', 0):.2f} after")
            if meta.get("note"):
                lines.append(f"warning: {meta['note']}")
        return "\n".join(lines)

    def write(self, out_dir, stem: str = "throughput", **report) -> dict:
        """Write ``stem``.json/.md (and .png with matplotlib) under ``out_dir``; see ``bench_report``."""
        return write_report({self.name: self}, out_dir, stem, **report)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc), so a call's growth is not hidden by reuse."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_mb(fn) -> tuple[float | None, object]:
    """Run ``fn()``; return (peak resident-set growth in MiB during the call, its result)."""
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                  # reset VmHWM to the current VmRSS
        base = _status_kb("VmRSS")
    except OSError:
        base = None
    out = fn()
    peak = _status_kb("VmHWM")
    if base is None or peak is None:
        return None, out
    return max(peak - base, 0) / 1024, out


def position_limit(model: nn.Module) -> int | None:
    """Longest sequence an absolute position table allows (None if the model has none)."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            offset = getattr(model.config, "pad_token_id", 0) + 1 if "roberta" in type(model).__name__.lower() else 0
            return module.num_embeddings - offset
    return None


def extend_positions(model: nn.Module, n: int) -> bool:
    """Tile a too-short absolute position table (and its position/token-type id buffers) to ``n`` rows.

    For timing a converted model past its teacher's table: the cost of a forward does not depend on the
    embedding values. Returns False when the model has no table this knows how to extend.
    """
    for name, module in list(model.named_modules()):
        table = getattr(module, "position_embeddings", None)
        if not isinstance(table, nn.Embedding) or table.num_embeddings >= n:
            continue
        reps = math.ceil(n / table.num_embeddings)
        weight = table.weight.detach().repeat(reps, 1)[:n]                     # (n, H)
        module.position_embeddings = nn.Embedding.from_pretrained(weight, freeze=True)
        for buf, fill in (("position_ids", None), ("token_type_ids", 0)):
            old = getattr(module, buf, None)
            if isinstance(old, torch.Tensor):
                new = torch.arange(n, device=old.device)[None] if fill is None else old.new_zeros(1, n)
                module.register_buffer(buf, new.to(old.dtype), persistent=False)
        return True
    return False


def _eager_bytes(model: nn.Module, batch: int, n: int, dtype: torch.dtype) -> int:
    heads = getattr(model.config, "num_attention_heads", 1)
    # scores, softmax probabilities and the dropout/matmul temporary live at the same time
    return 3 * batch * heads * n * n * torch.finfo(dtype).bits // 8


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_args(seq_lens, batch, dtype) -> list[int]:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    lens = sorted(int(n) for n in seq_lens)
    if not lens or lens[0] < 1 or batch < 1:
        raise ConfigError(f"need seq_lens >= 1 and batch >= 1, got seq_lens={lens}, batch={batch}")
    return lens


def _load(model) -> nn.Module:
    if isinstance(model, nn.Module):
        return model.eval()
    return load_model(str(model))


def bench(model, seq_lens=(512, 2048, 8192), batch: int = 1, dtype: str = "float32", *, config=None,
          converted: nn.Module | None = None, name: str | None = None, **options) -> BenchResult:
    """Original vs converted throughput, one row per sequence length.

    Args:
        model: a local directory, a Hugging Face id (the bundled all-MiniLM-L6-v2 loads offline), or a
            loaded nn.Module taking ``input_ids`` (B, N); a module is cast to ``dtype`` in place.
        seq_lens: sequence lengths N to measure.
        batch: sequences per call (B).
        dtype: "float32" | "bfloat16" | "float16" | "float64"; both models are cast to it.
        config: ConvertConfig (or its dict) for ``m2.convert``; ignored when ``converted`` is given.
        converted: an already converted model to measure instead of converting ``model``.
        name: row-set name in reports (default: the model argument).
        options: see :func:`bench_many` (repeats, seconds_per_length, max_call_s, eager, eager_max_len,
            threads, seed, progress).

    Returns:
        BenchResult with a BenchRow per N and ``meta`` describing the run.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> result = bench(transformers.BertModel(config), seq_lens=[64, 128], repeats=2, threads=1)
        >>> [r.seq_len for r in result.rows], result.rows[0].ratio > 0
        ([64, 128], True)
    """
    _check_args(seq_lens, batch, dtype)
    label = name or (model if isinstance(model, str) else type(model).__name__)
    described = model if isinstance(model, str) else type(model).__name__
    given = converted is not None
    if not given:
        model = _load(model)
        converted = plan_model(model, config, {"input_ids": torch.ones(1, 16, dtype=torch.long)}).apply()
    result = bench_many(model, {label: converted}, seq_lens, batch, dtype, **options)[label]
    shown = "converted model given" if given else config.to_dict() if hasattr(config, "to_dict") else config
    result.meta.update(model=described, config=shown)
    return result


def bench_many(model, converted: dict, seq_lens=(512, 2048, 8192), batch: int = 1, dtype: str = "float32", *,
               repeats: int = 5, seconds_per_length: float = 60.0, max_call_s: float = 300.0,
               eager: bool = True, eager_max_len: int | None = None, threads: int | None = None, seed: int = 0,
               progress=None) -> dict:
    """One original against several converted models, all interleaved in the same rounds.

    Args:
        model: as in :func:`bench`.  converted: {name: converted model}.
        repeats: interleaved rounds at most; fewer when a round would take over ``seconds_per_length``
            (at least one timed round after the warm-up).
        max_call_s: skip a variant whose predicted call time exceeds this (reported as skipped).
        eager: also time the original with eager attention.
        eager_max_len: time eager attention only up to this N (it is the slowest variant), or None.
        threads: torch intra-op threads for the run (default: leave as is).
        progress: callable(str) taking one line per measurement, or None.

    Returns:
        {name: BenchResult}; the original's numbers are shared, each name's ratio is against its own
        converted model.
    """
    seq_lens = _check_args(seq_lens, batch, dtype)
    say = progress or (lambda msg: None)
    old_threads = torch.get_num_threads()
    load = machine_load(threads or old_threads)
    if threads:
        torch.set_num_threads(threads)
    try:
        original = _load(model)
        torch_dtype = DTYPES[dtype]
        original = original.to(torch_dtype).eval()
        converted = {k: m.to(torch_dtype).eval() for k, m in converted.items()}
        attn = attention_implementation(original) or "sdpa"
        try:
            rows = _run(original, converted, attn, seq_lens, batch, torch_dtype,
                        (repeats, seconds_per_length, max_call_s, eager, eager_max_len, seed), say)
        finally:
            set_attention(original, attn)
    finally:
        torch.set_num_threads(old_threads)
    meta = {"model": model if isinstance(model, str) else type(model).__name__, "batch": batch, "dtype": dtype,
            "threads": threads or old_threads, "attention": attn, "max_repeats": repeats,
            "seconds_per_length": seconds_per_length, "max_call_s": max_call_s, "eager_max_len": eager_max_len,
            "position_limit": position_limit(original),
            **machine_load(threads or old_threads, before=load["load_before"])}
    return {k: BenchResult(k, rows[k], dict(meta)) for k in converted}


def _run(original, converted, attn, seq_lens, batch, dtype, opts, say) -> dict:
    repeats, seconds_per_length, max_call_s, eager, eager_max_len, seed = opts
    limit = position_limit(original)
    vocab = getattr(original.config, "vocab_size", 1000)
    last = {}                                                # variant -> [(N, median latency s), ...]
    rows = {k: [] for k in converted}
    for n in seq_lens:
        ids = torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed + n))
        status, peaks, calls = {}, {}, {}
        variants = [("original", original, attn), ("eager", original, "eager")]
        variants += [(("converted", k), m, None) for k, m in converted.items()]
        for key, target, impl in variants:
            if key == "eager" and (not eager or attn == "eager"):
                status[key] = "not run" if not eager else "same as original (eager)"
                continue
            if key == "eager" and eager_max_len is not None and n > eager_max_len:
                status[key] = f"not run (eager timed up to N={eager_max_len})"
                say(f"N={n} eager: {status[key]}")
                continue
            status[key] = _check(key, target, n, batch, dtype, limit, last, max_call_s)
            if status[key] != "ok":
                say(f"N={n} {_label(key)}: {status[key]}")
                continue
            call = _caller(target, ids, None if impl is None else (original, impl))
            call.prepare()
            with torch.inference_mode():
                try:
                    start = time.perf_counter()
                    peaks[key], _ = measure_peak_mb(call)
                    warm = time.perf_counter() - start
                except (RuntimeError, MemoryError) as exc:
                    if "memory" not in str(exc).lower():
                        raise
                    status[key] = "out of memory"
                    say(f"N={n} {_label(key)}: out of memory")
                    continue
            calls[key] = (call, warm)
            peak = "n/a" if peaks[key] is None else f"{peaks[key]:.0f} MiB"
            say(f"N={n} {_label(key)}: warm-up {warm:.2f} s, peak {peak}")
        times, rounds = _time_rounds(calls, repeats, seconds_per_length)
        for key, ts in times.items():
            last.setdefault(key, []).append((n, statistics.median(ts)))
        say(f"N={n}: {rounds} rounds, " + ", ".join(f"{_label(k)} {statistics.median(t) * 1e3:.1f} ms"
                                                   for k, t in times.items()))
        for name, model in converted.items():
            rows[name].append(row_from_times(n, batch, rounds, times, status, peaks, ("converted", name)))
            rows[name][-1].original_predicted_mb, rows[name][-1].converted_predicted_mb = predicted_mb(
                model, n, batch, dtype)
    return rows


def predicted_mb(converted: nn.Module, n: int, batch: int, dtype: torch.dtype) -> tuple:
    """(original, converted) prefill peak MiB that the model's plan predicts (``RewritePlan.memory``), or
    Nones for a model without a plan."""
    from .passes.plan import RewritePlan

    saved = getattr(converted, "m2convert_plan", None)
    if not saved:
        return None, None
    memory = RewritePlan.from_dict(saved).memory(n, batch, torch.finfo(dtype).bits // 8)
    if memory["before"] is None:
        return None, None
    return round(memory["before"] / 2**20, 1), round(memory["after"] / 2**20, 1)


def _label(key) -> str:
    return f"converted[{key[1]}]" if isinstance(key, tuple) else key


def _caller(target, ids, switch):
    """A call of ``target`` on ``ids``; ``.prepare()`` (untimed) selects the original's attention."""
    def call():
        return target(input_ids=ids)
    call.prepare = (lambda: set_attention(*switch)) if switch else (lambda: None)
    return call


def _check(key, target, n, batch, dtype, limit, last, max_call_s) -> str:
    is_converted = isinstance(key, tuple)
    if not is_converted and limit is not None and n > limit:
        return f"past position limit ({limit})"
    if is_converted:
        conv_limit = position_limit(target)
        if conv_limit is not None and n > conv_limit and not extend_positions(target, n):
            return f"past position limit ({conv_limit})"
    if key == "eager":
        need, have = _eager_bytes(target, batch, n, dtype), _available_bytes()
        if have is not None and need > 0.6 * have:
            return f"out of memory (eager scores need ~{need / 2**30:.0f} GiB, {have / 2**30:.0f} GiB free)"
    if last.get(key):
        # One point: linear for converted models, quadratic for attention; two: the measured slope.
        predicted = _predict(last[key], n, 1 if is_converted else 2)
        if predicted > max_call_s:
            return f"skipped: ~{predicted:.0f} s per call predicted (max_call_s={max_call_s:g})"
    return "ok"


def _predict(history: list, n: int, single: float) -> float:
    """Call time at length n from the measured (N, seconds) history: power law through the last two
    points (exponent clamped to [1, 2]), or exponent ``single`` from one point."""
    (n1, t1) = history[-1]
    slope = single
    if len(history) > 1:
        n0, t0 = history[-2]
        if t0 > 0 and n1 > n0:
            slope = min(max(math.log(t1 / t0) / math.log(n1 / n0), 1.0), 2.0)
    return t1 * (n / n1) ** slope


def _time_rounds(calls, repeats, seconds_per_length) -> tuple[dict, int]:
    if not calls:
        return {}, 0
    round_s = sum(warm for _, warm in calls.values())
    rounds = max(1, min(repeats, int(seconds_per_length // max(round_s, 1e-9))))
    times = {k: [] for k in calls}
    order = list(calls)
    with torch.inference_mode():
        for i in range(rounds):
            # Rotate who goes first: a call measured right after another's large frees ran slower.
            for key in order[i % len(order):] + order[: i % len(order)]:
                call = calls[key][0]
                call.prepare()
                start = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - start)
    return times, rounds
