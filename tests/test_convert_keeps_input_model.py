"""Planning and converting never change the model handed in, even when they fail.

Planning leaves every submodule's train/eval flag and every weight as it was; a convert that fails, is
interrupted (Ctrl-C) or is refused (strict, a filter_fn that raises) leaves the input bit-identical:
weights, dtypes, module types, train/eval and grad flags hashed before and after.
"""

from __future__ import annotations

import hashlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import m2convert as m2
from m2convert.errors import ConversionError

transformers = pytest.importorskip("transformers")
FAST = settings(max_examples=12, deadline=None)
SMALL = m2.ConvertConfig(filter_order=16)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    return transformers.BertModel(cfg).eval()


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the state-dict bytes, dtypes and shapes, module types, train/eval and grad flags."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.requires_grad}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr([(n, type(m).__name__, m.training) for n, m in model.named_modules()]).encode())
    h.update(repr(hasattr(model, "m2convert_plan")).encode())
    return h.hexdigest()


def _flags(model) -> list[tuple[str, bool]]:
    return [(name, module.training) for name, module in model.named_modules()]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(model, before: dict) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def bert_plan():
    return m2.plan(_bert())


def test_plan_restores_every_submodules_own_training_flag():
    model = _bert().train()
    model.encoder.layer[0].eval()                         # e.g. a frozen layer
    model.pooler.dense.eval()
    before, weights = _flags(model), _weights(model)
    assert not model.encoder.layer[0].training and model.encoder.layer[1].training
    plan = m2.plan(model, SMALL)
    assert plan.converted
    assert _flags(model) == before
    assert _same_weights(model, weights)


@FAST
@given(fail_at=st.integers(0, 3), inplace=st.booleans(), interrupt=st.booleans())
def test_failed_or_interrupted_convert_leaves_the_model_bit_identical(bert_plan, fail_at, inplace, interrupt):
    import m2convert.passes.apply as apply_mod

    model = bert_plan.model
    before = fingerprint(model)
    real, calls = apply_mod.build_replacements, []

    def flaky(site, target, **kw):
        calls.append(site.fqn)
        if len(calls) > fail_at:
            raise KeyboardInterrupt if interrupt else RuntimeError(f"simulated failure at {site.fqn}")
        return real(site, target, **kw)

    with mock.patch.object(apply_mod, "build_replacements", flaky):
        with pytest.raises(KeyboardInterrupt if interrupt else ConversionError) as info:
            bert_plan.apply(inplace=inplace)
    if not interrupt:
        assert calls[-1] in str(info.value) and "unchanged" in str(info.value)
    assert fingerprint(model) == before


def test_strict_refusal_and_failing_filter_fn_leave_the_model_bit_identical():
    model = _bert()
    before = fingerprint(model)
    with pytest.raises(ConversionError, match=r"strict=True .*encoder\.layer\.1"):
        m2.convert(model, overrides={r"layer\.1\.": {"nblocks": 64}}, strict=True)   # 64 blocks > width 32

    def broken(module, fqn):
        raise KeyError(fqn)

    with pytest.raises(m2.M2Error, match="filter_fn raised KeyError"):
        m2.convert(model, filter_fn=broken)
    assert fingerprint(model) == before
