"""Throughput: pretrained/random BERTs against their M2 conversions, and MonarchLinear against nn.Linear.

    1. MonarchLinear vs nn.Linear at d = 1024/4096/8192, nblocks 4 and 16, against the FLOP-ratio
       limit (dense weights / Monarch weights = nblocks / 2), a (rows, d) fp32 input.
    2. Models, batch 1, fp32, ``m2convert.bench`` (interleaved rounds, medians, peak RSS growth):
       minilm             the bundled all-MiniLM-L6-v2 (position table 512) in the quality config
       bert-base          a random BERT-base (H 768, 12 layers, positions up to the longest N),
                          quality config
       bert-base-fastest  the same original, fastest recommended config (FASTEST below)
       bert-base-mlp-only the same original, MLPs only, when that is the recovery report's headline run
       The quality config is the best attention + MLP run of the SST-2 recovery report (benchmarks/
       results/sst2_recovery.json, its variants included) when it exists, else ConvertConfig defaults.
    3. A torch.profiler table of the converted BERT-base at the longest length both models ran.

Run:   python benchmarks/throughput.py                 (the committed report, ~40 min on 2 busy cores)
       python benchmarks/throughput.py --smoke         (seconds; writes to runs/bench_smoke/)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import m2convert as m2
from m2convert.bench import bench_many
from m2convert.bench_report import write_report
from m2convert.kernels.monarch.reference import monarch_matmul
from m2convert.layers import MonarchLinear

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Fastest recommended: every linear of the encoder Monarch with 16 blocks (ConvertConfig fields: nblocks
# for the MLPs, projection_nblocks for the mixers' in/out projections).
FASTEST = {"nblocks": 16, "projection_nblocks": 16}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def monarch_linear_rows(dims, nblocks_list, rows: int, repeats: int) -> list[dict]:
    """Interleaved nn.Linear / MonarchLinear / reference timings; ratio = median of per-round ratios.

    The order rotates each round: whichever call ran right after the dense layer measured up to 1.4x
    slower (d = 1024), so a fixed order would favour one side.
    """
    out = []
    for d in dims:
        torch.manual_seed(0)
        dense, x = nn.Linear(d, d), torch.randn(rows, d)
        for nb in nblocks_list:
            layer = MonarchLinear(d, d, nblocks=nb)
            limit = d * d / (layer.w1.numel() + layer.w2.numel())
            calls = {"dense": lambda: dense(x), "monarch": lambda: layer(x),
                     "reference": lambda: monarch_matmul(x, layer.w1, layer.w2) + layer.bias}
            times = {k: [] for k in calls}
            with torch.inference_mode():
                for f in calls.values():
                    f()
                order = list(calls)
                for i in range(repeats):
                    for k in order[i % 3:] + order[: i % 3]:      # rotated: who follows whom matters
                        start = time.perf_counter()
                        calls[k]()
                        times[k].append(time.perf_counter() - start)
            ratio = statistics.median(a / b for a, b in zip(times["dense"], times["monarch"]))
            ref = statistics.median(a / b for a, b in zip(times["dense"], times["reference"]))
            out.append({"d": d, "nblocks": nb, "ratio": round(ratio, 3), "flop_ratio_limit": round(limit, 3),
                        "fraction_of_limit": round(ratio / limit, 3), "reference_ratio": round(ref, 3),
                        "dense_ms": round(statistics.median(times["dense"]) * 1e3, 2),
                        "monarch_ms": round(statistics.median(times["monarch"]) * 1e3, 2), "rows": rows})
            log(f"MonarchLinear d={d} nb={nb}: {ratio:.2f}x (limit {limit:.1f}x, reference {ref:.2f}x)")
    return out


def config_of(args: dict) -> tuple[m2.ConvertConfig, dict]:
    """ConvertConfig of an sst2_recovery.py command line (nblocks, rank, filter_order, projection_nblocks,
    no_sequence, no_dimension, layers: a comma list of converted layer indices, empty for all;
    keep_attention: a comma list of layers whose attention stays dense), and the settings shown.

    Reports written before --projection-nblocks existed lack it: their projections were dense (0).
    """
    keys = ("nblocks", "rank", "filter_order", "filter_emb_dim", "projection_nblocks", "keep_layers", "keep_heads",
            "selection_steps")
    fields = {k: args[k] for k in keys if k in args}
    if args.get("keep_layers") or args.get("keep_heads"):
        fields["selection"] = args.get("select", "auto")
    fields.update(sequence=not args.get("no_sequence", False), dimension=not args.get("no_dimension", False))
    layers, kept = str(args.get("layers") or ""), str(args.get("keep_attention") or "")
    if layers:
        keep = {int(i) for i in layers.split(",")}
        fields["filter_fn"] = lambda _m, fqn: (lambda mt: mt is None or int(mt.group(1)) in keep)(
            re.search(r"layer\.(\d+)\.", fqn))
    if kept:
        fields["overrides"] = {rf"layer\.{int(i)}\.attention$": None for i in kept.split(",")}
    shown = ({k: v for k, v in fields.items() if k not in ("filter_fn", "overrides")}
             | ({"layers": layers} if layers else {}) | ({"keep_attention": kept} if kept else {}))
    return m2.ConvertConfig(**fields), shown


def quality_configs() -> dict:
    """{name: (ConvertConfig, description)} of the conversions the SST-2 recovery report has quality for.

    "full": the best recovered run that converts attention with dense in/out projections (the quality
    config these speed targets are about); "fastest": the run in the FASTEST settings (Monarch MLPs and
    projections), when the report has one; "mlp-only": the best run that keeps attention, when there is one.
    Without the report: the ConvertConfig defaults for "full".
    """
    path = RESULTS / "sst2_recovery.json"
    if not path.exists():
        return {"full": (m2.ConvertConfig(), "ConvertConfig defaults (no benchmarks/results/sst2_recovery.json)")}
    report = json.loads(path.read_text())
    runs = [report] + list(report.get("variants", []))
    where = path.relative_to(ROOT)

    def described(run: dict, what: str) -> tuple[m2.ConvertConfig, str]:
        cfg, shown = config_of(run["config"])
        return cfg, (f"{shown}: SST-2 dev {run.get('recovered_dev_acc', 0):.4f} recovered vs teacher "
                     f"{run.get('teacher_dev_acc', 0):.4f}, {100 * run.get('param_reduction', 0):.1f}% fewer "
                     f"parameters ({what} {run['config'].get('name')} of {where})")

    def settings(run: dict) -> dict:
        return run.get("config", {})

    attention = [r for r in runs if not settings(r).get("no_sequence", False)]
    dense = [r for r in attention if not settings(r).get("projection_nblocks", 0)]
    out = {"full": described(max(dense, key=lambda r: r.get("recovered_dev_acc") or 0), "run") if dense
           else (m2.ConvertConfig(), "ConvertConfig defaults (the recovery report has no attention run)")}
    fastest = [r for r in attention if settings(r).get("projection_nblocks", 0) == FASTEST["projection_nblocks"]
               and settings(r).get("nblocks") == FASTEST["nblocks"]]
    if fastest:
        out["fastest"] = described(max(fastest, key=lambda r: r.get("recovered_dev_acc") or 0), "run")
    kept = [r for r in runs if settings(r).get("no_sequence", False)]
    if kept:
        out["mlp-only"] = described(max(kept, key=lambda r: r.get("recovered_dev_acc") or 0), "run")
    return out


def convert(model, config: m2.ConvertConfig) -> nn.Module:
    return m2.convert(model, config, example_inputs={"input_ids": torch.ones(1, 16, dtype=torch.long)})


def bert_base(max_len: int) -> nn.Module:
    import transformers
    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=max(512, max_len))
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def encoder_flops(model: nn.Module, n: int) -> float:
    """Forward FLOPs of a BERT encoder at length n (batch 1): linears, attention's N^2 core, M2 blocks."""
    from m2convert.layers.base import M2Block
    from m2convert.layers.cost import attention_flops, evaluate
    total, inside = 0.0, set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside) or ".encoder." not in f".{name}.":
            continue
        if isinstance(module, M2Block):
            total += float(module.flops(n, 1))
            inside.add(name)
        elif isinstance(module, nn.Linear):
            total += 2 * n * module.in_features * module.out_features
        elif type(module).__name__.endswith("SelfAttention"):
            total += evaluate(attention_flops(model.config.hidden_size), n)
    return total


def profile_table(model: nn.Module, n: int, rows: int = 15) -> str:
    """Self-CPU time by op of one forward at length n (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.inference_mode():
        model(input_ids=ids)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=ids)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _row(results: dict, name: str, n: int):
    return next((r for r in results[name].rows if r.seq_len == n), None) if name in results else None


def memory_targets(results: dict, breakdown_rows: list[dict]) -> list[str]:
    """Peak memory rows of the targets table: converted <= original, 32768 under 1 GB, prediction within 25%."""
    lines = []
    for n in (2048, 8192, 16384):
        row = _row(results, "bert-base", n)
        if row is None or row.converted_peak_mb is None:
            lines.append(f"| bert-base peak memory <= original at {n} | not run |")
            continue
        orig = "-" if row.original_peak_mb is None else f"{row.original_peak_mb:.0f}"
        ok = row.original_peak_mb is not None and row.converted_peak_mb <= row.original_peak_mb
        lines.append(f"| bert-base peak memory <= original at {n} | {row.converted_peak_mb:.0f} vs {orig} MiB "
                     f"({'met' if ok else 'missed'}) |")
    row = _row(results, "bert-base", 32768)
    peak = "not run" if row is None or row.converted_peak_mb is None else f"{row.converted_peak_mb:.0f} MiB"
    lines.append(f"| bert-base peak memory < 1024 MiB at 32768 | {peak} |")
    live = [(r["N"], r["predicted_mb"] / r["live_tensors_mb"] - 1) for r in breakdown_rows if r["live_tensors_mb"]]
    rss = [(r.seq_len, r.converted_predicted_mb / r.converted_peak_mb - 1) for r in results["bert-base"].rows
           if r.converted_predicted_mb and r.converted_peak_mb and r.seq_len >= 2048] if "bert-base" in results else []

    def worst(errors):
        e = max(errors, key=lambda e: abs(e[1]), default=None)
        return "not run" if e is None else f"worst {100 * e[1]:+.0f}% (N={e[0]})"
    lines.append(f"| plan's predicted peak within 25% of the measured (bert-base, N >= 2048) | live tensors: "
                 f"{worst(live)}; resident set: {worst(rss)} |")
    return lines


def targets(results: dict, micro: list[dict], breakdown_rows: list[dict]) -> str:
    """The targets against what this run measured."""
    def ratio(name, n):
        row = _row(results, name, n)
        if row is None:
            return "not run"
        if not row.ratio:
            return row.original_status
        return f"{row.ratio:.2f}x (median of {row.repeats} round{'s' if row.repeats > 1 else ''})"

    lines = ["## Targets", "", "| target | measured |", "|---|---|",
             f"| bert-base (quality config) >= 2.3x at 2048 | {ratio('bert-base', 2048)} |",
             f"| bert-base (quality config) >= 4.6x at 8192 (95% of its FLOP bound) | {ratio('bert-base', 8192)} |",
             f"| MiniLM-shaped (quality config) >= 2x at 2048, two threads | {ratio('minilm-shaped', 2048)} |",
             f"| bert-base-fastest >= 9.1x at 8192 | {ratio('bert-base-fastest', 8192)} |",
             *memory_targets(results, breakdown_rows)]
    for r in micro:
        if r["d"] == 4096:
            lines.append(f"| MonarchLinear d=4096 nb={r['nblocks']} >= 80% of its FLOP limit "
                         f"({r['flop_ratio_limit']:.0f}x) | {r['ratio']:.2f}x ({100 * r['fraction_of_limit']:.0f}%) |")
    return "\n".join(lines) + "\n"


def minilm_shaped(max_len: int) -> nn.Module:
    """A random encoder shaped like all-MiniLM-L6-v2 (H 384, 6 layers, 12 heads, I 1536), positions to max_len."""
    import transformers
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, max_position_embeddings=max(512, max_len))
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def memory_sections(converted: nn.Module, seq_lens: list[int]) -> tuple[str, list[dict]]:
    """The converted bert-base's memory breakdown at each N >= 2048, and the previous revisions' numbers."""
    from memory import breakdown, breakdown_table
    rows = []
    for n in [n for n in seq_lens if n >= 2048]:
        log(f"memory breakdown of the converted bert-base at N={n}")
        rows.append(breakdown(converted, n))
    lines = ["## Where the converted bert-base's peak goes (MiB, after)", "", breakdown_table(rows), "",
             "Live tensors: glibc's in-use bytes polled after every op (m2convert.bench_memory), what the plan's "
             "RewritePlan.memory(N) predicts; the peak columns above are the resident set, which also holds "
             "the freed heap blocks glibc keeps for reuse.", ""]
    before_path = RESULTS / "memory_before.json"
    if before_path.exists():
        before = json.loads(before_path.read_text())
        lines += ["## Before (previous revisions, benchmarks/results/memory_before.{json,md})", "",
                  f"Then: {before['setup']}", "",
                  "| N | converted peak MiB with every mixer's spectra cached (throughput.json then) | "
                  "filter spectra kept MiB | one layer: mixer / MLP fc1+act / MLP fc2+norm MiB | "
                  "MLP intermediate (whole) MiB |", "|---|---|---|---|---|"]
        old_peaks = {r["seq_len"]: r["converted_peak_mb"] for r in before["throughput_before"]["bert-base"]}
        for r in before["before"]["memory"]:
            p = r["pieces"]
            lines.append(f"| {r['N']} | {old_peaks.get(r['N'], '-')} | {r['spectra_kept']:.0f} | "
                         f"{p['mixer']:.0f} / {p['mlp_fc1_act']:.0f} / {p['mlp_fc2_norm']:.0f} | "
                         f"{p['mlp_intermediate_tensor']:.0f} |")
        lines += ["", "Converted peaks then at 16384 / 32768: " + " / ".join(
            f"{old_peaks.get(n)} MiB" for n in (16384, 32768)) + "."]
    return "\n".join(lines) + "\n", rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,minilm-shaped,bert-base,bert-base-fastest,bert-base-mlp-only")
    p.add_argument("--shaped-threads", type=int, default=2, help="threads of the MiniLM-shaped run")
    p.add_argument("--shaped-lens", default="2048")
    p.add_argument("--seq-lens", default="512,2048,4096,8192,16384,32768")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on this shared 2-core machine two threads ran both models "
                        "slower, the converted one 2x slower, from OpenMP threads waiting on each other)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds-per-length", type=float, default=360.0,
                   help="time budget of each length's rounds (360: BERT-base gets 5 rounds at 2048 and 3 at "
                        "8192; at 60 both targets were one round, whose ratio moved 15%% from run to run)")
    p.add_argument("--max-call-s", type=float, default=160.0)
    p.add_argument("--eager-max-len", type=int, default=4096,
                   help="time eager attention up to this N (at 8192 one eager call took 3 minutes)")
    p.add_argument("--micro-dims", default="1024,4096,8192")
    p.add_argument("--micro-rows", type=int, default=2048)
    p.add_argument("--micro-repeats", type=int, default=9)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.micro_dims, args.micro_rows, args.repeats = "64,128", "256", 64, 2
        args.models, args.out, args.shaped_lens = "minilm-shaped,bert-base", ROOT / "runs" / "bench_smoke", "128"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    names = args.models.split(",")
    start = time.perf_counter()
    micro = monarch_linear_rows([int(d) for d in args.micro_dims.split(",")], (4, 16), args.micro_rows,
                                args.micro_repeats)
    configs = quality_configs()
    qcfg, qsource = configs["full"]
    if "fastest" in configs:
        fcfg, fsource = configs["fastest"]
    else:
        fcfg = m2.ConvertConfig(nblocks=FASTEST["nblocks"], projection_nblocks=FASTEST["projection_nblocks"],
                                filter_order=qcfg.filter_order, filter_emb_dim=qcfg.filter_emb_dim)
        fsource = (f"nblocks={fcfg.nblocks} MLPs and Monarch in/out projections (projection_nblocks="
                   f"{fcfg.projection_nblocks}); the recovery report has no run of it, so its quality is unmeasured")
    opts = dict(repeats=args.repeats, seconds_per_length=args.seconds_per_length, max_call_s=args.max_call_s,
                eager_max_len=args.eager_max_len, threads=args.threads, progress=log)
    results, sections, breakdown_rows = {}, [], []
    if "minilm" in names:
        original = m2.load_model("all-MiniLM-L6-v2")
        results.update(bench_many(original, {"minilm": convert(original, qcfg)}, seq_lens, **opts))
    if "minilm-shaped" in names:
        lens = [int(n) for n in args.shaped_lens.split(",")]
        original = minilm_shaped(max(lens))
        results.update(bench_many(original, {"minilm-shaped": convert(original, qcfg)}, lens,
                                  **{**opts, "threads": args.shaped_threads}))
    base_names = [n for n in names if n.startswith("bert-base")]
    if base_names:
        original = bert_base(max(seq_lens))
        converted = {}
        if "bert-base" in base_names:
            converted["bert-base"] = convert(original, qcfg)
        if "bert-base-fastest" in base_names:
            converted["bert-base-fastest"] = convert(original, fcfg)
        if "bert-base-mlp-only" in base_names and "mlp-only" in configs:
            converted["bert-base-mlp-only"] = convert(original, configs["mlp-only"][0])
        results.update(bench_many(original, converted, seq_lens, **opts))
        bound = ["## FLOP ratio of the BERT-base encoders (the speedup at equal FLOP/s)", "",
                 "| N | " + " | ".join(converted) + " |", "|---|" + "---|" * len(converted)]
        bound += [f"| {n} | " + " | ".join(f"{encoder_flops(original, n) / encoder_flops(m, n):.2f}x"
                                             for m in converted.values()) + " |" for n in seq_lens]
        sections.append("\n".join(bound) + "\n")
        if "bert-base" in converted:
            text, breakdown_rows = memory_sections(converted["bert-base"], seq_lens)
            sections.append(text)
        both = [r.seq_len for r in results[base_names[0]].rows if r.ratio]
        if both and "bert-base" in converted:
            n = max(both)
            log(f"profiling the converted bert-base at N={n}")
            sections.append(f"## Where the time goes: converted bert-base, N={n}, one forward\n\n```\n"
                            f"{profile_table(converted['bert-base'], n)}\n```\n")
    config = {"quality": {**qcfg.to_dict(), "source": qsource},
              **({"mlp_only": {**configs["mlp-only"][0].to_dict(), "source": configs["mlp-only"][1]}}
                 if "mlp-only" in configs else {}),
              "fastest": {**fcfg.to_dict(), "source": fsource},
              "threads": args.threads, "seq_lens": seq_lens, "batch": 1, "dtype": "float32",
              "micro_rows": args.micro_rows, "models": {k: r.meta for k, r in results.items()}}
    notes = [f"quality config (minilm, bert-base): {qsource}",
             *([f"bert-base-mlp-only: {configs['mlp-only'][1]}"] if "mlp-only" in configs else []),
             f"fastest config (bert-base-fastest): {fsource}",
             f"torch threads: {args.threads}; total run {time.perf_counter() - start:.0f} s"]
    notes.append("peak MiB: growth of the resident set during the first call at that N (VmHWM reset before "
                 "it); the converted models' includes building their filter-spectrum cache, net of the "
                 "previous length's cache, which it replaces. predicted MiB: the plan's RewritePlan.memory(N) "
                 "for the original and the converted model (passes/memory.py)")
    micro_md = ["## MonarchLinear vs nn.Linear (fp32, inference)", "",
                "| d | nblocks | speedup | FLOP-ratio limit | of limit | reference layout |",
                "|---|---|---|---|---|---|"]
    micro_md += [f"| {r['d']} | {r['nblocks']} | {r['ratio']:.2f}x | {r['flop_ratio_limit']:.1f}x | "
                 f"{100 * r['fraction_of_limit']:.0f}% | {r['reference_ratio']:.2f}x |" for r in micro]
    # throughput.json keeps "models" to minilm, bert-base and bert-base-fastest; the MLP-only
    # comparison rows go beside them.
    write_report(results, args.out, "throughput", extra={"monarch_linear": micro, "memory_breakdown": breakdown_rows},
                 notes=notes,
                 aside=("bert-base-mlp-only", "minilm-shaped"),
                 intro=[targets(results, micro, breakdown_rows)], sections=["\n".join(micro_md) + "\n", *sections], config=config)
    log(f"wrote {args.out / 'throughput.json'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
