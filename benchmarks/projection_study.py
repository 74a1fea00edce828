"""Projection study: how much of all-MiniLM-L6-v2's dense weights each Monarch setting keeps.

For every (nblocks, rank) in the grid, project each pretrained linear of one kind onto MonarchLinear
(the Frobenius-optimal blockwise truncated SVD of ``MonarchLinear.from_weight``) and report the relative
Frobenius error ||W - M||_F / ||W||_F (mean and worst over the layers) next to the parameter fraction
kept. Kinds: the MLP linears (intermediate, output) and the attention projections (Q, K, V, O: the
weights ``projection_nblocks`` projects). This is what the conversion starts from, before any recovery;
the SST-2 recovery report links it for the "rank > 1 / more blocks" settings.

Run:   python benchmarks/projection_study.py          (about a minute)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Clock, log, markdown_table, write_markdown, write_report  # noqa: E402

import m2convert as m2  # noqa: E402
from m2convert.layers.monarch import MonarchLinear  # noqa: E402

GRID = [(2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (16, 1), (16, 4), (16, 8)]
KINDS = {"mlp": ("intermediate.dense", "output.dense"),
         "attention": ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense")}


def linears(model: torch.nn.Module, kind: str) -> dict[str, torch.nn.Linear]:
    """{path: nn.Linear} of one kind across the encoder layers."""
    suffixes = KINDS[kind]
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layer." not in f".{name}":
            continue
        if any(name.endswith(s) for s in suffixes) and not (kind == "mlp" and "attention" in name):
            out[name] = module
    return out


def study(model: torch.nn.Module, grid=GRID) -> list[dict]:
    """One row per (kind, nblocks, rank): mean / max relative error and the parameter fraction kept."""
    rows = []
    for kind in KINDS:
        layers = linears(model, kind)
        dense = sum(m.weight.numel() for m in layers.values())
        for nblocks, rank in grid:
            errors, params = [], 0
            for lin in layers.values():
                mon = MonarchLinear.from_dense(lin, nblocks=nblocks, rank=rank)
                w = lin.weight.detach().double()
                errors.append(float((mon.to_dense().detach().double() - w).norm() / w.norm()))
                params += mon.w1.numel() + mon.w2.numel()
            rows.append({"kind": kind, "layers": len(layers), "nblocks": nblocks, "rank": rank,
                         "mean_rel_error": statistics.fmean(errors), "max_rel_error": max(errors),
                         "param_fraction": params / dense})
            log(f"{kind} nblocks={nblocks} rank={rank}: error {rows[-1]['mean_rel_error']:.3f}, "
                f"params {rows[-1]['param_fraction']:.3f} of dense")
    return rows


def render(doc: dict) -> str:
    out = []
    for kind in KINDS:
        rows = [r for r in doc["rows"] if r["kind"] == kind]
        if not rows:
            continue
        out += [f"## {kind} linears ({rows[0]['layers']} layers)", "",
                markdown_table(["nblocks", "rank", "weights kept (of dense)", "mean rel. error", "max rel. error"],
                               [[r["nblocks"], r["rank"], r["param_fraction"], r["mean_rel_error"],
                                 r["max_rel_error"]] for r in rows]), ""]
        groups = {}
        for r in rows:                                   # settings with the same parameter budget
            groups.setdefault(round(r["param_fraction"], 4), []).append(r)
        for frac, same in sorted(groups.items()):
            if len(same) > 1:
                best = min(same, key=lambda r: r["mean_rel_error"])
                others = ", ".join(f"nblocks {r['nblocks']} rank {r['rank']} {r['mean_rel_error']:.3f}"
                                   for r in same if r is not best)
                out += [f"- {frac:.3f} of the dense weights: nblocks {best['nblocks']} rank {best['rank']} keeps "
                        f"the most (error {best['mean_rel_error']:.3f}; {others})"]
        out += [""]
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render", action="store_true")
    args = p.parse_args(argv)
    if args.render:
        return {"markdown": str(write_markdown("projection_study", render, args.out))}
    torch.set_num_threads(args.threads)
    clock = Clock()
    model = m2.load_model("all-MiniLM-L6-v2")
    rows = study(model)
    path = write_report("projection_study", {"rows": rows, "wall_seconds": clock.total},
                        {"grid": GRID, "model": "all-MiniLM-L6-v2"}, render, args.out)
    log(f"wrote {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
