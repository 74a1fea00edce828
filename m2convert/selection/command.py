"""The command-line options of the attention budget (``m2convert plan`` / ``convert``).

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(); add_selection_arguments(p)
    >>> a = p.parse_args("--keep-layers 2 --select kl --calibration valid.txt".split())
    >>> selection_settings(a)
    {'keep_layers': 2, 'keep_kv_bytes': 0, 'keep_heads': 0.0, 'selection': 'kl', 'selection_steps': 50}
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m2convert.config import SELECTIONS, ConvertConfig
from m2convert.errors import ConfigError


def add_selection_arguments(p) -> None:
    """Add the budget options to ``p`` (a parser or an argument group)."""
    d = ConvertConfig()
    p.add_argument("--keep-layers", type=int, default=d.keep_layers, metavar="K",
                   help="keep K attention layers as softmax attention, chosen by --select (default: none)")
    p.add_argument("--keep-kv-bytes", type=int, default=d.keep_kv_bytes, metavar="BYTES",
                   help="or keep the best layers whose KV cache fits in BYTES per token")
    p.add_argument("--keep-heads", type=float, default=d.keep_heads, metavar="FRACTION",
                   help="or keep that fraction of all heads (whole KV groups), as head-level hybrids")
    p.add_argument("--select", default=d.selection, choices=SELECTIONS,
                   help="how the kept layers are chosen (default auto: kl with --calibration, else uniform)")
    p.add_argument("--selection-steps", type=int, default=d.selection_steps, metavar="N",
                   help=f"alignment steps before the kl scores (default {d.selection_steps})")
    p.add_argument("--calibration", metavar="FILE",
                   help="text / TSV / JSONL the kl and offset-fit selections measure on (the model's tokenizer)")


def selection_settings(args: argparse.Namespace) -> dict:
    """The ConvertConfig fields the options set."""
    return {"keep_layers": args.keep_layers, "keep_kv_bytes": args.keep_kv_bytes, "keep_heads": args.keep_heads,
            "selection": args.select, "selection_steps": args.selection_steps}


def calibration_arguments(args: argparse.Namespace, model_source: str) -> dict:
    """``calibration=`` and ``tokenizer=`` for :func:`m2convert.plan` from ``--calibration`` (the tokenizer
    read from the model's folder, or the bundled model's)."""
    if not args.calibration:
        return {}
    path = Path(args.calibration)
    if not path.is_file():
        raise ConfigError(f"--calibration {args.calibration}: no such file; give a text, TSV or JSONL file")
    from m2convert.loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(model_source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--calibration needs the model's tokenizer, which {model_source} does not load: "
                          f"{exc}") from None
    return {"calibration": path, "tokenizer": tokenizer}
