"""Command line: ``m2convert COMMAND ...`` (also ``python -m m2convert``).

Each subcommand is a run function decorated with :func:`command`, which names it, gives its help and the
function that adds its arguments, and appends it to :data:`COMMANDS` (help order = source order);
:func:`build_parser` and :func:`main` read that list and name no command. Errors print one line
``m2convert: error: ...`` and exit non-zero (1 for M2Errors, 2 for bad arguments); ``M2_DEBUG=1`` shows
the traceback; the library's advice naming Python arguments (``example_inputs=``) names the options
(``--input``) instead. convert and bench warn in one line ``m2convert: warning: ...`` about sites left
unconverted (--strict makes that an error) and fail when nothing converts.

Example:
    $ m2convert plan all-MiniLM-L6-v2 --seq-len 2048 --html plan.html
    $ m2convert convert ./my-bert --out ./my-bert-m2 --nblocks 8
    $ m2convert export ./my-bert-m2 --out my-bert-m2.pt2 --aoti
    $ m2convert plan ./whisper --input input_features=1x80x3000:float32 --input decoder_input_ids=1x16:int64
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import CAUSAL_MODES, ConvertConfig
from .errors import ConfigError, ConversionError, M2Error
from .selection.command import add_selection_arguments, calibration_arguments, selection_settings


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"m2convert: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    d = ConvertConfig()
    g = p.add_argument_group("conversion settings (ConvertConfig)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, metavar="N",
                   help=f"sequence length at which FLOPs are evaluated (default {d.seq_len})")
    g.add_argument("--nblocks", type=int, default=d.nblocks,
                   help=f"Monarch blocks for MLP linears (default {d.nblocks})")
    g.add_argument("--projection-nblocks", type=int, default=d.projection_nblocks, metavar="N",
                   help="Monarch blocks for the sequence mixers' in/out projections "
                        f"(default {d.projection_nblocks}: dense)")
    g.add_argument("--rank", type=int, default=d.rank, help=f"Monarch projection rank (default {d.rank})")
    g.add_argument("--causal-mode", default=d.causal_mode, help=f"decoder mixers: {' | '.join(CAUSAL_MODES)}")
    g.add_argument("--filter-order", type=int, default=d.filter_order, help="implicit filter MLP width")
    g.add_argument("--filter-emb-dim", type=int, default=d.filter_emb_dim, help="implicit filter features (odd)")
    g.add_argument("--no-sequence", action="store_true", help="keep attention as it is")
    g.add_argument("--no-dimension", action="store_true", help="keep dense MLPs as they are")
    g.add_argument("--skip", action="append", default=[], metavar="REGEX",
                   help="leave sites whose module path matches REGEX (repeatable)")
    g.add_argument("--strict", action="store_true", help="fail if any site cannot be converted")
    add_selection_arguments(p.add_argument_group("attention to keep (ConvertConfig.keep_layers, keep_kv_bytes)"))


def _config(args) -> ConvertConfig:
    return ConvertConfig(nblocks=args.nblocks, rank=args.rank, causal_mode=args.causal_mode,
                         filter_order=args.filter_order, filter_emb_dim=args.filter_emb_dim,
                         projection_nblocks=args.projection_nblocks,
                         sequence=not args.no_sequence, dimension=not args.no_dimension,
                         overrides={r: None for r in args.skip}, strict=args.strict, seq_len=args.seq_len,
                         **selection_settings(args))


def _input_spec(text: str):
    from .passes.input_specs import parse_input_spec

    try:
        return parse_input_spec(text)
    except ConfigError as exc:                     # argparse reports it as a bad argument (exit 2)
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_input_args(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group(f"example inputs (default: {default})")
    g.add_argument("--input", action="append", default=[], type=_input_spec, metavar="NAME=SHAPE:DTYPE",
                   help="one keyword input of the model's forward, e.g. input_features=1x80x3000:float32 "
                        "(repeatable; masks are ones, floats randn, integer ids random below vocab_size)")
    g.add_argument("--inputs", metavar="FILE.safetensors",
                   help="a safetensors file of named input tensors; --input adds to or replaces them")


def _input_tensors(args) -> dict | None:
    """The tensors of --inputs, read before a model is loaded (loading can take minutes); None without it."""
    from .passes.input_specs import read_inputs_file

    return read_inputs_file(args.inputs) if args.inputs is not None else None


def _example_inputs(args, model, tensors: dict | None):
    """The example inputs --input and --inputs (its ``tensors``) give ``model``; None when neither is given."""
    from .passes.input_specs import example_inputs_from

    return example_inputs_from(model, args.input, tensors) if args.input or tensors is not None else None


def _skip_summary(sites) -> str:
    """'cross-attention: 2 sites, ...': the skipped sites grouped by the head of their reason."""
    heads: dict[str, int] = {}
    for site in sites:
        head = re.split(r"[:;]", site.reason or "no reason given")[0].strip()
        heads[head[:117] + "..." if len(head) > 120 else head] = heads.get(head, 0) + 1
    return ", ".join(f"{head}: {n} site{'s' * (n > 1)}" for head, n in heads.items())


def _check_plan(result, args, converting: bool, see: str = "") -> None:
    """--strict fails on any skipped site; converting nothing fails; otherwise skips get one warning line."""
    skipped, total = result.skipped, len(result.sites)
    if skipped and args.strict:
        listing = "; ".join(f"'{s.fqn}' ({s.pattern}): {s.reason}" for s in skipped)
        raise ConversionError(f"--strict and {len(skipped)} of {total} sites cannot be converted: {listing}. "
                              "Fix the cause, leave them out with --skip REGEX, or drop --strict")
    if converting and not result.converted:
        why = [f"{len(skipped)} site(s) cannot be converted ({_skip_summary(skipped)})"] if skipped else []
        if result.excluded:
            why.append(f"{len(result.excluded)} site(s) are left out by --skip/--no-sequence/--no-dimension")
        why = why or ["no attention or MLP site was found", *result.notes]
        raise ConversionError(f"nothing to convert in {result.model_class}: {'; '.join(why)}")
    if skipped and converting:
        print(f"m2convert: warning: {len(skipped)} of {total} sites were left unconverted "
              f"({_skip_summary(skipped)}; {see}; --strict makes this an error)", file=sys.stderr)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help texts, argument setup and the function that runs it."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = []  # in help order; filled by @command below each command's argument setup


def command(name: str, *, help: str, description: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated ``run(args) -> exit status`` as subcommand ``name`` (see :data:`COMMANDS`).

    A new command is two functions beside each other in this file::

        def _hello_arguments(p: argparse.ArgumentParser) -> None:
            p.add_argument("--name", default="world")

        @command("hello", help="print a greeting", description="Print a greeting.", arguments=_hello_arguments)
        def _run_hello(args) -> int:
            print(f"hello {args.name}")
            return 0

    Example:
        >>> [c.name for c in COMMANDS]
        ['plan', 'convert', 'distill', 'export', 'bench', 'demo']
    """
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS.append(Command(name, help, description, arguments, run))
        return run
    return register


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="local model directory or Hugging Face id")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--html", metavar="FILE", help="also write the plan and graph diff as an HTML page")
    _add_config_args(p)
    _add_input_args(p, "built from the model's config")


@command("plan", help="print the rewrite plan of a model (nothing is changed)", arguments=_plan_arguments,
         description="Capture MODEL, find its attention and MLP sites, and print what conversion would change, "
                     "with parameters and FLOPs before and after.")
def _run_plan(args) -> int:
    from .api import load_model, plan

    config = _config(args)
    tensors = _input_tensors(args)
    model = load_model(args.model)
    result = plan(model, config, _example_inputs(args, model, tensors), **calibration_arguments(args, args.model))
    print(result.to_json() if args.json else result)
    if args.html:
        path = result.to_html(args.html)
        print(f"m2convert: wrote {path}", file=sys.stderr)
    _check_plan(result, args, converting=False)
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="local model directory or Hugging Face id")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    _add_config_args(p)
    _add_input_args(p, "built from the model's config")


@command("convert", help="convert a model and save it", arguments=_convert_arguments,
         description="Convert MODEL into a Monarch Mixer model (same class) and save it to DIR.")
def _run_convert(args) -> int:
    from . import api
    from .serialize import save_pretrained

    config = _config(args)
    out_dir = Path(args.out)
    # Checked before loading and converting, which can take minutes on a large model.
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory (it is created if missing)")
    blocker = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"--out {args.out} cannot be created: {blocker} is a file; give a directory")
    tensors = _input_tensors(args)
    model = api.load_model(args.model)
    result = api.plan(model, config, _example_inputs(args, model, tensors),
                      **calibration_arguments(args, args.model))
    print(result)
    _check_plan(result, args, converting=True, see="the 'skip' rows of the plan above say why")
    converted = result.apply()
    out = save_pretrained(converted, out_dir)
    print(f"m2convert: saved the converted model to {out} (load it with m2convert.from_pretrained)", file=sys.stderr)
    return 0


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    from .recover.command import add_distill_arguments

    add_distill_arguments(p)


@command("distill", help="recover a converted model towards its teacher", arguments=_distill_arguments,
         description="Distill the converted model in --student (a directory written by `m2convert convert`) "
                     "towards --teacher on --data, stage by stage, and save the recovered model to --out.")
def _run_distill(args) -> int:
    from . import api, serialize
    from .recover.command import run_distill_cli

    return run_distill_cli(args, load_teacher=api.load_model, load_student=serialize.from_pretrained,
                           save_student=serialize.save_pretrained)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="directory of a saved converted model")
    p.add_argument("--out", required=True, metavar="FILE.pt2", help="output file")
    p.add_argument("--aoti", action="store_true", help="compile an AOTInductor package")
    p.add_argument("--seq-len", type=int, default=16, metavar="N",
                   help="example sequence length (default 16; the artifact takes any length unless --static)")
    p.add_argument("--batch", type=int, default=1, help="batch size the artifact is built for (default 1)")
    p.add_argument("--static", action="store_true",
                   help="fix every input's shape (by default token lengths, and image and audio sizes the model "
                        "accepts at other sizes, stay dynamic)")
    _add_input_args(p, "input_ids (--batch, --seq-len) or pixel_values from the model's config")


@command("export", help="export a saved converted model as .pt2 or an AOTInductor package",
         arguments=_export_arguments,
         description="Load DIR (written by `m2convert convert` or m2convert.save_pretrained) and export it with "
                     "torch.export; --aoti compiles an AOTInductor package that runs with torch alone.")
def _run_export(args) -> int:
    from .export import dynamic_inputs, export_program, write_program
    from .passes.capture import example_inputs_for
    from .serialize import from_pretrained

    tensors = _input_tensors(args)
    model = from_pretrained(args.dir)
    inputs = _example_inputs(args, model, tensors) or example_inputs_for(model, seq_len=args.seq_len, batch=args.batch)
    if args.aoti and Path(args.out).suffix != ".pt2":
        raise ConfigError(f"--out {args.out}: an AOTInductor package path must end in .pt2")
    program = export_program(model, inputs, dynamic_seq=not args.static)
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
    _add_config_args(p)


@command("bench", help="time the original and the converted model side by side", arguments=_bench_arguments,
         description="Convert MODEL (with the conversion settings below) and measure tokens/ms of the original "
                     "and the converted model, interleaved, at each sequence length; or time a converted model "
                     "saved in DIR (--converted DIR) against MODEL.")
def _run_bench(args) -> int:
    from . import api
    from .bench import bench
    from .serialize import from_pretrained

    lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
    config = _config(args)
    if args.converted:
        model, converted = args.model, from_pretrained(args.converted)
    else:                                  # converted here, so that skipped sites are reported as by convert
        model = api.load_model(args.model)
        planned = api.plan(model, config)
        _check_plan(planned, args, converting=True, see=f"`m2convert plan {args.model}` says why")
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
    from .demo import run_demo

    run_demo(steps=args.steps, eval_sentences=args.sentences)
    return 0


INPUT_OPTIONS = "--input NAME=SHAPE:DTYPE (repeatable) or --inputs FILE.safetensors"

# The library's advice, naming Python arguments, and the options that do the same on the command line.
CLI_WORDING = [
    (r"pass example_inputs=\{'name': tensor, \.\.\.\}( \(or a tuple of positional tensors\))?",
     f"give {INPUT_OPTIONS}"),
    (r"\bpass example_inputs\b", f"give {INPUT_OPTIONS}"),
    (r"\bPass example_inputs\b", f"Give {INPUT_OPTIONS}"),
    (r"\bCheck that example_inputs match", "Check that the example inputs (--input/--inputs) match"),
    (r"dynamic_seq=True needs", "a dynamic sequence length (the default; --static turns it off) needs"),
    (r"pass dynamic_seq=False", "pass --static"),
    (r"or plan a submodule that exports \(m2\.plan\(", "or, from Python, plan a submodule that exports (m2.plan("),
]


def cli_wording(message: str) -> str:
    """``message`` with the library's Python-argument advice replaced by the command-line options.

    Example:
        >>> cli_wording("N = 1; use N >= 2, or pass dynamic_seq=False to export static shapes")
        'N = 1; use N >= 2, or pass --static to export static shapes'
    """
    for pattern, replacement in CLI_WORDING:
        message = re.sub(pattern, replacement, message)
    return message


def build_parser() -> argparse.ArgumentParser:
    """The ``m2convert`` argument parser with every registered subcommand."""
    parser = _Parser(prog="m2convert", description="Convert pretrained Transformers into Monarch Mixer models.")
    parser.add_argument("--version", action="version", version=f"m2convert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 bad arguments, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except M2Error as exc:
        print(f"m2convert: error: {cli_wording(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("m2convert: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("M2_DEBUG", "") not in ("", "0"):
            raise
        # One line whatever the message holds (tracebacks of subprocesses, tensor dumps, reports).
        lines = str(exc).strip().splitlines()
        detail = lines[0].strip() if lines else ""
        if len(detail) > 300:
            detail = detail[:297] + "..."
        what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        print(f"m2convert: error: unexpected {what} (set M2_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
