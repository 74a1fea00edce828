"""The budget of attention to keep, and the choice of what to keep within it.

``select_attention(plan, calibration)`` scores every candidate of a plan (each attention site it would
convert, or at head level each KV group of those sites), keeps the best within the budget and marks each
site's :class:`Selection`. A site kept whole is excluded from conversion with the reason; a site keeping
some heads becomes a head-level hybrid (``settings["kept_groups"]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m2convert.errors import ConfigError
from m2convert.layers.heads import kept_cost
from m2convert.passes.select import check_feeds
from m2convert.passes.site import CONVERT, SEQUENCE, AttentionLayout, Selection, Site
from m2convert.selection.scores import SCORERS, Candidates, Unit


@dataclass(frozen=True)
class Budget:
    """How much attention to keep: ``layers`` attention sites, ``kv_bytes`` of KV cache per token, or a
    fraction ``heads`` of all heads (head level).

    Example:
        >>> Budget(layers=2).describe(), Budget(kv_bytes=4096).describe(), Budget(heads=0.125).describe()
        ('2 layers', '4096 KV-cache bytes per token', '12.5% of the heads')
    """

    layers: int = 0
    kv_bytes: int = 0
    heads: float = 0.0

    @classmethod
    def from_config(cls, config) -> "Budget":
        return cls(layers=config.keep_layers, kv_bytes=config.keep_kv_bytes, heads=float(config.keep_heads))

    @property
    def head_level(self) -> bool:
        return self.heads > 0

    def describe(self) -> str:
        if self.heads:
            return f"{100 * self.heads:g}% of the heads"
        if self.kv_bytes:
            return f"{self.kv_bytes} KV-cache bytes per token"
        return f"{self.layers} layer{'s' if self.layers != 1 else ''}"

    def costs(self, units: list[Unit], itemsize: int) -> tuple[list[int], int]:
        """(each unit's cost, the capacity): 1 per layer of ``layers``; K/V bytes per token of
        ``kv_bytes``; query heads per KV group of ``heads`` (the capacity: that fraction of all heads)."""
        if self.heads:
            per = [u.site.layout.heads // u.site.layout.kv_heads for u in units]
            total = sum(s.layout.heads for s in {id(u.site): u.site for u in units}.values())
            return per, int(self.heads * total + 1e-9)
        if self.kv_bytes:
            return [kv_bytes_per_token(u.site, itemsize) for u in units], self.kv_bytes
        return [1] * len(units), self.layers


def kv_bytes_per_token(site: Site, itemsize: int, groups: int | None = None) -> int:
    """Bytes of K and V one token adds to this attention site's cache: 2 x kv_heads (or ``groups`` kept KV
    heads) x head_dim x itemsize.

    Example:
        >>> site = Site("attn", "sequence", "sdpa-attention", layout=AttentionLayout("M2Attention", 64, 8, 2, 8))
        >>> kv_bytes_per_token(site, 2), kv_bytes_per_token(site, 2, groups=1)   # bf16
        (64, 32)
    """
    layout = site.layout
    if not isinstance(layout, AttentionLayout):
        return 0
    return 2 * (layout.kv_heads if groups is None else groups) * layout.head_dim * itemsize


def choose(scores: list[float | None], costs: list[int], capacity: int) -> list[int]:
    """Indices of the candidates kept: the highest scores first while their costs fit in ``capacity``; with
    no scores (uniform), as many evenly spaced candidates as fit.

    Example:
        >>> choose([0.1, 0.5, 0.2, 0.0], [1] * 4, 2)
        [1, 2]
        >>> choose([None] * 6, [1] * 6, 2)
        [1, 4]
        >>> choose([0.1, 0.5, 0.2, 0.0], [8, 16, 8, 8], 24)
        [1, 2]
    """
    n = len(scores)
    if all(s is None for s in scores):
        for k in range(n, 0, -1):
            picked = [int((i + 0.5) * n / k) for i in range(k)]
            if sum(costs[i] for i in picked) <= capacity:
                return picked
        return []
    kept, used = [], 0
    for i in sorted(range(n), key=lambda i: (-float(scores[i]), i)):
        if used + costs[i] <= capacity:
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


def _units(sites: list[Site], head_level: bool) -> list[Unit]:
    if not head_level:
        return [Unit(s) for s in sites]
    return [Unit(s, g) for s in sites for g in range(s.layout.kv_heads)]


def _mark(sites, units, scores, kept, method, budget, itemsize) -> None:
    ranks = _ranks(scores, kept)
    total = len(units)
    for site in sites:
        mine = [i for i, u in enumerate(units) if u.site is site]
        best = min(mine, key=lambda i: ranks[i])
        groups = [units[i].group for i in mine if i in kept]
        rows = None
        if budget.head_level:
            rep = site.layout.heads // site.layout.kv_heads
            rows = [{"group": units[i].group, "heads": list(range(units[i].group * rep, (units[i].group + 1) * rep)),
                     "score": scores[i], "rank": ranks[i], "kept": i in kept} for i in mine]
        site.selection = Selection(method, scores[best], ranks[best], bool(groups), budget.describe(),
                                   kv_bytes_per_token(site, itemsize, len(groups) if rows else None) if groups else 0,
                                   rows)
        if not groups:
            continue
        score = "" if scores[best] is None else f" score {scores[best]:.4g},"
        why = f"{method}{score} rank {ranks[best]} of {total}, within the budget of {budget.describe()}"
        if rows is None or len(groups) == site.layout.kv_heads:
            site.exclude(f"kept as attention: {why}")
        else:
            site.settings["kept_groups"] = groups
            heads = [h for r in rows if r["kept"] for h in r["heads"]]
            params, flops = kept_cost(site.layout.hidden, len(heads), len(groups), site.layout.head_dim)
            site.params_after += params
            site.flops_after = site.flops_after + flops if site.flops_after is not None else None
            site.replacement = f"{site.replacement} + softmax heads {heads}"
            site.reason = f"keeps heads {heads} as softmax attention: {why}"


def select_attention(plan, calibration=None, *, tokenizer=None, progress: bool = True) -> list[Site]:
    """Keep the attention of ``plan`` that its config's budget and selection method choose.

    Args:
        plan: a :class:`~m2convert.passes.plan.RewritePlan` holding its model, whose config sets
            ``keep_layers``, ``keep_kv_bytes`` or ``keep_heads``; changed in place.
        calibration: batches for the measured methods ("kl", "offset-fit"): a list of dicts (input_ids
            (B, N), attention_mask (B, N)), or anything :func:`m2convert.distill` takes as data (a file
            with ``tokenizer``); the last quarter (at least one batch) is held out for the "kl" scores.
        tokenizer: the model's tokenizer, for calibration files.
        progress: a progress bar over the measured candidates.

    Returns the sites that keep attention (whole, or some heads). Raises ConfigError when the method needs
    calibration batches and has none.
    """
    config = plan.config
    budget = Budget.from_config(config)
    method = _method(config, calibration)
    sites = [s for s in plan.sites if s.kind == SEQUENCE and s.status == CONVERT
             and isinstance(s.layout, AttentionLayout)]
    if not sites:
        plan.notes.append(f"attention budget of {budget.describe()}: no attention site converts, nothing to keep")
        return []
    if method not in SCORERS:
        raise ConfigError(f"selection={method!r} has no scorer; registered: {sorted(SCORERS)}")
    scorer = SCORERS[method]
    if scorer.needs_data and calibration is None:
        raise ConfigError(f"selection={method!r} measures each candidate on calibration batches; pass "
                          "calibration= (a list of batches, or a text/TSV/JSONL file with tokenizer=) to m2.plan / "
                          "m2.convert or --calibration FILE on the command line, or use selection='uniform'")
    itemsize = next((p.element_size() for p in plan.model.parameters() if p.is_floating_point()), 4)
    units = _units(sites, budget.head_level)
    costs, capacity = budget.costs(units, itemsize)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        scores = scorer.score(Candidates(plan, units, calibration, tokenizer, progress))
    kept = choose(scores, costs, capacity)
    _mark(sites, units, scores, kept, method, budget, itemsize)
    check_feeds(plan.sites)                       # a kept layer may read what a converted one made
    if budget.layers > len(sites):
        plan.notes.append(f"keep_layers={budget.layers} but only {len(sites)} attention site(s) would convert: "
                          "every one keeps its attention")
    return [s for s in sites if s.selection.kept]
