"""Reports of the throughput benchmark: markdown table, JSON, log-log plot.

Example:
    >>> from m2convert.bench import bench
    >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
    ...                                  intermediate_size=64)
    >>> result = bench(transformers.BertModel(config), seq_lens=[32], repeats=1, threads=1)
    >>> data = write_report({"tiny": result}, "results", "throughput")      # results/throughput.json, .md (.png)
    >>> [row["seq_len"] for row in data["models"]["tiny"]]
    [32]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from .bench_rows import BenchRow


def _cell(value, status: str, fmt: str) -> str:
    return status if value is None else format(value, fmt)


def rows_table(rows: list[BenchRow]) -> str:
    """Markdown: tokens/ms, ratios, peak MiB and latency per N; a status where a variant did not run."""
    head = ["N", "original (SDPA) tok/ms", "eager tok/ms", "converted tok/ms", "ratio vs SDPA", "ratio vs eager",
            "peak MiB original / eager / converted", "predicted MiB original / converted",
            "latency ms original / converted", "rounds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peaks = " / ".join(_cell(v, "-", ".0f") for v in (r.original_peak_mb, r.eager_peak_mb, r.converted_peak_mb))
        lat = " / ".join(_cell(v, "-", ".1f") for v in (r.original_latency_ms, r.converted_latency_ms))
        predicted = " / ".join(_cell(v, "-", ".0f") for v in (r.original_predicted_mb, r.converted_predicted_mb))
        cells = [str(r.seq_len), _cell(r.original_tokens_per_ms, r.original_status, ".3f"),
                 _cell(r.eager_tokens_per_ms, r.eager_status, ".3f"),
                 _cell(r.converted_tokens_per_ms, r.converted_status, ".3f"),
                 _cell(r.ratio, "-", ".2f") + ("x" if r.ratio else ""),
                 _cell(r.eager_ratio, "-", ".2f") + ("x" if r.eager_ratio else ""), peaks, predicted, lat,
                 str(r.repeats)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ROW_KEYS = ("seq_len", "original_tokens_per_ms", "converted_tokens_per_ms", "ratio", "original_peak_mb",
            "converted_peak_mb", "original_predicted_mb", "converted_predicted_mb")


def write_report(results: dict, out_dir, stem: str = "throughput", *, extra: dict | None = None,
                 notes: list[str] | None = None, sections: list[str] | None = None, intro: list[str] | None = None,
                 command: str | None = None, config: dict | None = None, aside: tuple[str, ...] = ()) -> dict:
    """Write ``stem``.json, ``stem``.md and (matplotlib permitting) ``stem``.png; returns the JSON dict.

    JSON: ``{"models": {name: [row, ...]}, **extra, "command", "date", "machine", "config"}``; each row
    has the keys ``ROW_KEYS`` first, then the eager, latency and status fields of :class:`BenchRow`.
    Row sets named in ``aside`` go under ``"other_models"`` instead of ``"models"`` (kept out of a fixed
    set of names a reader expects there); the markdown and the plot show every row set alike.
    ``intro`` / ``sections`` are markdown blocks put before / after the tables (e.g. a profile).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, res in results.items():
        models[name] = [{**{k: d[k] for k in ROW_KEYS}, **{k: v for k, v in d.items() if k not in ROW_KEYS}}
                        for d in res.to_dicts()]
    others = {name: models.pop(name) for name in aside if name in models}
    data = {"models": models, **({"other_models": others} if others else {}), **(extra or {}),
            "command": command or " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads()},
            "config": config or {name: res.meta for name, res in results.items()}}
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    md = [f"# {stem}", "", *(intro or [])]
    for name, res in results.items():
        md += [f"## {name}", "", ", ".join(f"{k}: {v}" for k, v in res.meta.items() if k != "config"), "",
               res.table(), ""]
    md += [f"- {n}" for n in notes or []] + [""] + list(sections or [])
    (out / f"{stem}.md").write_text("\n".join(md).rstrip() + "\n")
    plot(results, out / f"{stem}.png")
    return data


def plot(results: dict, path) -> bool:
    """Tokens/ms against N, log-log, one panel per model; False (nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for key, label, style in (("original", "original (SDPA)", "o-"), ("eager", "original (eager)", "s:"),
                                  ("converted", "converted (M2)", "^--")):
            pts = [(r.seq_len, getattr(r, f"{key}_tokens_per_ms")) for r in res.rows]
            pts = [(n, v) for n, v in pts if v]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="tokens / ms", title=name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
