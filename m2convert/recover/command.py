"""``m2convert distill``: the command-line front of :func:`m2convert.distill`.

The CLI wires it as

    from .recover.command import add_distill_arguments, run_distill_cli
    p = sub.add_parser("distill", ...); add_distill_arguments(p)
    run_distill_cli(args, load_teacher=api.load_model, load_student=serialize.from_pretrained,
                    save_student=serialize.save_pretrained)

Loaders are passed in, so recovery never imports the layers above it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import ConfigError
from .config import DistillConfig, StageConfig
from .distill import distill


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``distill`` options to ``p``."""
    p.add_argument("--teacher", required=True, help="the original model (directory or model id)")
    p.add_argument("--student", required=True, help="directory of the converted model")
    p.add_argument("--data", required=True,
                   help="training data: .tsv / .csv (a header; a label column for the task stage), .jsonl or plain text")
    p.add_argument("--out", required=True, help="directory for the recovered model (checkpoints go in OUT/checkpoints)")
    p.add_argument("--stages", default="auto",
                   help="comma list, in order (default auto: transfer,kd, and task when the student takes labels "
                        "(a model with a task head) and --data has a label column)")
    p.add_argument("--steps", type=int, default=100, help="steps of each stage (default: %(default)s)")
    p.add_argument("--lr", action="append", default=[], metavar="STAGE=LR",
                   help="learning rate of a stage, e.g. --lr transfer=1e-3 (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per row of TSV / CSV / JSONL data, and at most per block of plain text (default 128)")
    p.add_argument("--block-size", type=int, default=128,
                   help="tokens per block for plain text and unlabelled rows (at most --max-length; default 128)")
    p.add_argument("--text-column", default=None, metavar="NAME",
                   help="the text column (key) of TSV / CSV / JSONL rows (default: the first that is not the label)")
    p.add_argument("--label-column", default="label", metavar="NAME",
                   help="the label column (key); rows without one are unlabelled, enough for transfer and kd")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--on-bad", choices=("skip", "raise"), default="skip", help="bad data rows (default: skip)")
    p.add_argument("--autocast", choices=("bf16",), default=None,
                   help="run the forward passes under bf16 autocast (weights and optimizer state stay fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each transformer block's activations in the backward pass")
    p.add_argument("--layerwise", action="store_true",
                   help="transfer holding one layer's activations at a time (same gradients, less memory)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="kd / task: LoRA of rank R on the linears the conversion left dense (needs peft; default 0: none)")
    p.add_argument("--config", type=Path, help="a DistillConfig JSON file (overrides the options above)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The DistillConfig the options describe.

    Example:
        >>> p = argparse.ArgumentParser(); add_distill_arguments(p)
        >>> a = p.parse_args("--teacher t --student s --data d --out o --stages kd --lr kd=3e-4".split())
        >>> config_from_args(a).stages[0].lr
        0.0003
    """
    ckpt = str(Path(args.out) / "checkpoints")
    if args.config is not None:
        try:
            cfg = DistillConfig.from_json(Path(args.config).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read --config {args.config}: {e}") from None
        d = cfg.to_dict()
        d.update(checkpoint_dir=d["checkpoint_dir"] or ckpt, resume=args.resume or d["resume"])
        return DistillConfig.from_dict(d)
    lrs = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        try:
            lrs[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--lr {item!r}: write STAGE=LR, e.g. --lr kd=1e-4") from None
    # "auto" is resolved once the student is loaded (stages_for); before that every stage it may pick counts.
    stages = getattr(args, "resolved_stages", None) or ("transfer,kd,task" if args.stages == "auto" else args.stages)
    names = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = set(lrs) - set(names)
    if unknown:
        raise ConfigError(f"--lr names stages {sorted(unknown)} that are not in --stages {names}")
    stages = [StageConfig(n, steps=args.steps, lr=lrs.get(n), temperature=args.temperature,
                          layerwise=args.layerwise and n == "transfer",
                          lora_rank=args.lora_rank if n != "transfer" else 0) for n in names]
    return DistillConfig(stages=stages, autocast=args.autocast, gradient_checkpointing=args.gradient_checkpointing,
                         steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                         block_size=args.block_size, text_column=args.text_column, label_column=args.label_column,
                         checkpoint_dir=ckpt, checkpoint_every=args.checkpoint_every,
                         resume=args.resume, on_bad=args.on_bad, progress=not args.no_progress)


def takes_labels(model) -> bool:
    """Whether ``model``'s forward takes ``labels`` (a model with a task head computes a loss from them)."""
    import inspect

    try:
        return "labels" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def data_has_labels(data, label_column: str = "label") -> bool:
    """Whether a data file holds labels: a TSV / CSV whose header has ``label_column``, or JSONL rows with it."""
    from ..data.readers import header_fields

    path = Path(str(data))
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return label_column in header_fields(path)
    if suffix in (".jsonl", ".json"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return label_column in json.loads(f.readline())
        except (OSError, ValueError, TypeError):
            return False
    return False


def stages_for(stages: str, student, data, label_column: str = "label") -> str:
    """The stages to run: ``stages`` as given, checked against the student and data, or for "auto"
    transfer,kd plus task when the student takes labels and the data has them.

    Raises ConfigError when ``task`` is named but cannot run (checked before any training).
    """
    can_task = takes_labels(student) and data_has_labels(data, label_column)
    if stages.strip() == "auto":
        return "transfer,kd" + (",task" if can_task else "")
    names = [s.strip() for s in stages.split(",")]
    if "task" in names and not can_task:
        why = (f"{type(student).__name__} takes no labels (no task head)" if not takes_labels(student)
               else f"--data {data} has no label column")
        raise ConfigError(f"--stages names task, but {why}; use --stages transfer,kd (or the default, auto)")
    return stages


def run_distill_cli(args: argparse.Namespace, *, load_teacher, load_student, save_student) -> int:
    """Load teacher and student, distill on ``--data``, save the student to ``--out``; returns 0.

    Writes OUT/distill_result.json (per-stage steps, tokens, seconds, losses) beside the model.
    """
    logging.basicConfig(level=logging.INFO, format="m2convert: %(message)s")
    config_from_args(args)                           # options checked before the models load
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory (it is created if missing)")
    teacher = load_teacher(args.teacher)
    student = load_student(args.student)
    args.resolved_stages = stages_for(args.stages, student, args.data, args.label_column)
    config = config_from_args(args)
    tokenizer = None
    if Path(args.teacher).is_dir():
        from ..loading import load_tokenizer
        try:
            tokenizer = load_tokenizer(args.teacher)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the teacher's tokenizer from {args.teacher}: {e}") from None
    result = distill(student, teacher, args.data, config, tokenizer=tokenizer)
    out = Path(args.out)
    save_student(student, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_result.json").write_text(json.dumps({"config": config.to_dict(), **result.to_dict()}, indent=2))
    for s in result.stages:
        print(f"m2convert: {s.name}: {s.steps} steps, {s.tokens:,} tokens, {s.seconds:.0f} s, "
              f"loss {s.first_loss:.4g} -> {s.final_loss:.4g}", file=sys.stderr)
    print(f"m2convert: saved the recovered model to {out}", file=sys.stderr)
    return 0
