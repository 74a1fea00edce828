"""PEFT LoRA on converted models: ``target_modules="all-linear"`` adapts the Monarch MLPs and the mixers'
projections and leaves the filter MLPs alone; adapters train, save and load; merging into a Monarch layer
is refused with the reason (a low-rank update is not Monarch-structured)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import m2convert as m2
from m2convert.errors import ConversionError
from m2convert.layers import MonarchLinear
from m2convert.layers.filters import FilterLinear

peft = pytest.importorskip("peft")


@pytest.fixture
def converted(tiny_model):
    """(original tiny BERT, its conversion): attention -> M2 mixer, MLP linears -> MonarchLinear."""
    model = tiny_model("bert")
    return model, m2.convert(model).eval()


def _lora(model, **kw):
    config = peft.LoraConfig(target_modules="all-linear", r=4, **kw)
    return peft.get_peft_model(model, config)


def test_monarch_linear_reads_like_nn_linear():
    layer = MonarchLinear(24, 40, nblocks=4)
    assert isinstance(layer, nn.Linear)
    assert (layer.in_features, layer.out_features) == (24, 40)
    assert sorted(layer.state_dict()) == ["bias", "w1", "w2"]                 # no dense weight is stored
    weight = layer.weight                                                     # (out, in), from the factors
    assert weight.shape == (40, 24) and weight.dtype == layer.w1.dtype and weight.device == layer.w1.device
    assert not weight.requires_grad
    torch.testing.assert_close(weight, layer.to_dense(), rtol=0, atol=0)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)
    dense = nn.Linear(24, 40)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)                                     # reading it into a tensor is fine
    assert torch.equal(dense.weight, layer.to_dense())


def test_adapter_injection_builds_no_dense_matrix(converted, monkeypatch):
    # PEFT reads weight.device / .dtype many times per layer; those come from metadata alone.
    built = []
    to_dense = MonarchLinear.to_dense
    monkeypatch.setattr(MonarchLinear, "to_dense", lambda self: built.append(self) or to_dense(self))
    _lora(converted[1])
    assert built == []


@pytest.mark.parametrize("write", ["data +=", "data =", "add_", "init", "setattr"])
def test_writes_to_the_dense_view_raise(write):
    layer = MonarchLinear(24, 40, nblocks=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ConversionError, match="MonarchLinear.weight"):
        if write == "data +=":
            layer.weight.data += 1.0
        elif write == "data =":
            layer.weight.data = torch.zeros(40, 24)
        elif write == "add_":
            layer.weight.add_(1.0)
        elif write == "init":
            nn.init.normal_(layer.weight)
        else:
            layer.weight = torch.zeros(40, 24)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_all_linear_targets_monarch_mlps_and_not_filter_mlps(tiny_model, family):
    converted = m2.convert(tiny_model(family))
    keys = set(converted.state_dict())
    monarch = {n for n, m in converted.named_modules() if isinstance(m, MonarchLinear)}
    filters = {n for n, m in converted.named_modules() if isinstance(m, FilterLinear)}
    assert monarch and filters
    model = _lora(converted)
    targeted = set(model.peft_config["default"].target_modules)
    assert monarch <= targeted                                                # every Monarch MLP linear
    assert not filters & targeted                                             # no filter MLP layer
    assert any(n.endswith("mixer.in_proj") for n in targeted)                 # the mixers' dense projections
    wrapped = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert all(isinstance(wrapped[n].get_base_layer(), MonarchLinear) for n in monarch)
    # The base model's own keys are unchanged under the adapter (PEFT only inserts ``base_layer.``).
    base = {k.removeprefix("base_model.model.").replace("base_layer.", "") for k in model.state_dict()
            if "lora_" not in k}
    assert base == keys


def test_lora_training_lowers_the_loss(converted, tiny_inputs):
    original, student = converted
    batch = tiny_inputs()
    with torch.no_grad():
        target = original(**batch).last_hidden_state                         # (B, N, H)
    model = _lora(student)
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith((".w1", ".w2"))}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(n.endswith((".w1", ".w2")) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=1e-2)
    model.eval()                                        # no dropout: the loss moves only by the updates
    losses = []
    for _ in range(15):
        loss = nn.functional.mse_loss(model(**batch).last_hidden_state, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    # The Monarch factors stayed frozen; the adapters around them learned.
    assert all(torch.equal(p, factors[n]) for n, p in model.named_parameters() if n in factors)
    mlp = model.base_model.model.encoder.layer[0].intermediate.dense
    assert mlp.lora_B["default"].weight.abs().sum() > 0


def test_adapter_saves_and_loads_with_equal_outputs(converted, tiny_inputs, tmp_path):
    original, student = converted
    model = _lora(student, init_lora_weights=False).eval()                   # random A and B: a real update
    batch = tiny_inputs()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(m2.convert(original).eval(), tmp_path).eval()
    saved, back = model.state_dict(), loaded.state_dict()
    assert set(saved) == set(back) and all(torch.equal(saved[k], back[k]) for k in saved)
    with torch.no_grad():
        got = loaded(**batch).last_hidden_state
    # Equal weights; BLAS may pick another kernel for differently aligned copies, hence not bit-equal.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_into_monarch_layers_is_refused_with_the_reason(converted, safe_merge):
    _, student = converted
    model = _lora(student, init_lora_weights=False)
    with pytest.raises(ConversionError, match="not Monarch-structured.*keep the adapter unmerged"):
        model.merge_and_unload(safe_merge=safe_merge)


def test_merge_of_adapters_on_dense_layers_is_exact(converted, tiny_inputs):
    _, student = converted
    config = peft.LoraConfig(target_modules=["in_proj", "out_proj"], r=4, init_lora_weights=False)
    model = peft.get_peft_model(student, config).eval()
    batch = tiny_inputs()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**batch).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
