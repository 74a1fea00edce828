"""The budget of attention to keep, and the choice of sites within it.

``select_attention(plan, calibration)`` scores every candidate attention site of a plan (the sequence sites
it would convert), keeps the best within the budget and marks each site's :class:`Selection`; kept sites
are excluded from conversion with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m2convert.errors import ConfigError
from m2convert.passes.site import CONVERT, SEQUENCE, AttentionLayout, Selection, Site
from m2convert.selection.scores import SCORERS, Candidates


@dataclass(frozen=True)
class Budget:
    """How much attention to keep: ``layers`` attention sites, or ``kv_bytes`` of KV cache per token.

    Example:
        >>> Budget(layers=2).describe(), Budget(kv_bytes=4096).describe()
        ('2 layers', '4096 KV-cache bytes per token')
    """

    layers: int = 0
    kv_bytes: int = 0

    @classmethod
    def from_config(cls, config) -> "Budget":
        return cls(layers=config.keep_layers, kv_bytes=config.keep_kv_bytes)

    def describe(self) -> str:
        if self.kv_bytes:
            return f"{self.kv_bytes} KV-cache bytes per token"
        return f"{self.layers} layer{'s' if self.layers != 1 else ''}"


def kv_bytes_per_token(site: Site, itemsize: int) -> int:
    """Bytes of K and V one token adds to this attention site's cache: 2 x kv_heads x head_dim x itemsize.

    Example:
        >>> from m2convert.passes.site import AttentionLayout
        >>> site = Site("attn", "sequence", "sdpa-attention", layout=AttentionLayout("M2Attention", 64, 8, 2, 8))
        >>> kv_bytes_per_token(site, 2)          # 2 (K, V) x 2 KV heads x 8 x 2 bytes (bf16)
        64
    """
    layout = site.layout
    if not isinstance(layout, AttentionLayout):
        return 0
    return 2 * layout.kv_heads * layout.head_dim * itemsize


def choose(scores: list[float | None], costs: list[int], budget: Budget) -> list[int]:
    """Indices of the candidates kept: the highest scores first while the budget allows; with no scores
    (uniform), evenly spaced candidates, as many as fit.

    scores: one per candidate (higher: more worth keeping), or all None.  costs: each one's KV bytes/token.

    Example:
        >>> choose([0.1, 0.5, 0.2, 0.0], [8] * 4, Budget(layers=2))
        [1, 2]
        >>> choose([None] * 6, [8] * 6, Budget(layers=2))
        [1, 4]
        >>> choose([0.1, 0.5, 0.2, 0.0], [8, 16, 8, 8], Budget(kv_bytes=24))
        [1, 2]
    """
    n = len(scores)
    if all(s is None for s in scores):
        for k in range(min(n, budget.layers) if budget.layers else n, 0, -1):
            picked = [int((i + 0.5) * n / k) for i in range(k)]
            if budget.layers or sum(costs[i] for i in picked) <= budget.kv_bytes:
                return picked
        return []
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    if budget.layers:
        return sorted(order[:budget.layers])
    kept, used = [], 0
    for i in order:
        if used + costs[i] <= budget.kv_bytes:
            kept.append(i)
            used += costs[i]
    return sorted(kept)


def _ranks(scores: list[float | None], kept: list[int]) -> list[int]:
    n = len(scores)
    if all(s is None for s in scores):
        order = kept + [i for i in range(n) if i not in kept]
    else:
        order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    rank = [0] * n
    for r, i in enumerate(order, start=1):
        rank[i] = r
    return rank


def _method(config, calibration) -> str:
    if config.selection != "auto":
        return config.selection
    return "kl" if calibration is not None else "uniform"


def select_attention(plan, calibration=None, *, tokenizer=None, progress: bool = True) -> list[Site]:
    """Keep the attention sites of ``plan`` that its config's budget and selection method choose.

    Args:
        plan: a :class:`~m2convert.passes.plan.RewritePlan` holding its model, whose config sets
            ``keep_layers`` or ``keep_kv_bytes``; changed in place.
        calibration: batches for the measured methods ("kl", "offset-fit"): a list of dicts (input_ids
            (B, N), attention_mask (B, N)), or anything :func:`m2convert.distill` takes as data (a file
            with ``tokenizer``); the last quarter (at least one batch) is held out for the "kl" scores.
        tokenizer: the model's tokenizer, for calibration files.
        progress: a progress bar over the measured candidates.

    Returns the kept sites. Raises ConfigError when the method needs calibration batches and has none.
    """
    config = plan.config
    budget = Budget.from_config(config)
    method = _method(config, calibration)
    sites = [s for s in plan.sites if s.kind == SEQUENCE and s.status == CONVERT]
    if not sites:
        plan.notes.append(f"attention budget of {budget.describe()}: no attention site converts, nothing to keep")
        return []
    if method not in SCORERS:
        raise ConfigError(f"selection={method!r} has no scorer; registered: {sorted(SCORERS)}")
    scorer = SCORERS[method]
    if scorer.needs_data and calibration is None:
        raise ConfigError(f"selection={method!r} measures each layer on calibration batches; pass calibration= "
                          "(a list of batches, or a text/TSV/JSONL file with tokenizer=) to m2.plan / m2.convert "
                          "or --calibration FILE on the command line, or use selection='uniform'")
    itemsize = next((p.element_size() for p in plan.model.parameters() if p.is_floating_point()), 4)
    costs = [kv_bytes_per_token(s, itemsize) for s in sites]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        scores = scorer.score(Candidates(plan, sites, calibration, tokenizer, progress))
    kept = choose(scores, costs, budget)
    ranks = _ranks(scores, kept)
    for i, site in enumerate(sites):
        site.selection = Selection(method, scores[i], ranks[i], i in kept, budget.describe(), costs[i])
        if i in kept:
            score = "" if scores[i] is None else f" score {scores[i]:.4g},"
            site.exclude(f"kept as attention: {method}{score} rank {ranks[i]} of {len(sites)}, within the budget "
                         f"of {budget.describe()}")
    if budget.layers > len(sites):
        plan.notes.append(f"keep_layers={budget.layers} but only {len(sites)} attention site(s) would convert: "
                          "every one keeps its attention")
    return [sites[i] for i in kept]
