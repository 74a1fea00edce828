"""Weight storage for one-token decoding (m2convert.layers.gemv): strides change, values and files do not."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import m2convert as m2
from m2convert.layers.gemv import lay_out_for_decode
from m2convert.layers.recurrent import recurrent_layout, restore_recurrent_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted():
    """A tiny GPT-2 converted with the default settings (dense mixer projections, Monarch MLPs)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return m2.convert(transformers.GPT2LMHeadModel(config).eval(), m2.ConvertConfig(filter_order=16))


def _matrices(model):
    """{name: parameter} of the converted matrices: mixer projections and Monarch factors."""
    return {n: p for n, p in model.named_parameters()
            if n.endswith(("in_proj.weight", "out_proj.weight", ".w1", ".w2"))}


def _strides(model):
    return {n: p.stride() for n, p in model.named_parameters()}


def test_longer_output_matrices_are_stored_transposed_and_nothing_else_changes(converted):
    model = copy.deepcopy(converted)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    wide = {n for n, p in _matrices(model).items() if p.shape[-2] > p.shape[-1]}
    assert {"transformer.h.0.attn.mixer.in_proj.weight", "transformer.h.0.mlp.c_fc.w2"} <= wide
    assert lay_out_for_decode(model) == len(wide)
    for name, p in model.named_parameters():
        out = p.shape[-2] if p.dim() >= 2 else None
        assert (p.stride()[-2:] == (1, out)) == (name in wide), name
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert lay_out_for_decode(model) == 0                                   # idempotent


def test_recurrent_models_are_stored_for_decoding_and_load_alike(converted, tmp_path):
    recurrent = m2.to_recurrent(converted, state_size=4, horizon=128).model
    assert _strides(recurrent) != _strides(converted)
    assert lay_out_for_decode(copy.deepcopy(recurrent)) == 0                # to_recurrent already did it
    restored = restore_recurrent_layout(copy.deepcopy(converted), recurrent_layout(recurrent))
    restored.load_state_dict(recurrent.state_dict())
    recurrent.save_pretrained(tmp_path / "rec")
    loaded = m2.from_pretrained(tmp_path / "rec")
    assert _strides(restored) == _strides(loaded) == _strides(recurrent)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, recurrent(ids).logits)
        assert torch.equal(restored(ids).logits, recurrent(ids).logits)
