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
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__
from ..errors import M2Error


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"m2convert: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


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

    A new command is two functions beside each other in ``m2convert/cli/commands.py``::

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
    (r"with dynamic_seq=False", "with --static"),
    (r"convert with causal_mode='causal'", "convert with --causal-mode causal"),
    (r"or plan a submodule that exports \(m2\.plan\(", "or, from Python, plan a submodule that exports (m2.plan("),
    (r"\bblock_size=", "--block-size"),
    (r"\bpass label_column=", "give --label-column"),
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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``m2convert`` argument parser with every registered subcommand; with ``only``, the options of that
    subcommand alone (``""``: none), since some options' setup imports torch (``m2convert --help`` does not)."""
    parser = _Parser(prog="m2convert", description="Convert pretrained Transformers into Monarch Mixer models.")
    parser.add_argument("--version", action="version", version=f"m2convert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        if only is None or cmd.name == only:
            cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _named_command(argv: list[str]) -> str:
    """The subcommand ``argv`` names (its first word that is not an option), or ``""``."""
    return next((a for a in argv if not a.startswith("-")), "")


def _debug() -> bool:
    return os.environ.get("M2_DEBUG", "") not in ("", "0")


# Loggers of other libraries whose import-time warnings say nothing about the user's command: torchao
# (imported by transformers where installed) reports C extensions built for another torch, which
# registers its enums with torch's pytree and is told that is deprecated.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 bad arguments, 130 interrupted)."""
    if not _debug():
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_named_command(argv)).parse_args(argv)
    try:
        return args.run(args) or 0
    except M2Error as exc:
        if _debug():
            traceback.print_exc()                 # where it was raised, then the same one-line message
        print(f"m2convert: error: {cli_wording(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("m2convert: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _debug():
            raise
        # One line whatever the message holds (tracebacks of subprocesses, tensor dumps, reports).
        lines = str(exc).strip().splitlines()
        detail = lines[0].strip() if lines else ""
        if len(detail) > 300:
            detail = detail[:297] + "..."
        what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        print(f"m2convert: error: unexpected {what} (set M2_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


from . import commands  # noqa: E402,F401  (registers the subcommands, in help order)
