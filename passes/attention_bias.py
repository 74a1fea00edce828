"""Score biases that depend only on the key-query offset (ALiBi, bucketed relative positions).

The bias an attention core adds to its scores is read by evaluating the scores with the queries set to
zero: what the softmax then sees is the bias alone (masks included), whatever scaling, capping or
reshaping the chain does. It is an offset bias when, for every head, each allowed (query, key) pair
holds f_h(key - query) up to a constant per (head, query), which the softmax ignores; the measured
profiles (:class:`~m2convert.passes.site.OffsetBias`) later seed the mixer's filters.
"""

from __future__ import annotations

import torch
from torch import fx

from m2convert.passes.attention_patterns import AttentionCore, product_operands
from m2convert.passes.graph import GraphIndex
from m2convert.passes.site import OffsetBias

# Offset biases smaller than this everywhere are no bias (a zero or constant term).
FLAT = 1e-6
# Seeding a mixer's filter from an offset bias: taps for this many offsets, fitted in this many Adam
# steps (about a second per layer at H = 32 on one CPU thread; the fit error is kept in the plan).
SEED_OFFSETS = 256
SEED_STEPS = 100


def bias_alone(index: GraphIndex, core: AttentionCore) -> torch.Tensor | None:
    """(B, heads, Nq, Nk) float64 scores with zero queries (the bias and masks alone), or None.

    Cores with a score chain are rerun with Q's operand of the QK product zeroed; an SDPA core's bias
    is its float ``attn_mask``. None when there is none, or it cannot be evaluated.
    """
    try:
        if core.scores is not None:
            qk = _qk_product(index, core.scores)
            if qk is None:
                return None
            q = product_operands(index, qk)[0]
            value = index.evaluate([core.scores], {q: torch.zeros(q.meta["val"].shape, dtype=q.meta["val"].dtype)})
            value = value[core.scores]
        elif core.mask is not None and core.mask.meta.get("val") is not None and \
                core.mask.meta["val"].is_floating_point():
            value = index.evaluate([core.mask])[core.mask]
        else:
            return None
    except Exception:                                   # a bias built from something we cannot rerun
        return None
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.is_meta:
        return None
    return value.double()


def _qk_product(index: GraphIndex, node: fx.Node) -> fx.Node | None:
    """The QK product the scores chain starts from (the first product reached walking back)."""
    seen, stack = set(), [node]
    while stack:
        cur = stack.pop()
        if cur in seen or not isinstance(cur, fx.Node):
            continue
        seen.add(cur)
        if product_operands(index, cur) is not None:
            return cur
        stack.extend(index.data_inputs(cur))
    return None


def offset_bias(index: GraphIndex, core: AttentionCore, heads: int, causal: bool) -> OffsetBias | None:
    """The per-head offset profile of the bias ``core`` adds to its scores, or None when it adds none
    or its bias depends on more than the offset (content, absolute positions, 2-D windows).

    Example:
        >>> from m2convert.passes.attention_patterns import match_softmax
        >>> from m2convert.passes.capture import capture
        >>> model = transformers.BloomModel(transformers.BloomConfig(vocab_size=96, hidden_size=32, n_layer=1,
        ...                                                          n_head=4))
        >>> index = GraphIndex(capture(model))
        >>> bias = offset_bias(index, match_softmax(index)[0], heads=4, causal=True)     # ALiBi
        >>> bias.linear, bias.back[0][:3]                   # head 0: slope 1/4 per token back
        (True, [0.0, -0.25, -0.5])
    """
    value = bias_alone(index, core)
    if value is None or value.shape[-1] != value.shape[-2] or value.shape[1] not in (1, heads):
        return None
    value = value.expand(value.shape[0], heads, *value.shape[2:])                # (B, heads, N, N)
    n = value.shape[-1]
    allowed = value > torch.finfo(torch.float32).min / 2
    diagonal = torch.diagonal(value, dim1=-2, dim2=-1)                             # (B, heads, N)
    if not bool(allowed.diagonal(dim1=-2, dim2=-1).all()):
        return None
    rel = value - diagonal[..., None]                                              # bias minus own key's
    pos = torch.arange(n)
    offset = pos[None, :] - pos[:, None]                                           # key - query (N, N)
    back = _profile(rel, allowed, offset, -1)
    ahead = None if causal else _profile(rel, allowed, offset, 1)
    if back is None or (not causal and ahead is None):
        return None
    rows = back if ahead is None else torch.cat([back, ahead], dim=1)
    if float(rows.abs().max()) < FLAT:
        return None
    return OffsetBias(back.tolist(), None if ahead is None else ahead.tolist(), linear=_linear(back, ahead))


def _profile(rel: torch.Tensor, allowed: torch.Tensor, offset: torch.Tensor, sign: int):
    """(heads, n) bias at key - query = sign * j for j = 0.. while every allowed pair at that offset
    agrees (within float32 rounding); None when some offset holds pairs that disagree."""
    out = []
    for j in range(offset.shape[0]):
        at = (offset == sign * j)[None, None] & allowed                              # (B, heads, N, N)
        if not bool(at.any()):
            break
        vals = torch.where(at, rel, torch.nan)
        hi = torch.nan_to_num(vals, nan=-torch.inf).amax(dim=(0, 2, 3))               # (heads,)
        lo = torch.nan_to_num(vals, nan=torch.inf).amin(dim=(0, 2, 3))
        if not bool(((hi - lo) <= 1e-5 * (1 + hi.abs())).all()) or not bool(at.any(0).any(-1).any(-1).all()):
            return None
        out.append((hi + lo) / 2)
    return torch.stack(out, dim=1) if out else None


def _linear(back: torch.Tensor, ahead: torch.Tensor | None) -> bool:
    """Every profile is a line through 0 at j = 0 (ALiBi)."""
    for rows in (back, ahead):
        if rows is None:
            continue
        j = torch.arange(rows.shape[1], dtype=rows.dtype)
        slope = (rows * j).sum(1, keepdim=True) / (j * j).sum().clamp_min(1)
        if float((rows - slope * j).abs().max()) > 1e-5 * (1 + float(rows.abs().max())):
            return False
    return True
