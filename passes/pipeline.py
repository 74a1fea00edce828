"""The analysis pipeline: capture once, run the passes in order, return a RewritePlan.

Each pass is a small function ``pass_fn(ctx) -> int`` (how many things it matched or kept) that reads
the captured graph through ``ctx.index`` and adds to or edits ``ctx.sites``. Set ``M2_DEBUG=1`` to log
which pattern fired where.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from m2convert.config import ConvertConfig
from m2convert.errors import ConfigError
from m2convert.passes.attention import find_attention
from m2convert.passes.capture import Captured, capture, check_model
from m2convert.passes.costs import estimate_costs
from m2convert.passes.graph import GraphIndex
from m2convert.passes.mlp import find_mlps
from m2convert.passes.other_mixers import name_other_mixers
from m2convert.passes.plan import RewritePlan
from m2convert.passes.select import select_sites
from m2convert.passes.sharing import check_sharing
from m2convert.passes.site import CONVERT, DIMENSION, SEQUENCE, Site
from m2convert.passes.unmatched import name_unmatched_cores

log = logging.getLogger("m2convert.passes")

ANALYSIS_PASSES = (
    find_attention,         # every ATTENTION_PATTERNS matcher (sdpa, matmul -> softmax -> matmul, ...)
    find_mlps,              # every MLP_PATTERNS matcher (act, gated), minus attention projections
    name_unmatched_cores,   # softmax cores no attention pattern matched: skipped sites saying why
    name_other_mixers,      # sequence mixers that are not attention (Mamba, short convs): kept, named
    check_sharing,          # modules at two paths, tied parameters: skipped (a swap would split them)
    select_sites,           # ConvertConfig: sequence/dimension switches, overrides, filter_fn
    estimate_costs,         # params and sympy FLOPs before/after per site
)


def debug(message: str) -> None:
    """Log a pass event; printed to stderr when M2_DEBUG=1."""
    log.debug(message)
    if os.environ.get("M2_DEBUG", "") not in ("", "0"):
        print(f"[m2convert] {message}", file=sys.stderr)


@dataclass
class PassResult:
    """What one pass did: its name, how many things it matched or kept, and how long it took."""

    name: str
    matched: int
    seconds: float


class PassContext:
    """State shared by the passes: the captured graph, the config and the sites found so far."""

    def __init__(self, captured: Captured, config: ConvertConfig):
        self.captured = captured
        self.index = GraphIndex(captured)
        self.config = config
        self.sites: list[Site] = []
        self.results: list[PassResult] = []

    def add(self, site: Site, message: str) -> None:
        same = next((s for s in self.sites if s.kind == site.kind and s.replaces == site.replaces), None)
        if same is not None:
            same.skip(f"'{site.fqn}' holds more than one {site.kind} core; one replacement cannot stand for them")
            return
        self.sites.append(site)
        debug(f"{message}: {site.status}{' (' + site.reason + ')' if site.reason else ''}")


def run_passes(ctx: PassContext, passes=ANALYSIS_PASSES, on_pass=None) -> list[PassResult]:
    """Run ``passes`` in order on ``ctx``; returns one PassResult per pass (``on_pass(name)`` after each)."""
    for pass_fn in passes:
        start = time.perf_counter()
        matched = pass_fn(ctx)
        ctx.results.append(PassResult(pass_fn.__name__, matched, time.perf_counter() - start))
        debug(f"pass {pass_fn.__name__}: {matched}")
        if on_pass is not None:
            on_pass(pass_fn.__name__)
    return ctx.results


def _notes(sites: list[Site]) -> list[str]:
    notes = []
    if not any(s.kind == SEQUENCE for s in sites):
        notes.append("no attention sites found: no registered attention pattern (scaled_dot_product_attention, "
                     "a QK product -> softmax -> product with V) matched the graph")
    if not any(s.kind == DIMENSION for s in sites):
        notes.append("no dense MLP sites found (linear -> activation -> linear, or act(gate) * up -> down)")
    if not any(s.status == CONVERT for s in sites):
        notes.append("nothing to convert: apply() returns an unchanged copy of the model")
    return notes


def as_config(config) -> ConvertConfig:
    """ConvertConfig from None, a ConvertConfig or a dict."""
    if config is None:
        return ConvertConfig()
    if isinstance(config, ConvertConfig):
        return config
    if isinstance(config, dict):
        return ConvertConfig.from_dict(config)
    raise ConfigError(f"config must be a ConvertConfig, a dict or None, got {type(config).__name__}")


def plan_model(model, config=None, example_inputs=None) -> RewritePlan:
    """Capture ``model``, run the analysis passes and return the plan (the model is not modified).

    Example:
        >>> plan = plan_model(transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64)))
        >>> [(s.pattern, s.status) for s in plan.sites]
        [('sdpa-attention', 'convert'), ('gelu-mlp', 'convert')]
    """
    check_model(model)
    config = as_config(config)
    with torch.random.fork_rng(devices=[]), tqdm(total=1 + len(ANALYSIS_PASSES), desc="m2convert: planning",
                                                  disable=None, leave=False) as bar:
        bar.set_postfix_str("capturing the model")          # torch.export: most of a large model's planning
        ctx = PassContext(capture(model, example_inputs), config)
        bar.update()
        run_passes(ctx, on_pass=lambda name: (bar.set_postfix_str(name), bar.update()))
    ctx.sites.sort(key=lambda s: _site_order(ctx, s))
    model_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return RewritePlan(ctx.sites, config, type(model).__name__, model_params=model_params,
                       notes=_notes(ctx.sites), model=model, captured=ctx.captured,
                       results=ctx.results)


def _site_order(ctx: PassContext, site: Site) -> int:
    names = list(ctx.captured.modules)
    paths = [p for p in site.replaces if p in ctx.captured.modules]
    return min((names.index(p) for p in paths), default=len(names))
