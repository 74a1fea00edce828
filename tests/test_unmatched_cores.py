"""A softmax attention core that no registered pattern matches is a skipped site with a true reason,
never silently left dense: strict plans refuse it, and standard attention or other softmaxes are not
reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import m2convert as m2
from m2convert.errors import ConversionError
from m2convert.passes.attention_patterns import SCORE_OPS
from m2convert.passes.unmatched import PATTERN


class Attention(nn.Module):
    """Single-head attention with an optional op between the QK product and the softmax."""

    def __init__(self, between=None):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.between = between

    def forward(self, x):                                                   # x: (B, N, 16)
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 4.0                # (B, N, N)
        if self.between is not None:
            scores = self.between(scores)
        return self.o(scores.softmax(-1) @ self.v(x))                       # (B, N, 16)


class Classifier(nn.Module):
    """A softmax over logits (a projection of the input, not a product of two inputs): not attention."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(x).softmax(-1)


def _plan(model, **config):
    model = nn.Sequential(model)                      # the attention is a submodule, as in real models
    return m2.plan(model, m2.ConvertConfig(filter_order=16, **config), example_inputs=(torch.randn(1, 8, 16),))


def _sequence_sites(plan):
    return [s for s in plan.sites if s.kind == "sequence"]


@pytest.mark.parametrize("between, op", [
    (lambda s: torch.sinh(s), "aten.sinh"),
    (lambda s: torch.erf(s), "aten.erf"),
])
def test_an_unknown_op_before_the_softmax_is_named(between, op):
    assert op not in SCORE_OPS
    plan = _plan(Attention(between))
    (site,) = _sequence_sites(plan)
    assert (site.pattern, site.status) == (PATTERN, "skip")
    assert op in site.reason and "register" in site.reason
    assert not plan.converted or all(s.kind == "dimension" for s in plan.converted)


def test_strict_refuses_a_plan_with_an_unmatched_core():
    plan = _plan(Attention(torch.sinh), strict=True)
    with pytest.raises(ConversionError, match="unmatched-softmax-core"):
        plan.apply()


def test_excluding_the_site_lets_strict_through():
    model = Attention(torch.sinh)
    plan = _plan(model, strict=True, overrides={"": None})
    assert all(s.status == "exclude" for s in plan.sites)
    assert isinstance(plan.apply()[0], Attention)


def test_matched_attention_and_other_softmaxes_are_not_reported():
    (site,) = _sequence_sites(_plan(Attention()))
    assert site.pattern != PATTERN and site.status == "convert"
    assert _sequence_sites(_plan(Classifier())) == []
