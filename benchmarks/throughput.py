"""Throughput: pretrained/random BERTs against their M2 conversions, and MonarchLinear against nn.Linear.

    1. MonarchLinear vs nn.Linear at d = 1024/4096/8192, nblocks 4 and 16, against the FLOP-ratio
       limit (dense weights / Monarch weights = nblocks / 2), a (rows, d) fp32 input.
    2. Models, batch 1, fp32, ``m2convert.bench`` (interleaved rounds, medians, peak RSS growth):
       minilm             the bundled all-MiniLM-L6-v2 (position table 512) in the quality config
       bert-base          a random BERT-base (H 768, 12 layers, positions up to the longest N),
                          quality config
       bert-base-fastest  the same original, fastest recommended config (FASTEST below)
       The quality config is the one the SST-2 recovery report used (benchmarks/results/
       sst2_recovery.json) when it exists, else ConvertConfig defaults.
    3. A torch.profiler table of the converted BERT-base at the longest length both models ran.

Run:   python benchmarks/throughput.py                 (the committed report, ~25 min on 2 busy cores)
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
from m2convert.layers import M2SequenceMixer, MonarchLinear

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Fastest recommended: every linear of the encoder Monarch with 16 blocks (MLPs through ConvertConfig,
# the mixers' in/out projections projected after conversion, which ConvertConfig has no field for).
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


def quality_config() -> tuple[m2.ConvertConfig, str]:
    """The SST-2 recovery report's conversion settings when that report exists, else the defaults.

    That report's ``config`` is its command line: nblocks, rank, filter_order, no_sequence, no_dimension
    and layers (a comma list of converted layer indices, empty for all).
    """
    path = RESULTS / "sst2_recovery.json"
    if not path.exists():
        return m2.ConvertConfig(), "ConvertConfig defaults (benchmarks/results/sst2_recovery.json not written yet)"
    args = json.loads(path.read_text()).get("config", {})
    fields = {k: args[k] for k in ("nblocks", "rank", "filter_order", "filter_emb_dim") if k in args}
    fields.update(sequence=not args.get("no_sequence", False), dimension=not args.get("no_dimension", False))
    layers = str(args.get("layers") or "")
    if layers:
        keep = {int(i) for i in layers.split(",")}
        fields["filter_fn"] = lambda _m, fqn: (lambda mt: mt is None or int(mt.group(1)) in keep)(
            re.search(r"layer\.(\d+)\.", fqn))
    shown = {k: v for k, v in fields.items() if k != "filter_fn"} | ({"layers": layers} if layers else {})
    return m2.ConvertConfig(**fields), f"the settings of {path.relative_to(ROOT)}: {shown}"


def monarch_projections(model: nn.Module, nblocks: int) -> nn.Module:
    """Project every M2 mixer's in/out projection onto MonarchLinear (in place); returns ``model``."""
    for mixer in [m for m in model.modules() if isinstance(m, M2SequenceMixer)]:
        mixer.in_proj = MonarchLinear.from_dense(mixer.in_proj, nblocks=nblocks)
        mixer.out_proj = MonarchLinear.from_dense(mixer.out_proj, nblocks=nblocks)
    return model


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,bert-base,bert-base-fastest")
    p.add_argument("--seq-lens", default="512,2048,4096,8192,16384,32768")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on this shared 2-core machine two threads ran both models "
                        "slower, the converted one 2x slower, from OpenMP threads waiting on each other)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds-per-length", type=float, default=45.0)
    p.add_argument("--max-call-s", type=float, default=150.0)
    p.add_argument("--micro-dims", default="1024,4096,8192")
    p.add_argument("--micro-rows", type=int, default=2048)
    p.add_argument("--micro-repeats", type=int, default=9)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="tiny sizes to check the pipeline")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.micro_dims, args.micro_rows, args.repeats = "64,128", "256", 64, 2
        args.models, args.out = "bert-base", ROOT / "runs" / "bench_smoke"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    names = args.models.split(",")
    start = time.perf_counter()
    micro = monarch_linear_rows([int(d) for d in args.micro_dims.split(",")], (4, 16), args.micro_rows,
                                args.micro_repeats)
    qcfg, qsource = quality_config()
    fcfg = m2.ConvertConfig(nblocks=FASTEST["nblocks"], filter_order=qcfg.filter_order,
                            filter_emb_dim=qcfg.filter_emb_dim)
    opts = dict(repeats=args.repeats, seconds_per_length=args.seconds_per_length, max_call_s=args.max_call_s,
                threads=args.threads, progress=log)
    results, sections = {}, []
    if "minilm" in names:
        original = m2.load_model("all-MiniLM-L6-v2")
        results.update(bench_many(original, {"minilm": convert(original, qcfg)}, seq_lens, **opts))
    base_names = [n for n in names if n.startswith("bert-base")]
    if base_names:
        original = bert_base(max(seq_lens))
        converted = {}
        if "bert-base" in base_names:
            converted["bert-base"] = convert(original, qcfg)
        if "bert-base-fastest" in base_names:
            converted["bert-base-fastest"] = monarch_projections(convert(original, fcfg),
                                                                 FASTEST["projection_nblocks"])
        results.update(bench_many(original, converted, seq_lens, **opts))
        bound = ["## FLOP ratio of the BERT-base encoders (the speedup at equal FLOP/s)", "",
                 "| N | " + " | ".join(converted) + " |", "|---|" + "---|" * len(converted)]
        bound += [f"| {n} | " + " | ".join(f"{encoder_flops(original, n) / encoder_flops(m, n):.2f}x"
                                             for m in converted.values()) + " |" for n in seq_lens]
        sections.append("\n".join(bound) + "\n")
        both = [r.seq_len for r in results[base_names[0]].rows if r.ratio]
        if both and "bert-base" in converted:
            n = max(both)
            log(f"profiling the converted bert-base at N={n}")
            sections.append(f"## Where the time goes: converted bert-base, N={n}, one forward\n\n```\n"
                            f"{profile_table(converted['bert-base'], n)}\n```\n")
    config = {"quality": {**qcfg.to_dict(), "source": qsource},
              "fastest": {**fcfg.to_dict(), "projection_nblocks": FASTEST["projection_nblocks"]},
              "threads": args.threads, "seq_lens": seq_lens, "batch": 1, "dtype": "float32",
              "micro_rows": args.micro_rows, "models": {k: r.meta for k, r in results.items()}}
    notes = [f"quality config: {qsource}",
             f"fastest config: nblocks={FASTEST['nblocks']} MLPs and Monarch in/out projections "
             f"(nblocks={FASTEST['projection_nblocks']}); its recovered quality is not measured here",
             f"torch threads: {args.threads}; total run {time.perf_counter() - start:.0f} s"]
    micro_md = ["## MonarchLinear vs nn.Linear (fp32, inference)", "",
                "| d | nblocks | speedup | FLOP-ratio limit | of limit | reference layout |",
                "|---|---|---|---|---|---|"]
    micro_md += [f"| {r['d']} | {r['nblocks']} | {r['ratio']:.2f}x | {r['flop_ratio_limit']:.1f}x | "
                 f"{100 * r['fraction_of_limit']:.0f}% | {r['reference_ratio']:.2f}x |" for r in micro]
    write_report(results, args.out, "throughput", extra={"monarch_linear": micro}, notes=notes,
                 sections=["\n".join(micro_md) + "\n", *sections], config=config)
    log(f"wrote {args.out / 'throughput.json'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
