"""The subcommands, each an argument setup and a run function registered with :func:`~m2convert.cli.command`
(help order = the order here)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from ..selection.command import calibration_arguments
from . import command
from .options import add_config_args, add_input_args, check_plan, config_from_args, example_inputs, input_tensors


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="local model directory or Hugging Face id")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--html", metavar="FILE", help="also write the plan and graph diff as an HTML page")
    add_config_args(p)
    add_input_args(p, "built from the model's config")


@command("plan", help="print the rewrite plan of a model (nothing is changed)", arguments=_plan_arguments,
         description="Capture MODEL, find its attention and MLP sites, and print what conversion would change, "
                     "with parameters and FLOPs before and after.")
def _run_plan(args) -> int:
    from ..api import load_model, plan

    config = config_from_args(args)
    tensors = input_tensors(args)
    model = load_model(args.model)
    result = plan(model, config, example_inputs(args, model, tensors), **calibration_arguments(args, args.model))
    print(result.to_json() if args.json else result)
    if args.html:
        path = result.to_html(args.html)
        print(f"m2convert: wrote {path}", file=sys.stderr)
    check_plan(result, args, converting=False)
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="local model directory or Hugging Face id")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_config_args(p)
    add_input_args(p, "built from the model's config")


@command("convert", help="convert a model and save it", arguments=_convert_arguments,
         description="Convert MODEL into a Monarch Mixer model (same class) and save it to DIR.")
def _run_convert(args) -> int:
    from .. import api
    from ..loading import load_sentence_transformer
    from ..serialize import save_pretrained
    from ..wrappers import unwrap

    config = config_from_args(args)
    out_dir = Path(args.out)
    # Checked before loading and converting, which can take minutes on a large model.
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory (it is created if missing)")
    blocker = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"--out {args.out} cannot be created: {blocker} is a file; give a directory")
    tensors = input_tensors(args)
    # A sentence-transformers folder converts inside its SentenceTransformer, which saves the tokenizer,
    # pooling, normalization and max_seq_length with the converted model, as m2.convert(st).save does.
    wrapped = unwrap(load_sentence_transformer(args.model))
    model = wrapped.inner if wrapped is not None else api.load_model(args.model)
    result = api.plan(model, config, example_inputs(args, model, tensors),
                      **calibration_arguments(args, args.model))
    print(result)
    check_plan(result, args, converting=True, see="the 'skip' rows of the plan above say why")
    converted = result.apply()
    if wrapped is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        wrapped.rebuild(converted).save(str(out_dir))
        out, loader = out_dir, "SentenceTransformer(DIR, trust_remote_code=True)"
    else:
        out, loader = save_pretrained(converted, out_dir), "m2convert.from_pretrained"
    print(f"m2convert: saved the converted model to {out} (load it with {loader})", file=sys.stderr)
    return 0


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    from ..recover.command import add_distill_arguments

    add_distill_arguments(p)


@command("distill", help="recover a converted model towards its teacher", arguments=_distill_arguments,
         description="Distill the converted model in --student (a directory written by `m2convert convert`) "
                     "towards --teacher on --data, stage by stage, and save the recovered model to --out.")
def _run_distill(args) -> int:
    from .. import api, serialize
    from ..recover.command import run_distill_cli

    return run_distill_cli(args, load_teacher=api.load_model, load_student=serialize.from_pretrained,
                           save_student=serialize.save_pretrained)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="directory of a saved converted model")
    p.add_argument("--out", required=True, metavar="FILE.pt2", help="output file")
    p.add_argument("--aoti", action="store_true", help="compile an AOTInductor package")
    p.add_argument("--seq-len", type=int, default=16, metavar="N",
                   help="example sequence length (default 16; the artifact takes any length unless --static)")
    p.add_argument("--batch", type=int, default=1, help="batch size the artifact is built for (default 1)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="also take any batch size (the example batch is then at least 2)")
    p.add_argument("--static", action="store_true",
                   help="fix every input's shape (by default token lengths, and image and audio sizes the model "
                        "accepts at other sizes, stay dynamic)")
    add_input_args(p, "input_ids (--batch, --seq-len) or pixel_values from the model's config")


@command("export", help="export a saved converted model as .pt2 or an AOTInductor package",
         arguments=_export_arguments,
         description="Load DIR (written by `m2convert convert` or m2convert.save_pretrained) and export it with "
                     "torch.export; --aoti compiles an AOTInductor package that runs with torch alone.")
def _run_export(args) -> int:
    from ..export import dynamic_inputs, export_program, write_program
    from ..passes.capture import example_inputs_for
    from ..serialize import from_pretrained

    tensors = input_tensors(args)
    model = from_pretrained(args.dir)
    batch = max(2, args.batch) if args.dynamic_batch else args.batch    # export keeps a size-1 dim static
    inputs = example_inputs(args, model, tensors) or example_inputs_for(model, seq_len=args.seq_len, batch=batch)
    if args.aoti and Path(args.out).suffix != ".pt2":
        raise ConfigError(f"--out {args.out}: an AOTInductor package path must end in .pt2")
    program = export_program(model, inputs, dynamic_seq=not args.static, dynamic_batch=args.dynamic_batch)
    path = write_program(program, args.out, aoti=args.aoti)
    shapes = ", ".join(f"{name} {_shown_shape(inputs[name], dims)}" for name, dims in dynamic_inputs(program).items())
    print(f"m2convert: wrote {path} (inputs: {shapes})", file=sys.stderr)
    return 0


def _shown_shape(tensor, dims: dict) -> str:
    """'(1, 2..64)': each dim's example size, or the range a dynamic dim takes ('2..' when unbounded)."""
    sizes = [f"{dims[d][0]}..{dims[d][1] or ''}" if d in dims else str(n) for d, n in enumerate(tensor.shape)]
    return f"({', '.join(sizes)})"


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model directory or Hugging Face id")
    p.add_argument("--converted", metavar="DIR",
                   help="a converted (and recovered) model written by m2convert convert/distill to time instead "
                        "of converting MODEL; the conversion settings are then ignored")
    p.add_argument("--seq-lens", default="512,2048,8192", help="comma-separated lengths (default 512,2048,8192)")
    p.add_argument("--batch", type=int, default=1, help="sequences per call (default 1)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--out", metavar="DIR", help="also write JSON + markdown (+ PNG) reports to DIR")
    add_config_args(p)


@command("bench", help="time the original and the converted model side by side", arguments=_bench_arguments,
         description="Convert MODEL (with the conversion settings below) and measure tokens/ms of the original "
                     "and the converted model, interleaved, at each sequence length; or time a converted model "
                     "saved in DIR (--converted DIR) against MODEL.")
def _run_bench(args) -> int:
    from .. import api
    from ..bench import bench
    from ..serialize import from_pretrained

    lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
    config = config_from_args(args)
    if args.converted:
        model, converted = args.model, from_pretrained(args.converted)
    else:                                  # converted here, so that skipped sites are reported as by convert
        model = api.load_model(args.model)
        planned = api.plan(model, config)
        check_plan(planned, args, converting=True, see=f"`m2convert plan {args.model}` says why")
        converted = planned.apply()
    result = bench(model, seq_lens=lens, batch=args.batch, dtype=args.dtype, converted=converted, name=args.model)
    result.meta.update(model=args.model, config="converted model given" if args.converted else config.to_dict())
    print(result.table())
    if args.out:
        result.write(args.out)
        print(f"m2convert: wrote the report to {args.out}", file=sys.stderr)
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=100, help="transfer steps of the short recovery (default 100)")
    p.add_argument("--sentences", type=int, default=200, help="held-out sample sentences compared (default 200)")


@command("demo", help="convert the bundled all-MiniLM-L6-v2, recover it briefly and report",
         arguments=_demo_arguments,
         description="The main job on the bundled model, offline: plan and convert all-MiniLM-L6-v2, run a "
                     "short layer-wise recovery on the WikiText-2 sample shipped with the package, and report embedding "
                     "agreement and speed.")
def _run_demo(args) -> int:
    from ..demo import run_demo

    run_demo(steps=args.steps, eval_sentences=args.sentences)
    return 0
