"""The original BERT-base's prefill peak where throughput.py's time limit skipped it, added to its report.

``benchmarks/throughput.py`` skips a call predicted past ``--max-call-s`` (the original at N = 16384 takes
3-4 minutes per call on a busy 2-core machine), so its report has no original peak there, which the memory
targets compare against. This measures that peak the same way (``m2convert.bench.measure_peak_mb`` on the
first call after a warm-up at N = 128, the same random BERT-base and token ids), writes it into
``throughput.json`` (``original_peak_supplement`` and the row's ``original_peak_mb``), and updates the
memory target and adds a section in ``throughput.md``.

Run:   python benchmarks/original_peak.py                  (after throughput.py; N = 16384 by default)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from m2convert.bench import measure_peak_mb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RESULTS, bert_base, log  # noqa: E402


def measure(n: int) -> float | None:
    original = bert_base(n)
    ids = torch.randint(0, original.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.inference_mode():
        original(input_ids=torch.ones(1, 128, dtype=torch.long))
        start = time.perf_counter()
        peak, _ = measure_peak_mb(lambda: original(input_ids=ids))
    log(f"original bert-base N={n}: peak {peak} MiB ({time.perf_counter() - start:.0f} s)")
    return peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="16384")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    report = json.loads((args.out / "throughput.json").read_text())
    md = (args.out / "throughput.md").read_text()
    rows = {r["seq_len"]: r for r in report["models"]["bert-base"]}
    added = []
    for n in (int(x) for x in args.seq_lens.split(",")):
        if rows.get(n, {}).get("original_peak_mb") is not None:
            continue
        peak = measure(n)
        rows[n]["original_peak_mb"] = None if peak is None else round(peak, 1)
        added.append({"seq_len": n, "original_peak_mb": rows[n]["original_peak_mb"],
                      "converted_peak_mb": rows[n].get("converted_peak_mb")})
        conv = rows[n].get("converted_peak_mb")
        if peak is not None and conv is not None:
            verdict = "met" if conv <= peak else "missed"
            old = next(line for line in md.splitlines() if line.startswith(f"| bert-base peak memory <= original at {n} |"))
            md = md.replace(old, f"| bert-base peak memory <= original at {n} | {conv:.0f} vs {peak:.0f} MiB ({verdict}; "
                                 f"original measured by benchmarks/original_peak.py) |")
    if added:
        report["original_peak_supplement"] = {"command": "python benchmarks/original_peak.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": added}
        lines = ["", "## The original's peak where the time limit skipped it (benchmarks/original_peak.py)", "",
                 "Measured right after the run above, the same way (first call after a warm-up, one thread):", "",
                 "| N | original (SDPA) peak MiB | converted peak MiB |", "|---|---|---|"]
        lines += [f"| {a['seq_len']} | {a['original_peak_mb']} | {a['converted_peak_mb']} |" for a in added]
        md = md.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
        (args.out / "throughput.json").write_text(json.dumps(report, indent=1))
        (args.out / "throughput.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
