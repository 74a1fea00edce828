"""SST-2 Pareto table: accuracy, parameters and speed of several conversions against one teacher.

Every row is a run of benchmarks/sst2_recovery.py against the same cached teacher with the same
recovery budget (the headline run's unless --budget sets another), plus the speed of the same
conversion from the throughput harness (m2convert.bench): a MiniLM-shaped BERT (H 384, 6 layers,
12 heads, MLP 1536) with a position table long enough for N = 2,048 and 8,192, random weights (speed does not depend on them), one thread,
the original with SDPA.

    mlp-only        attention kept, MLP linears -> Monarch (nblocks 4)
    full-nb4        every attention and MLP converted, MLPs at nblocks 4
    full-monarch    full-nb4 with Monarch in/out projections of the mixers (projection_nblocks 4)
    hybrid-keep1/2  full-nb4 with the attention of the 1 / 2 layers a convolution fits worst kept dense
                    (each layer's offset-fit error after the headline run's filter seeding)
    fastest-nb16    every linear Monarch with 16 blocks (nblocks 16, projection_nblocks 16)
    full            the headline run's own conversion (not in the default rows; with the headline's
                    budget, the headline run itself)

The other settings (filter order, seeding, learning rates, batch) are the headline run's.

Rows already run (runs/bench_variants/sst2_pareto_<row>.json; runs/bench_smoke/pareto/ for a --smoke
headline) are read, not rerun.

Run:   python benchmarks/sst2_pareto.py --budget 300,1000        (the rows, then the speed, into the report)
       python benchmarks/sst2_pareto.py --budget 300,1000 --rows mlp-only,hybrid-keep1 --no-speed
       python benchmarks/sst2_pareto.py --budget 300,1000 --speed-only   (speed of every row already run)
The table holds the rows of the last run that measured speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sst2_recovery  # noqa: E402
from common import RESULTS, ROOT, log, markdown_table  # noqa: E402
from throughput import config_of  # noqa: E402

import m2convert as m2  # noqa: E402
from m2convert.bench import bench_many  # noqa: E402

VARIANTS = ROOT / "runs" / "bench_variants"
SMOKE_ROWS = ROOT / "runs" / "bench_smoke" / "pareto"
ROWS = {"mlp-only": ["--no-sequence", "--nblocks", "4"],
        "full-nb4": ["--nblocks", "4"],
        "full-monarch": ["--nblocks", "4", "--projection-nblocks", "4"],
        "hybrid-keep1": ["--nblocks", "4", "--keep-attention", "{keep1}"],
        "hybrid-keep2": ["--nblocks", "4", "--keep-attention", "{keep2}"],
        "fastest-nb16": ["--nblocks", "16", "--projection-nblocks", "16"],
        "full": []}
DEFAULT_ROWS = [name for name in ROWS if name != "full"]
# Options of the headline run every row shares (the recovery budget and the filter settings).
SHARED = ("nblocks", "transfer_steps", "task_steps", "transfer_lr", "task_lr", "filter_order", "batch_size", "temperature",
          "kd_weight", "schedule", "seed_filter_batches")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=1, help="threads of the recovery runs")
    p.add_argument("--speed-only", action="store_true", help="measure the rows already run; run none")
    p.add_argument("--no-speed", action="store_true", help="run the rows only; measure speed later (--speed-only)")
    p.add_argument("--budget", default="", help="TRANSFER,TASK steps of every row (default: the headline's)")
    p.add_argument("--seq-lens", default="2048,8192")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report", type=Path, default=RESULTS / "sst2_recovery.json", help="the headline report")
    args = p.parse_args(argv)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    return args


def kept_layers(headline: dict) -> list[int]:
    """Layer indices, the worst offset-fit error (after seeding) first, from the headline run."""
    seeding = headline.get("seed_filters") or {}
    if not seeding.get("layers"):
        raise SystemExit(f"the headline report has no filter seeding to rank layers by; rerun "
                         f"benchmarks/sst2_recovery.py with --seed-filters (config: {headline['config']})")
    errors = {int(path.split("layer.")[1].split(".")[0]): v["fit_error_after"]
              for path, v in seeding["layers"].items()}
    return sorted(errors, key=lambda i: -errors[i])


def row_argv(name: str, headline: dict, threads: int, budget: str) -> list[str]:
    """The sst2_recovery.py command line of one row: the headline's settings plus the row's conversion."""
    cfg, order = headline["config"], kept_layers(headline)
    argv = ["--threads", str(threads), "--name", row_name(name, budget), "--out", str(rows_dir(headline))]
    for key in SHARED:
        argv += [f"--{key.replace('_', '-')}", str(cfg[key])]
    if cfg.get("smoke"):
        argv.append("--smoke")
    if budget:
        transfer, task = budget.split(",")
        argv += ["--transfer-steps", transfer, "--task-steps", task]
    if cfg.get("seed_filters") and name != "mlp-only":
        argv.append("--seed-filters")
        if cfg.get("seed_open_gates") and name not in ("full-monarch", "fastest-nb16"):   # needs a dense in_proj
            argv.append("--seed-open-gates")
    fill = {"keep1": ",".join(map(str, sorted(order[:1]))), "keep2": ",".join(map(str, sorted(order[:2])))}
    return argv + [a.format(**fill) for a in ROWS[name]]


def rows_dir(headline: dict) -> Path:
    return SMOKE_ROWS if headline["config"].get("smoke") else VARIANTS


def row_name(name: str, budget: str) -> str:
    return f"sst2_pareto_{name}" + (f"_{budget.replace(',', '_')}" if budget else "")


def run_rows(names: list[str], headline: dict, args) -> dict:
    """{row: its report}; without --budget, the row "full" is the headline run."""
    reports = {}
    for name in names:
        path = rows_dir(headline) / f"{row_name(name, args.budget)}.json"
        if name == "full" and not args.budget:
            reports[name] = headline
        elif path.exists():
            reports[name] = json.loads(path.read_text())
        elif not args.speed_only:
            argv = row_argv(name, headline, args.threads, args.budget)
            log(f"row {name}: python benchmarks/sst2_recovery.py {' '.join(argv)}")
            sst2_recovery.main(argv)
            reports[name] = json.loads(path.read_text())
        else:
            log(f"row {name}: not run yet ({path}); skipped by --speed-only")
    return reports


def minilm_shaped(max_len: int) -> torch.nn.Module:
    import transformers
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, max_position_embeddings=max(512, max_len))
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def speed(reports: dict, seq_lens: list[int], repeats: int) -> dict:
    """{row: {N: converted / original throughput}} from one interleaved bench_many run (one thread)."""
    original = minilm_shaped(max(seq_lens))
    example = {"input_ids": torch.ones(1, 16, dtype=torch.long)}
    converted = {name: m2.convert(original, config_of(r["config"])[0], example_inputs=example)
                 for name, r in reports.items()}
    results = bench_many(original, converted, seq_lens, repeats=repeats, eager=False, threads=1,
                         max_call_s=600.0, progress=log)
    return {name: {row.seq_len: row.ratio for row in res.rows} for name, res in results.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    headline = json.loads(args.report.read_text())
    reports = run_rows(args.rows.split(","), headline, args)
    if args.no_speed:
        log(f"rows {', '.join(reports)} run; their speed comes with --speed-only")
        return {"rows": list(reports)}
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    ratios = speed(reports, seq_lens, args.repeats)
    pareto = [{"name": name, "dev_acc": r["recovered_dev_acc"], "params": r["student_params"],
               "param_reduction": r["param_reduction"], "cpu_seconds": r["cpu_seconds"],
               "conversion": sst2_recovery.conversion_text(r["config"]), "command": r["command"],
               **{f"ratio_{n}": ratios[name].get(n) for n in seq_lens}} for name, r in reports.items()]
    doc = json.loads(args.report.read_text())
    doc["pareto"] = pareto
    doc["pareto_speed"] = {"model": "MiniLM-shaped BertModel (H 384, 6 layers, MLP 1536), random weights",
                           "batch": 1, "threads": 1, "original_attention": "sdpa", "repeats": args.repeats,
                           "seq_lens": seq_lens, "budget": args.budget or "the headline run's",
                           "command": " ".join(["python", "benchmarks/sst2_pareto.py", *(argv or sys.argv[1:])])}
    args.report.write_text(json.dumps(doc, indent=2) + "\n")
    sst2_recovery.write_markdown(args.report.stem, sst2_recovery.render, args.report.parent)
    log(f"wrote pareto ({len(pareto)} rows) into {args.report}")
    return {"pareto": pareto}


def pareto_table(doc: dict) -> str:
    """The markdown of the report's ``pareto`` rows (used by sst2_recovery.render)."""
    lens = doc["pareto_speed"]["seq_lens"]
    rows = [[p["name"], p["conversion"], f"{p['dev_acc']:.4f}", f"{100 * (doc['teacher_dev_acc'] - p['dev_acc']):.2f}",
             f"{p['params']:,}", f"{100 * p['param_reduction']:.1f}%",
             *(f"{p[f'ratio_{n}']:.2f}x" if p.get(f"ratio_{n}") else "-" for n in lens),
             f"{p['cpu_seconds'] / 60:.1f}"] for p in doc["pareto"]]
    return markdown_table(["row", "conversion", "dev acc", "gap (points)", "params", "fewer",
                           *(f"speed N={n}" for n in lens), "student CPU min"], rows)


if __name__ == "__main__":
    main()
