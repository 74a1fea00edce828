"""Distillation at scale: transfer and kd of a Qwen2.5-0.5B-shaped student at sequence 512 (issue 33, item 2).

The teacher is a ``Qwen2ForCausalLM`` of the published Qwen2.5-0.5B config with random weights (seed 0);
the student is ``m2.convert(teacher, ConvertConfig(keep_layers=K))``: every MLP Monarch, every attention
layer an M2 mixer but K kept as softmax attention (spread evenly), whose projections stay dense for LoRA.
Batches are random token ids, batch 1 (``--data`` reads a text file's bytes as ids instead).

Rows (a JSON list written to ``--out``, default ``runs/scale_distill.json``; rows of another mode already in
the file are kept):

- ``transfer``: ``StageConfig("transfer", layerwise=True)``: one replaced module's activations at a time;
- ``kd``: ``StageConfig("kd", lora_rank=R)``: the M2 modules and LoRA adapters on the dense parts train;
- ``kd-fsdp`` (``--fsdp``, under ``torchrun --nproc_per_node 2``): kd of every parameter under FSDP2 over
  gloo, one row per rank with the bytes of parameters and AdamW state that rank holds (DTensor local
  shards) against the unsharded totals.

Every run uses ``DistillConfig(autocast="bf16", gradient_checkpointing=True)``. ``seconds_per_step`` is
the mean wall time of ``--steps`` optimizer steps after ``--warmup`` steps; ``peak_rss_mb`` the process's
peak resident memory (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs`` once the models are
built) over the whole ``distill`` call. Single-process stages each run in a child process of their own.
Torch threads stay at their default.

    python benchmarks/scale_distill.py                                              # transfer and kd
    torchrun --standalone --nproc_per_node 2 benchmarks/scale_distill.py --fsdp     # kd under FSDP2
    python benchmarks/scale_distill.py --tiny --out runs/scale_distill_tiny.json    # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import peak_rss_mb, reset_peak, rss_mb  # noqa: E402

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True)
TINY = dict(QWEN_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            vocab_size=1000)


def log(msg: str) -> None:
    rank = os.environ.get("RANK")
    print(f"[scale_distill{'' if rank is None else ' rank ' + rank}] {msg}", file=sys.stderr, flush=True)


def build_pair(args):
    """(teacher, student): the random-weight Qwen2 teacher and its conversion."""
    import transformers

    import m2convert as m2
    shape = dict(TINY if args.tiny else QWEN_05B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    teacher = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).eval()
    start = time.perf_counter()
    student = m2.convert(teacher, m2.ConvertConfig(keep_layers=args.keep_layers), progress=False)
    log(f"converted in {time.perf_counter() - start:.0f} s")
    return teacher, student


def batches(args, vocab: int, n: int) -> list[dict]:
    """``n`` batches of (1, seq) token ids: random, or consecutive byte windows of ``--data``."""
    if args.data:
        raw = torch.frombuffer(bytearray(Path(args.data).read_bytes()[: n * args.seq]), dtype=torch.uint8)
        ids = raw.long().reshape(n, 1, args.seq) % vocab
    else:
        ids = torch.randint(0, vocab, (n, 1, args.seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def stage_config(stage: str, args, steps: int):
    from m2convert.recover import StageConfig
    if stage == "transfer":
        return StageConfig("transfer", steps=steps, lr=1e-3, layerwise=True)
    if stage == "kd":
        return StageConfig("kd", steps=steps, lr=1e-4, lora_rank=args.lora_rank)
    return StageConfig("kd", steps=steps, lr=1e-4)                     # kd-fsdp: every parameter trains


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def run_stage(stage: str, args, processes: int = 1) -> dict:
    """Build the models, run one stage for warmup + steps optimizer steps, and measure it."""
    from m2convert.recover import DistillConfig, distill
    teacher, student = build_pair(args)
    steps = args.warmup + args.steps
    data = batches(args, teacher.config.vocab_size, steps)
    cfg = DistillConfig(stages=[stage_config(stage, args, steps)], batch_size=1, autocast="bf16",
                        gradient_checkpointing=True, progress=False,
                        distributed="fsdp" if processes > 1 else "none")
    stamps: list[float] = []
    total = param_bytes(student)
    before = rss_mb()
    reset_peak()
    def on_step(name, step, loss):
        stamps.append(time.perf_counter())
        log(f"{stage} step {step}: loss {loss:.4g}, {stamps[-1] - (stamps[-2] if len(stamps) > 1 else start):.1f} s, "
            f"peak {peak_rss_mb():.0f} MiB")

    start = time.perf_counter()
    result = distill(student, teacher, data, cfg, on_step=on_step)
    peak = peak_rss_mb()
    timed = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])] if args.warmup else []
    res = result.stages[0]
    trained = cfg.stages[0]
    return {"stage": stage, "peak_rss_mb": round(peak, 1), "seconds_per_step": round(sum(timed) / len(timed), 2),
            "processes": processes, "rank": int(os.environ.get("RANK", 0)), "rss_models_mb": round(before, 1),
            "steps_timed": len(timed), "step_seconds": [round(t, 2) for t in timed], "seq": args.seq, "batch": 1,
            "autocast": "bf16", "gradient_checkpointing": True, "layerwise": trained.layerwise,
            "lora_rank": trained.lora_rank, "train": trained.train, "keep_layers": args.keep_layers,
            "layers": teacher.config.num_hidden_layers, "torch_threads": torch.get_num_threads(),
            "param_bytes_local": res.param_bytes, "optimizer_bytes_local": res.optimizer_bytes,
            "param_bytes_total": total, "losses": [round(x, 5) for x in res.losses],
            "data": args.data or "random token ids"}


def merge_rows(out: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``out``, keeping the rows of other stages already there."""
    old = json.loads(out.read_text()) if out.exists() else []
    stages = {r["stage"] for r in rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([r for r in old if r["stage"] not in stages] + rows, indent=1) + "\n")
    log(f"wrote {out}")


def fsdp_main(args) -> None:
    """One rank of the ``--fsdp`` run; rank 0 writes every rank's row."""
    import torch.distributed as dist
    dist.init_process_group("gloo")                  # distill joins this group and leaves it open
    row = run_stage("kd-fsdp", args, processes=dist.get_world_size())
    # The unsharded AdamW state: exp_avg and exp_avg_sq of every trained parameter (fp32).
    row["optimizer_bytes_total"] = 2 * row["param_bytes_total"]
    row["param_share"] = round(row["param_bytes_local"] / row["param_bytes_total"], 4)
    row["optimizer_share"] = round(row["optimizer_bytes_local"] / row["optimizer_bytes_total"], 4)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        merge_rows(Path(args.out), rows)
    dist.destroy_process_group()


def child_args(args, stage: str, out: Path) -> list[str]:
    argv = [sys.executable, __file__, "--child", stage, "--child-out", str(out), "--seq", str(args.seq),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-rank", str(args.lora_rank),
            "--keep-layers", str(args.keep_layers), "--layers", str(args.layers)]
    return argv + (["--tiny"] if args.tiny else []) + (["--data", args.data] if args.data else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "scale_distill.json"))
    p.add_argument("--stages", default="transfer,kd", help="single-process stages to run (default %(default)s)")
    p.add_argument("--fsdp", action="store_true", help="kd under FSDP2 (launch with torchrun --nproc_per_node 2)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default %(default)s)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of kd on the dense parts (0: none)")
    p.add_argument("--keep-layers", type=int, default=None,
                   help="attention layers kept dense (default 4; 1 with --tiny)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's own, 24)")
    p.add_argument("--data", default=None, help="a text file whose bytes (mod vocab) are the token ids")
    p.add_argument("--tiny", action="store_true", help="a 4-layer, hidden-64 model: a smoke run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    if args.keep_layers is None:
        args.keep_layers = 1 if args.tiny else 4
    if args.fsdp:
        return fsdp_main(args)
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_stage(args.child, args)))
        return
    rows = []
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        part = Path(args.out).with_suffix(f".{stage}.part.json")
        part.parent.mkdir(parents=True, exist_ok=True)
        log(f"{stage}: child process")
        subprocess.run(child_args(args, stage, part), check=True, cwd=ROOT)
        rows.append(json.loads(part.read_text()))
        part.unlink()
        log(f"{stage}: peak {rows[-1]['peak_rss_mb']:.0f} MiB, {rows[-1]['seconds_per_step']:.2f} s/step")
    merge_rows(Path(args.out), rows)


if __name__ == "__main__":
    main()
