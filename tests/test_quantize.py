"""Weight-only int8 of converted models (m2convert.quantize_int8) with the real quantizers: torchao's
int8 weight-only and torch.ao's dynamic int8 for the dense linears, int8 factors for MonarchLinear."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import m2convert as m2
from m2convert.errors import CheckpointError, ConfigError, ConversionError
from m2convert.layers import Int8MonarchLinear, MonarchLinear
from m2convert.layers.quantized import quantize_rows, quantized_modules


def _converted_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)
    return m2.convert(transformers.BertModel(cfg).eval(), m2.ConvertConfig(filter_order=16), progress=False)


def _counts(model):
    return (sum(isinstance(m, MonarchLinear) for m in model.modules()),
            sum(type(m) is nn.Linear for m in model.modules()))


def _rel(a, b):
    return ((a - b).norm() / a.norm()).item()


def test_rows_round_within_half_a_step():
    w = torch.randn(4, 24, 16) * torch.logspace(-3, 1, 16)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (4, 24, 1)
    assert int(q.abs().max()) == 127
    assert bool(((q * scale - w).abs() <= scale / 2 + 1e-7).all())


def test_int8_monarch_matches_its_float_layer_on_every_path():
    torch.manual_seed(0)
    layer = MonarchLinear(96, 320, nblocks=4, activation="gelu")
    q = Int8MonarchLinear(layer)
    assert {k: v.dtype for k, v in q.state_dict().items()} == {
        "w1_int8": torch.int8, "w1_scale": torch.float32, "w2_int8": torch.int8, "w2_scale": torch.float32,
        "bias": torch.float32}
    assert not list(p for p in q.parameters() if p.requires_grad)
    x = torch.randn(3, 50, 96)
    with torch.no_grad():
        fast, want = q(x), layer(x)
    slow = q(x.requires_grad_())                       # the reference path (autograd on the input)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert _rel(want, fast) < 0.02
    assert torch.allclose(q.weight @ x[0, 0].detach() + q.bias, q.to_dense() @ x[0, 0].detach() + q.bias, atol=1e-5)


def test_torchao_quantizes_linears_and_monarch_factors():
    from torchao.quantization import Int8Tensor

    model = _converted_bert()
    monarch, linear = _counts(model)
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        want = model(input_ids=x).last_hidden_state
    q = copy.deepcopy(model)
    assert m2.quantize_int8(q, linears="torchao") == {"monarch": monarch, "linear": linear, "linears": "torchao"}
    assert sum(isinstance(m, Int8MonarchLinear) for m in q.modules()) == monarch
    weights = [m.weight for m in q.modules() if type(m) is nn.Linear]
    assert len(weights) == linear and all(isinstance(w, Int8Tensor) for w in weights)
    with torch.no_grad():
        fast = q(input_ids=x).last_hidden_state
    slow = q(input_ids=x).last_hidden_state                           # grad mode: the reference paths
    assert torch.allclose(fast, slow, atol=1e-4)
    assert _rel(want, fast) < 0.01


def test_torch_ao_dynamic_where_torchao_is_absent():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = _converted_bert()
    monarch, linear = _counts(model)
    q = copy.deepcopy(model)
    with pytest.warns(Warning):                        # torch.ao's eager quantization is deprecated upstream
        report = m2.quantize_int8(q, linears="torch.ao")
    assert report == {"monarch": monarch, "linear": linear, "linears": "torch.ao"}
    assert sum(isinstance(m, DynamicLinear) for m in q.modules()) == linear
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        assert _rel(model(input_ids=x).last_hidden_state, q(input_ids=x).last_hidden_state) < 0.1


def test_quantizer_that_overwrites_monarch_weight_is_told_what_to_use():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    with pytest.raises(ConversionError, match="quantize_int8"):
        quantize_(_converted_bert(), Int8WeightOnlyConfig())          # its default filter takes MonarchLinear


def test_quantized_model_refuses_to_save_and_exports(tmp_path):
    q = _converted_bert()
    assert quantized_modules(q) == []
    m2.quantize_int8(q, linears="none")
    assert quantized_modules(q)[0].endswith("intermediate.dense")
    with pytest.raises(CheckpointError, match="quantize after loading"):
        q.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    x = torch.randint(0, 64, (1, 16))
    program = torch.export.export(q, (), {"input_ids": x})
    with torch.no_grad():
        assert torch.allclose(program.module()(input_ids=x).last_hidden_state, q(input_ids=x).last_hidden_state,
                              atol=1e-5)


def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="torchao"):
        m2.quantize_int8(nn.Linear(2, 2), linears="int4")
