"""The options several commands share: conversion settings (ConvertConfig and the attention budget),
example inputs, and the check of a plan before converting."""

from __future__ import annotations

import argparse
import re
import sys

from ..config import CAUSAL_MODES, LOCAL_ATTENTION, LOCAL_KEEP_TOKENS, ConvertConfig
from ..errors import ConfigError, ConversionError
from ..selection.command import add_selection_arguments, selection_settings


def add_config_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--local-attention", default=d.local_attention, choices=LOCAL_ATTENTION,
                   help=f"sliding-window attention: convert to window-limited mixers, keep, or auto (convert "
                        f"windows wider than {LOCAL_KEEP_TOKENS} tokens; default {d.local_attention})")
    g.add_argument("--softmax-window", type=int, default=d.softmax_window, metavar="W",
                   help="add exact softmax attention over the last W tokens beside each converted attention "
                        "layer's mixer, seeded from its Q, K, V (default 0: none)")
    add_selection_arguments(p.add_argument_group("attention to keep (ConvertConfig.keep_layers, keep_kv_bytes)"))


def config_from_args(args) -> ConvertConfig:
    return ConvertConfig(nblocks=args.nblocks, rank=args.rank, causal_mode=args.causal_mode,
                         filter_order=args.filter_order, filter_emb_dim=args.filter_emb_dim,
                         projection_nblocks=args.projection_nblocks,
                         sequence=not args.no_sequence, dimension=not args.no_dimension,
                         overrides={r: None for r in args.skip}, strict=args.strict, seq_len=args.seq_len,
                         local_attention=args.local_attention, softmax_window=args.softmax_window,
                         **selection_settings(args))


def input_spec(text: str):
    from ..passes.input_specs import parse_input_spec

    try:
        return parse_input_spec(text)
    except ConfigError as exc:                     # argparse reports it as a bad argument (exit 2)
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_input_args(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group(f"example inputs (default: {default})")
    g.add_argument("--input", action="append", default=[], type=input_spec, metavar="NAME=SHAPE:DTYPE",
                   help="one keyword input of the model's forward, e.g. input_features=1x80x3000:float32 "
                        "(repeatable; masks are ones, floats randn, integer ids random below vocab_size)")
    g.add_argument("--inputs", metavar="FILE.safetensors",
                   help="a safetensors file of named input tensors; --input adds to or replaces them")


def input_tensors(args) -> dict | None:
    """The tensors of --inputs, read before a model is loaded (loading can take minutes); None without it."""
    from ..passes.input_specs import read_inputs_file

    return read_inputs_file(args.inputs) if args.inputs is not None else None


def example_inputs(args, model, tensors: dict | None):
    """The example inputs --input and --inputs (its ``tensors``) give ``model``; None when neither is given."""
    from ..passes.input_specs import example_inputs_from

    return example_inputs_from(model, args.input, tensors) if args.input or tensors is not None else None


def skip_summary(sites) -> str:
    """'cross-attention: 2 sites, ...': the skipped sites grouped by the head of their reason."""
    heads: dict[str, int] = {}
    for site in sites:
        head = re.split(r"[:;]", site.reason or "no reason given")[0].strip()
        heads[head[:117] + "..." if len(head) > 120 else head] = heads.get(head, 0) + 1
    return ", ".join(f"{head}: {n} site{'s' * (n > 1)}" for head, n in heads.items())


def check_plan(result, args, converting: bool, see: str = "") -> None:
    """--strict fails on any skipped site; converting nothing fails; otherwise skips get one warning line."""
    skipped, total = result.skipped, len(result.sites)
    if skipped and args.strict:
        listing = "; ".join(f"'{s.fqn}' ({s.pattern}): {s.reason}" for s in skipped)
        raise ConversionError(f"--strict and {len(skipped)} of {total} sites cannot be converted: {listing}. "
                              "Fix the cause, leave them out with --skip REGEX, or drop --strict")
    if converting and not result.converted:
        why = [f"{len(skipped)} site(s) cannot be converted ({skip_summary(skipped)})"] if skipped else []
        if result.excluded:
            why.append(f"{len(result.excluded)} site(s) are left out by --skip/--no-sequence/--no-dimension")
        why = why or ["no attention or MLP site was found", *result.notes]
        raise ConversionError(f"nothing to convert in {result.model_class}: {'; '.join(why)}")
    if skipped and converting:
        print(f"m2convert: warning: {len(skipped)} of {total} sites were left unconverted "
              f"({skip_summary(skipped)}; {see}; --strict makes this an error)", file=sys.stderr)
