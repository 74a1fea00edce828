"""Models nobody planned for: each converts correctly or is refused with a named M2Error.

Tied weights (GPT-2's lm_head, MLP linears tied to each other), frozen parameters, fp16/bf16 weights,
DataParallel wrappers, one module object reachable by two paths, models on the meta device.
(Whether a convert leaves its input untouched: test_convert_keeps_input_model.py.)
"""

from __future__ import annotations

import pytest
import torch

import m2convert as m2
from m2convert.errors import CaptureError, ConversionError, UnsupportedModelError
from m2convert.layers import M2Block, MonarchLinear
from m2convert.passes.capture import capture

transformers = pytest.importorskip("transformers")
SMALL = m2.ConvertConfig(filter_order=16)


def _bert(dtype=torch.float32, layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    return transformers.BertModel(cfg).eval().to(dtype)


def _ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(seed))     # (B, N)


def test_tied_lm_head_stays_tied():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    converted = m2.convert(model)
    assert converted.lm_head.weight is converted.transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(isinstance(m, M2Block) for m in converted.modules()) >= 2
    names = [n for n, _ in converted.named_parameters()]
    assert "lm_head.weight" not in names                                       # counted once


def test_gpt2_tied_lm_head_still_converts():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    plan = m2.plan(model, SMALL)
    assert len(plan.converted) == 4 and not plan.skipped
    converted = plan.apply()
    assert converted.lm_head.weight is converted.transformer.wte.weight


def test_tied_mlp_weights_are_skipped_and_strict_raises():
    model = _bert()
    model.encoder.layer[1].intermediate.dense.weight = model.encoder.layer[0].intermediate.dense.weight
    plan = m2.plan(model, SMALL)
    mlps = [s for s in plan.sites if s.kind == "dimension"]
    assert len(mlps) == 2 and all(s.status == "skip" and "tied weights" in s.reason for s in mlps)
    assert "'encoder.layer.1.intermediate.dense.weight'" in mlps[0].reason
    assert {s.status for s in plan.sites if s.kind == "sequence"} == {"convert"}
    converted = plan.apply()
    assert converted.encoder.layer[1].intermediate.dense.weight is converted.encoder.layer[0].intermediate.dense.weight
    with pytest.raises(ConversionError, match="tied weights"):
        m2.convert(model, SMALL, strict=True)


def test_frozen_parameters_stay_frozen_and_new_modules_train():
    model = _bert()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("embeddings."))                    # freeze the embeddings
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    converted = m2.convert(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    kept = dict(converted.named_parameters())
    assert all(not kept[n].requires_grad for n in before if n.startswith("embeddings."))
    new = [p for m in converted.modules() if isinstance(m, M2Block) for p in m.parameters()]
    assert new and all(p.requires_grad for p in new)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_half_precision_weights_convert_in_their_dtype(dtype, tol):
    ids = _ids(2, 9)
    torch.manual_seed(5)
    ref = m2.convert(_bert())(input_ids=ids).last_hidden_state               # (2, 9, 32) fp32
    torch.manual_seed(5)
    converted = m2.convert(_bert(dtype))
    assert {p.dtype for p in converted.parameters()} == {dtype}
    out = converted(input_ids=ids).last_hidden_state
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < tol


def test_data_parallel_needs_inputs_then_converts_its_module():
    ids = _ids(2, 9)
    with pytest.raises(CaptureError, match="DataParallel"):
        m2.convert(torch.nn.DataParallel(_bert()))
    torch.manual_seed(5)
    wrapped = m2.convert(torch.nn.DataParallel(_bert()).eval(), example_inputs={"input_ids": ids})
    torch.manual_seed(5)
    plain = m2.convert(_bert(), example_inputs={"input_ids": ids})
    assert isinstance(wrapped, torch.nn.DataParallel)
    assert isinstance(wrapped.module.encoder.layer[1].attention, M2Block)
    torch.testing.assert_close(wrapped(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state)


def test_shared_module_is_skipped_with_reason_and_strict_raises():
    model = _bert()
    model.encoder.layer[1] = model.encoder.layer[0]       # one object, two paths
    captured = capture(model)
    assert "?" not in captured.calls                      # hooks name paths even when export copies modules
    assert captured.shared["encoder.layer.1"] == ("encoder.layer.0", "encoder.layer.1")

    plan = m2.plan(model, SMALL)
    assert len(plan.sites) == 4 and not plan.converted
    for site in plan.sites:
        assert site.status == "skip"
        assert "module object shared by paths 'encoder.layer.0' and 'encoder.layer.1'" in site.reason
        assert "copy.deepcopy" in site.reason
    converted = plan.apply()
    assert converted.encoder.layer[0] is converted.encoder.layer[1]
    assert not any(isinstance(m, (M2Block, MonarchLinear)) for m in converted.modules())

    with pytest.raises(ConversionError, match="module object shared by paths"):
        m2.convert(model, SMALL, strict=True)
    assert model.encoder.layer[0] is model.encoder.layer[1]

    # excluding the sites, as the reason suggests, is accepted under strict
    kept = m2.convert(model, SMALL, strict=True, overrides={r"encoder\.layer\.": None})
    assert kept.encoder.layer[0] is kept.encoder.layer[1]


def test_shared_submodule_skips_both_sites_that_hold_it():
    model = _bert()
    model.encoder.layer[1].attention.self.query = model.encoder.layer[0].attention.self.query
    plan = m2.plan(model, SMALL)
    attention = [s for s in plan.sites if s.kind == "sequence"]
    assert len(attention) == 2
    assert all(s.status == "skip" and "encoder.layer.0.attention.self.query" in s.reason for s in attention)
    assert {s.status for s in plan.sites if s.kind == "dimension"} == {"convert"}


def test_meta_model_is_refused_by_name_and_saved_models_still_load(tmp_path):
    model = _bert().to("meta")
    with pytest.raises(UnsupportedModelError, match=r"'meta' device .*to_empty"):
        m2.plan(model)
    with pytest.raises(UnsupportedModelError, match="'meta' device"):
        m2.convert(model)

    # loading a converted model builds it on meta and applies the plan with seed=False
    converted = m2.convert(_bert(layers=1), SMALL)
    m2.save_pretrained(converted, tmp_path / "m2")
    loaded = m2.from_pretrained(tmp_path / "m2")
    assert isinstance(loaded.encoder.layer[0].attention, M2Block)
    assert not any(p.is_meta for p in loaded.parameters())
