"""Prefill memory and speed: a random BERT-base against its quality-config M2 conversion, batch 1, fp32.

    1. Peak memory of the first call at each N, after one warm-up call of each at N = 128 (``m2convert.bench.measure_peak_mb``: growth of the
       resident set's high-water mark), original (SDPA) and converted.
    2. Where the converted model's peak goes at each N: filter spectra its mixers keep, and one layer's
       pieces (mixer, MLP fc1 + activation, MLP fc2 + LayerNorm) measured alone on that layer's input.
    3. Latency at a few lengths, original and converted interleaved in rounds (medians of wall and
       process CPU time; the CPU time is the steadier one on a shared machine).

Run:   python benchmarks/memory.py                        (writes benchmarks/results/memory.{json,md})
       python benchmarks/memory.py --seq-lens 256 --time-lens 256 --layers 2 --out runs/memory_smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from m2convert.bench import extend_positions, measure_peak_mb
from m2convert.layers import sequence as sequence_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import RESULTS, bert_base, convert, quality_configs  # noqa: E402


def spectra_mib() -> float:
    """MiB of filter spectra the live mixers hold (0 where the cache accounting is absent)."""
    held = getattr(sequence_layer, "_cached_bytes", None)
    if held is not None:
        return held() / 2**20
    import gc
    total = 0
    for obj in gc.get_objects():
        if isinstance(obj, sequence_layer.M2SequenceMixer) and obj._spectrum_cache is not None:
            total += obj._spectrum_cache[1].numel() * obj._spectrum_cache[1].element_size()
    return total / 2**20


def layer_pieces(model, n: int) -> dict:
    """Peak MiB of the first encoder layer's pieces, each run alone on an (1, n, H) input."""
    layer = model.encoder.layer[0]
    h = torch.randn(1, n, model.config.hidden_size)
    with torch.inference_mode():
        mixer, _ = measure_peak_mb(lambda: layer.attention(h))
        inter, mid = measure_peak_mb(lambda: layer.intermediate(h))
        out, _ = measure_peak_mb(lambda: layer.output(mid, h))
    return {"mixer": mixer, "mlp_fc1_act": inter, "mlp_fc2_norm": out,
            "mlp_intermediate_tensor": mid.numel() * mid.element_size() / 2**20}


def peaks(original, converted, n: int, original_max_len: int) -> dict:
    ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
    row = {"N": n, "original": None}
    with torch.inference_mode():
        if n <= original_max_len:
            row["original"], _ = measure_peak_mb(lambda: original(input_ids=ids))
        row["converted"], _ = measure_peak_mb(lambda: converted(input_ids=ids))
    row["spectra_kept"] = spectra_mib()
    row["pieces"] = layer_pieces(converted, n)
    return row


def timings(original, converted, n: int, rounds: int) -> dict:
    ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
    wall = {"original": [], "converted": []}
    cpu = {"original": [], "converted": []}
    models = [("original", original), ("converted", converted)]
    with torch.inference_mode():
        converted(input_ids=ids)                                  # warm the filter cache
        for i in range(rounds):
            for name, model in models[i % 2:] + models[: i % 2]:
                w, c = time.perf_counter(), time.process_time()
                model(input_ids=ids)
                cpu[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - w)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    return {"N": n, "rounds": rounds, "wall_s": med, "cpu_s": cmed,
            "ratio_wall": med["original"] / med["converted"], "ratio_cpu": cmed["original"] / cmed["converted"]}


def markdown(report: dict) -> str:
    lines = [f"# memory\n\n{report['command']}\n", report["setup"] + "\n",
             "| N | original (SDPA) peak MiB | converted peak MiB | filter spectra kept MiB | one layer: mixer / "
             "MLP fc1+act / MLP fc2+norm MiB | MLP intermediate tensor MiB |", "|---|---|---|---|---|---|"]
    for r in report["memory"]:
        p = r["pieces"]
        orig = "not run" if r["original"] is None else f"{r['original']:.0f}"
        lines.append(f"| {r['N']} | {orig} | {r['converted']:.0f} | {r['spectra_kept']:.0f} | "
                     f"{p['mixer']:.0f} / {p['mlp_fc1_act']:.0f} / {p['mlp_fc2_norm']:.0f} | "
                     f"{p['mlp_intermediate_tensor']:.0f} |")
    lines += ["", "| N | rounds | original s (wall / cpu) | converted s (wall / cpu) | speedup wall | speedup cpu |",
              "|---|---|---|---|---|---|"]
    for t in report["timing"]:
        lines.append(f"| {t['N']} | {t['rounds']} | {t['wall_s']['original']:.2f} / {t['cpu_s']['original']:.2f} | "
                     f"{t['wall_s']['converted']:.2f} / {t['cpu_s']['converted']:.2f} | "
                     f"{t['ratio_wall']:.2f}x | {t['ratio_cpu']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="2048,8192,16384")
    p.add_argument("--time-lens", default="2048,8192")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--original-max-len", type=int, default=16384, help="measure the original up to this N")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lens = [int(n) for n in args.seq_lens.split(",") if n]
    tlens = [int(n) for n in args.time_lens.split(",") if n]
    original = bert_base(max(lens + tlens))
    if args.layers != 12:
        original.encoder.layer = original.encoder.layer[: args.layers]
        original.config.num_hidden_layers = args.layers
    config, shown = quality_configs()["full"]
    converted = convert(original, config).eval()
    extend_positions(converted, max(lens + tlens))
    report = {"command": "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "setup": f"random BERT-base ({args.layers} layers, H 768, intermediate 3072), batch 1, fp32, "
                       f"1 thread; converted: {shown}",
              "memory": [], "timing": []}
    warm = torch.ones(1, 128, dtype=torch.long)
    with torch.inference_mode():                        # one-time costs (thread pools, FFT plans) first
        original(input_ids=warm)
        converted(input_ids=warm)
    for n in lens:
        report["memory"].append(peaks(original, converted, n, args.original_max_len))
        print(json.dumps(report["memory"][-1]), flush=True)
    for n in tlens:
        report["timing"].append(timings(original, converted, n, args.rounds))
        print(json.dumps(report["timing"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(report, indent=1))
    (args.out / "memory.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
