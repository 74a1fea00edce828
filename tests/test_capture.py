"""Capture: torch.export of HF models with module paths, example inputs, and named failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import m2convert as m2
from m2convert.errors import CaptureError, UnsupportedModelError
from m2convert.passes.capture import capture
from m2convert.passes.inputs import dynamic_shapes, example_inputs_for, split_inputs
from m2convert.passes.graph import GraphIndex, module_path, op_name, projection_weight


class Branchy(nn.Module):
    """Data-dependent control flow: export cannot trace the branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.branchy = Branchy()

    def forward(self, x):
        return self.branchy(self.pre(x))


def test_capture_maps_nodes_to_modules(tiny_model):
    model = tiny_model("bert")
    model.train()
    captured = capture(model)
    assert model.training and not model._forward_hooks and not model.encoder._forward_pre_hooks
    index = GraphIndex(captured)
    sdpa = next(n for n in index.nodes if op_name(n) == "aten.scaled_dot_product_attention")
    assert module_path(sdpa) == "encoder.layer.0.attention.self"
    assert captured.calls["encoder.layer.1.attention"] == 1
    assert captured.outputs["encoder.layer.0.attention"] == {"type": "tuple", "len": 2}
    paths = [p.fqn for p in index.projections]
    assert len(paths) == 2 * 6 + 1 and "pooler.dense" in paths                  # q k v o fc1 fc2 per layer
    query = next(p for p in index.projections if p.fqn.endswith("0.attention.self.query"))
    assert module_path(query.input) == "embeddings.dropout"


def test_conv1d_is_one_projection(tiny_model):
    model = tiny_model("gpt2", layers=1)
    index = GraphIndex(capture(model))
    c_attn = next(p for p in index.projections if p.fqn == "transformer.h.0.attn.c_attn")
    assert [op_name(n) for n in sorted(c_attn.nodes, key=index.order.get)] == ["aten.view", "aten.addmm", "aten.view"]
    weight, _ = projection_weight(c_attn.module)
    assert weight.shape == (96, 32) and torch.equal(weight, c_attn.module.weight.t())


def test_mask_evaluates_on_example_inputs(tiny_model):
    index = GraphIndex(capture(tiny_model("gpt2", layers=1)))
    sdpa = next(n for n in index.nodes if op_name(n) == "aten.scaled_dot_product_attention")
    mask = index.evaluate([sdpa.args[3]])[sdpa.args[3]]
    n = mask.shape[-1]
    assert mask.dtype == torch.bool and torch.equal(mask[0, 0], torch.ones(n, n, dtype=torch.bool).tril())


def test_example_inputs_from_config(tiny_model):
    dec = example_inputs_for(tiny_model("llama"))
    assert dec["use_cache"] is False and dec["input_ids"].shape == (2, 16)
    assert torch.equal(dec["attention_mask"], torch.ones(2, 16, dtype=torch.long))
    short = tiny_model("bert")
    short.config.max_position_embeddings = 8
    assert example_inputs_for(short)["input_ids"].shape == (2, 8)


def test_explicit_example_inputs():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    for inputs in ((torch.randn(3, 4),), torch.randn(3, 4), {"input": torch.randn(3, 4)}):
        assert len(GraphIndex(capture(model, inputs)).projections) == 2


def test_split_inputs_takes_dicts_tensors_and_tuples_and_names_anything_else():
    ids = torch.ones(2, 8, dtype=torch.long)
    assert split_inputs({"input_ids": ids}) == ((), {"input_ids": ids})
    assert split_inputs(ids)[0][0] is ids and split_inputs([ids, ids])[0] == (ids, ids)
    with pytest.raises(CaptureError, match="example_inputs must be"):
        split_inputs("input_ids")


def test_dynamic_shapes_mark_every_input_of_the_first_inputs_length_and_batch():
    ids, pos, other = torch.ones(2, 8, dtype=torch.long), torch.arange(8), torch.ones(3, 5)
    shapes = dynamic_shapes((), {"input_ids": ids, "positions": pos, "other": other, "flag": False}, "seq", "batch")
    assert shapes == {"input_ids": {1: "seq", 0: "batch"}, "positions": None, "other": None, "flag": None}
    assert dynamic_shapes((ids, ids[:, :1]), {}, "seq") == ({1: "seq"}, None)     # no batch Dim: dim 0 static
    assert dynamic_shapes((ids[:, :1],), {}, "seq") is None                         # N = 1 cannot be symbolic
    assert dynamic_shapes((), {"use_cache": False}, "seq") is None                  # no tensor at all


def test_failed_capture_names_module_and_fallback():
    with pytest.raises(CaptureError) as err:
        m2.plan(Wrapper(), example_inputs=(torch.randn(2, 4),))
    message = str(err.value)
    assert "'branchy' (Branchy)" in message and "example_inputs" in message and "filter_fn" in message


def test_models_without_config_need_example_inputs():
    with pytest.raises(CaptureError, match="pass example_inputs"):
        m2.plan(nn.Linear(4, 4))


@pytest.mark.parametrize("thing", ["bert-base-uncased", {"weights": 1}, None])
def test_not_a_module(thing):
    with pytest.raises(UnsupportedModelError, match="expects a torch.nn.Module"):
        m2.plan(thing)
    with pytest.raises(m2.M2Error):
        m2.convert(thing)


@pytest.mark.parametrize("family, causal", [("gpt2", True), ("bert", False)])
def test_user_inputs_with_padding(tiny_model, tiny_inputs, family, causal):
    # Decoders get use_cache=False added; padding in the example batch does not hide the mask's shape.
    plan = m2.plan(tiny_model(family), m2.ConvertConfig(filter_order=16), example_inputs=tiny_inputs())
    seq = [s for s in plan.sites if s.kind == "sequence"]
    assert len(seq) == 2 and all(s.status == "convert" and s.causal is causal for s in seq)
