"""CPU paths: what each speed change of the converted model buys, measured one switch at a time.

A random BERT-base (H 768, 12 layers) converted in the throughput report's quality config, timed at
each N in the same interleaved rounds (median of per-round times, batch 1, fp32, inference mode):

    original (SDPA)            the Hugging Face model, for scale
    reference                  no CPU fast path: the two-GEMM Monarch reference and the FFT reference
    + monarch layout           MonarchLinear through kernels/monarch/cpu.py (BLAS-friendly layout, chunks)
    + mixer core, no cache     M2SequenceMixer through kernels/fftconv/cpu.py (smooth FFT sizes, channel
                               blocks, no transposes), filters regenerated per call
    + filter cache (default)   the filters' spectra kept per length in eval mode
    torch.compile              torch.compile(default mode) of the model (it traces the reference path)

Run:   python benchmarks/cpu_paths.py                  (about 10 minutes on 2 busy cores)
       python benchmarks/cpu_paths.py --smoke          (seconds; writes to runs/bench_smoke/)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Clock, log, markdown_table, write_markdown, write_report  # noqa: E402
from throughput import bert_base, convert, quality_configs  # noqa: E402

from m2convert.layers.monarch import fast_paths  # noqa: E402
from m2convert.layers.sequence import M2SequenceMixer  # noqa: E402


def variants(original, converted, compiled):
    """[(name, call(ids))]: each runs one forward under its switches."""
    def run(model, **switches):
        def call(ids):
            with fast_paths(**switches):
                return model(input_ids=ids)
        return call

    def no_cache(ids):
        mixers = [m for m in converted.modules() if isinstance(m, M2SequenceMixer)]
        for m in mixers:
            m.filter_cache_bytes = 0
        try:
            return converted(input_ids=ids)
        finally:
            for m in mixers:
                del m.filter_cache_bytes                      # back to the class default
    out = [("original (SDPA)", run(original)),
           ("reference", run(converted, monarch=False, mixer=False)),
           ("+ monarch layout", run(converted, mixer=False)),
           ("+ mixer core, no cache", no_cache),
           ("+ filter cache (default)", run(converted))]
    if compiled is not None:
        out.append(("torch.compile", run(compiled)))
    return out


def measure(calls, seq_lens, repeats: int, vocab: int) -> list[dict]:
    rows = []
    for n in seq_lens:
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))
        times = {name: [] for name, _ in calls}
        with torch.inference_mode():
            for name, call in calls:                       # warm-up: caches, compile, allocator
                clock = time.perf_counter()
                call(ids)
                log(f"N={n} {name}: warm-up {time.perf_counter() - clock:.1f} s")
            for r in range(repeats):
                for name, call in calls:                   # interleaved: load bursts hit every variant
                    clock = time.perf_counter()
                    call(ids)
                    times[name].append(time.perf_counter() - clock)
                log(f"N={n} round {r + 1}/{repeats}")
        base = statistics.median(times["reference"])
        for name, _ in calls:
            med = statistics.median(times[name])
            rows.append({"seq_len": n, "variant": name, "median_s": med, "tokens_per_ms": n / med / 1e3,
                         "speedup_vs_reference": base / med, "rounds": len(times[name])})
    return rows


def render(doc: dict) -> str:
    out = []
    for n in sorted({r["seq_len"] for r in doc["rows"]}):
        rows = [r for r in doc["rows"] if r["seq_len"] == n]
        orig = next((r for r in rows if r["variant"].startswith("original")), None)
        out += [f"## N = {n}", "",
                markdown_table(["variant", "median s", "tokens/ms", "vs reference", "vs original (SDPA)"],
                               [[r["variant"], r["median_s"], r["tokens_per_ms"],
                                 f"{r['speedup_vs_reference']:.2f}x",
                                 f"{orig['median_s'] / r['median_s']:.2f}x" if orig else "-"] for r in rows]), ""]
    out += [f"- {note}" for note in doc.get("notes", [])]
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="2048,8192")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--render", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.repeats = "256", 1
        args.out = args.out or ROOT / "runs" / "bench_smoke"
    if args.render:
        return {"markdown": str(write_markdown("cpu_paths", render, args.out))}
    torch.set_num_threads(args.threads)
    clock = Clock()
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    qcfg, qsource = quality_configs()["full"]
    original = bert_base(max(seq_lens))
    converted = convert(original, qcfg).eval()
    compiled = None if args.no_compile else torch.compile(converted)
    rows = measure(variants(original, converted, compiled), seq_lens, args.repeats, original.config.vocab_size)
    notes = [f"quality config: {qsource}",
             "every variant computes the same function (the tests compare fast paths with the references)",
             f"torch threads {args.threads}; warm-up call (compile included) not timed"]
    path = write_report("cpu_paths", {"rows": rows, "notes": notes, "wall_seconds": clock.total},
                        {"seq_lens": seq_lens, "repeats": args.repeats, "threads": args.threads,
                         "quality": qcfg.to_dict()}, render, args.out)
    log(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
