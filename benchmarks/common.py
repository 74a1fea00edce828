"""Shared helpers of the recovery benchmarks: caches, timing, parameter counts and report writing.

Every report is ``benchmarks/results/<name>.json`` (the issue's keys plus ``command``, ``date``,
``machine`` and ``config``) and ``<name>.md`` (a markdown table of the same numbers).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cache_dir(name: str) -> Path:
    """A folder for cached teachers and tokenizers, outside git: ``runs/bench_cache/`` (ignored), or the
    folder in M2CONVERT_BENCH_CACHE (one outside the work tree outlives a fresh checkout)."""
    path = Path(os.environ.get("M2CONVERT_BENCH_CACHE") or ROOT / "runs" / "bench_cache") / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def kept_dir(name: str) -> Path:
    """A folder under ``benchmarks/teachers/`` that git keeps, for teachers of a few MB whose training takes
    CPU hours: a later checkout (and so a later run on another machine) starts from them."""
    path = ROOT / "benchmarks" / "teachers" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_teacher(folder: Path, model_class, shown: str):
    """``(model, info)`` of a teacher an earlier run saved in ``folder`` (``teacher.json`` beside its weights),
    or None; ``shown`` formats ``info`` for the log line, e.g. ``"dev acc {dev_acc:.4f}"``."""
    info_file = folder / "teacher.json"
    if not info_file.exists():
        return None
    info = json.loads(info_file.read_text())
    log(f"teacher from cache {folder}: {shown.format(**info)}")
    return model_class.from_pretrained(folder).eval(), info


def command_line() -> str:
    """The command this process was started with, quoted for a shell."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def machine() -> dict:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` size (``VmHWM``, ``VmRSS``) in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: memory is measured on Linux only")


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last :func:`reset_peak` (``VmHWM``), MiB."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """This process's resident memory now (``VmRSS``), MiB."""
    return _status_mb("VmRSS")


def reset_peak() -> None:
    """Start a new peak-memory window (writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def count_params(model: torch.nn.Module) -> int:
    """Parameters of ``model``, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class Clock:
    """Wall time since construction, with named laps: ``clock.lap("transfer")`` -> seconds."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.cpu_start = time.process_time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now
        return self.laps[name]

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cpu(self) -> float:
        """CPU seconds this process used since construction (all its threads)."""
        return time.process_time() - self.cpu_start


def cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at ``step`` of ``total``: linear warmup over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def progress_logger(every: int):
    """An ``on_step`` callback for distill that logs the mean loss of every ``every`` steps."""
    losses, start = [], time.perf_counter()

    def on_step(stage: str, step: int, loss: float) -> None:
        losses.append(loss)
        if step % every == 0:
            log(f"{stage} step {step}: loss {sum(losses[-every:]) / len(losses[-every:]):.4f} "
                f"({(time.perf_counter() - start) / 60:.1f} min)")
    return on_step


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, result: dict, config: dict, render, out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` (result + command/date/machine/config) and its markdown; returns the JSON path.

    ``render(doc) -> markdown body`` builds the tables and notes from the JSON document, so
    ``write_markdown`` can rebuild the markdown later (e.g. after ``attach_variant``).
    """
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**result, "command": command_line(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "config": config}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    write_markdown(name, render, out_dir)
    return path


def write_markdown(name: str, render, out_dir: Path | None = None) -> Path:
    """(Re)write ``<name>.md`` from ``<name>.json`` with the benchmark's ``render(doc)``."""
    out_dir = Path(out_dir or RESULTS)
    doc = json.loads((out_dir / f"{name}.json").read_text())
    m = doc["machine"]
    head = [f"# {name}", "", f"`{doc['command']}` on {m['processor']} ({m['cpu_count']} cores, "
            f"{m['torch_threads']} torch thread(s); load average at the end {m.get('load_average_1_5_15min')}), "
            f"{doc['date']}", "", ""]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(head) + render(doc).rstrip("\n") + "\n")
    return path


def stage_rows(stages: list[dict], metric=lambda s: s.get("metric", "")) -> list[list]:
    """Markdown rows (stage, steps, tokens, wall minutes, first/last loss, metric) of a report's stages."""
    return [[s["name"], s["steps"], s["tokens"], f"{s['seconds'] / 60:.1f}", s.get("first_loss") or 0.0,
             s.get("final_loss") or 0.0, metric(s)] for s in stages]


def attach_variant(name: str, variant_json: Path, label: str, out_dir: Path | None = None) -> None:
    """Add another run of the same benchmark to report ``name`` as ``variants[label]`` (JSON only;
    rerun the benchmark with ``--render`` to rebuild the markdown).

    Example: ``python benchmarks/common.py sst2_recovery runs/bench_variants/x.json "MLPs only"``
    """
    out_dir = Path(out_dir or RESULTS)
    main_json = out_dir / f"{name}.json"
    doc = json.loads(main_json.read_text())
    var = json.loads(Path(variant_json).read_text())
    keep = {k: v for k, v in var.items() if not isinstance(v, (dict, list)) or k == "config"}
    keep["stages"] = [{k: s.get(k) for k in ("name", "steps", "tokens", "seconds", "first_loss", "final_loss",
                                               "metric", "eval_blocks")} for s in var.get("stages", [])]
    keep["label"] = label
    doc["variants"] = [v for v in doc.get("variants", []) if v.get("label") != label] + [keep]
    main_json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    attach_variant(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
