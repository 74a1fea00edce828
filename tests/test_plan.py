"""Analysis passes and RewritePlan: what matches, what must not, user selection, strictness, outputs."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import sympy
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import m2convert as m2
from m2convert.errors import ConfigError, ConversionError
from m2convert.layers.base import M2Block
from m2convert.layers.cost import N
from m2convert.passes.plan import growth

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = m2.ConvertConfig(filter_order=16)


class ToyAttention(nn.Module):
    """A hand-written sdpa attention (not from transformers); ``leak`` also returns V."""

    def __init__(self, d=16, heads=2, leak=False):
        super().__init__()
        self.heads, self.leak = heads, leak
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split(self, t):
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)              # (B, h, N, d/h)

    def forward(self, x):
        b, n, d = x.shape
        v = self.v(x)
        y = F.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(x)), self.split(v),
                                           is_causal=True)                              # (B, h, N, d/h)
        out = self.o(y.transpose(1, 2).reshape(b, n, d))                          # (B, N, d)
        return (out, v) if self.leak else out


class ToyBlock(nn.Module):
    """x + attn(x), then h + fc2(gelu(fc1(h))); ``leak_mlp`` reuses the hidden activation."""

    def __init__(self, d=16, leak_attn=False, leak_mlp=False):
        super().__init__()
        self.attn = ToyAttention(d, leak=leak_attn)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.leak_attn, self.leak_mlp = leak_attn, leak_mlp

    def forward(self, x):
        a = self.attn(x)
        if self.leak_attn:
            a, v = a
            x = x + v.mean(-1, keepdim=True)
        h = x + a
        act = F.gelu(self.fc1(h))
        out = h + self.fc2(act)
        return out + act.mean(-1, keepdim=True) if self.leak_mlp else out


X = (torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0)),)


def test_handwritten_sdpa_model_converts():
    torch.manual_seed(0)
    model = ToyBlock()
    plan = m2.plan(model, SMALL, example_inputs=X)
    assert [(s.fqn, s.kind, s.pattern, s.causal) for s in plan.converted] == [
        ("attn", "sequence", "sdpa-attention", True), ("", "dimension", "gelu-mlp", None)]
    assert plan.converted[0].layout.num_outputs == 0                           # returns a bare tensor
    converted = plan.apply()
    assert isinstance(converted.attn, M2Block) and converted(*X).shape == X[0].shape


def test_nothing_to_convert_says_so():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    x = (torch.randn(2, 3, 8),)
    plan = m2.plan(model, example_inputs=x)
    assert plan.sites == [] and "no attention sites found" in str(plan) and "nothing to convert" in str(plan)
    converted = plan.apply()
    assert converted is not model and torch.equal(converted(*x), model(*x))


def test_mlp_only_model_has_no_sequence_sites():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    plan = m2.plan(model, example_inputs=(torch.randn(2, 8),))
    assert [(s.kind, s.pattern, s.replaces) for s in plan.sites] == [("dimension", "relu-mlp", ["0", "2"])]
    assert any("no attention sites" in n for n in plan.notes)


@pytest.mark.parametrize("leak", ["attn", "mlp"])
def test_reused_values_are_skipped_with_reason(leak):
    torch.manual_seed(0)
    model = ToyBlock(leak_attn=leak == "attn", leak_mlp=leak == "mlp")
    plan = m2.plan(model, SMALL, example_inputs=X)
    (skipped,) = plan.skipped
    assert skipped.kind == ("sequence" if leak == "attn" else "dimension")
    assert "also used outside" in skipped.reason and skipped.fqn in str(plan)
    with pytest.raises(ConversionError, match="strict=True"):
        m2.plan(model, m2.ConvertConfig(strict=True, filter_order=16), example_inputs=X).apply()
    converted = plan.apply()                                   # the skipped site stays as it was
    kept = converted.attn if leak == "attn" else converted.fc1
    assert not isinstance(kept, M2Block)


def test_task_heads_and_norm_separated_linears_do_not_match(tiny_model):
    model = tiny_model("bert", head="BertForSequenceClassification")
    plan = m2.plan(model, SMALL)
    assert len(plan.sites) == 4 and not any("classifier" in p for s in plan.sites for p in s.replaces)


def test_filter_fn_and_overrides_restrict(tiny_model):
    model = tiny_model("bert")
    only_layer0 = m2.ConvertConfig(filter_order=16, filter_fn=lambda mod, fqn: "layer.1." not in fqn)
    plan = m2.plan(model, only_layer0)
    assert {s.fqn for s in plan.converted} == {"encoder.layer.0.attention", "encoder.layer.0"}
    assert all("filter_fn returned False" in s.reason for s in plan.excluded) and len(plan.excluded) == 2
    converted = plan.apply()
    assert not isinstance(converted.encoder.layer[1].attention, M2Block)

    cfg = m2.ConvertConfig(filter_order=16, overrides={r"layer\.1\.": None, r"layer\.0\.intermediate": {"nblocks": 2}})
    plan = m2.plan(model, cfg)
    assert {s.fqn for s in plan.excluded} == {"encoder.layer.1.attention", "encoder.layer.1"}
    mlp = next(s for s in plan.converted if s.kind == "dimension")
    assert mlp.settings["nblocks"] == 2
    assert plan.apply().encoder.layer[0].intermediate.dense.nblocks == 2

    plan = m2.plan(model, m2.ConvertConfig(sequence=False, filter_order=16))
    assert {s.kind for s in plan.converted} == {"dimension"} and len(plan.excluded) == 2


def test_unbuildable_site_is_skipped_and_strict_raises(tiny_model):
    model = tiny_model("bert")
    cfg = m2.ConvertConfig(filter_order=16, overrides={r"layer\.0\.intermediate": {"nblocks": 64}})
    plan = m2.plan(model, cfg)
    (skipped,) = plan.skipped
    assert skipped.fqn == "encoder.layer.0" and "nblocks" in skipped.reason
    with pytest.raises(ConversionError, match="encoder.layer.0"):
        m2.plan(model, m2.ConvertConfig(**{**cfg.to_dict(), "strict": True})).apply()


@pytest.mark.parametrize("bad", [dict(nblocks=0), dict(rank=-1), dict(causal_mode="bidi"), dict(filter_emb_dim=4),
                                 dict(sequence="yes"), dict(seq_len=0), dict(filter_fn=3),
                                 dict(overrides={"(": None}), dict(overrides={"x": {"nblocks": 2, "heads": 3}})])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        m2.ConvertConfig(**bad)


def test_config_round_trip():
    cfg = m2.ConvertConfig(nblocks=8, causal_mode="causal-monarch", overrides={r"h\.0\.": {"rank": 2}, "x": None},
                           filter_fn=lambda m, f: True)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert "filter_fn" not in data
    back = m2.ConvertConfig.from_dict(data)
    assert back.to_dict() == cfg.to_dict() and back.filter_fn is None
    with pytest.raises(ConfigError, match="unknown"):
        m2.ConvertConfig.from_dict({"nblocks": 4, "blocks": 2})


def test_plan_outputs_and_round_trip(tiny_model):
    model = tiny_model("gpt2")
    plan = m2.plan(model, m2.ConvertConfig(filter_order=16, seq_len=1024))
    text = str(plan)
    assert all(s.fqn in text for s in plan.sites) and "N^2 -> N log N" in text and "@N=1024" in text
    data = json.loads(plan.to_json())
    assert data["config"]["seq_len"] == 1024 and len(data["sites"]) == 4
    back = m2.RewritePlan.from_dict(data)
    assert [s.to_dict() for s in back.sites] == [s.to_dict() for s in plan.sites]
    attn = plan.converted[0]
    assert attn.flops_before.has(N ** 2) and sympy.simplify(back.sites[0].flops_before - attn.flops_before) == 0
    assert data["sites"][0]["flops_before_at_n"] == plan.flops(attn.flops_before)
    small = m2.plan(model, m2.ConvertConfig(filter_order=16, seq_len=128))
    assert small.flops(small.sites[0].flops_before) < plan.flops(attn.flops_before)
    assert (growth(attn.flops_before), growth(attn.flops_after)) == ("N^2", "N log N")


def test_plan_from_dict_builds_structure_on_meta(tiny_model):
    model = tiny_model("llama")
    data = json.loads(m2.plan(model, SMALL).to_json())
    with torch.device("meta"):
        empty = type(model)(model.config)
    converted = m2.RewritePlan.from_dict(data).apply(model=empty, inplace=True, seed=False)
    attn = converted.model.layers[0].self_attn
    assert type(attn).__name__ == "M2Attention" and attn.mixer.in_proj.weight.is_meta
    assert type(converted.model.layers[1].mlp.down_proj).__name__ == "MonarchLinear"
    with pytest.raises(ConversionError, match="holds no model"):
        m2.RewritePlan.from_dict(data).apply()


def test_graph_diff_and_model_diff(tiny_model):
    model = tiny_model("bert")
    plan = m2.plan(model, SMALL)
    g = plan.graph_diff()
    assert isinstance(g, nx.DiGraph)
    changes = [d["change"] for _, d in g.nodes(data=True)]
    assert changes.count("added") == 2 and changes.count("replaced") == 4 and changes.count("removed") > 0
    added = [k for k, d in g.nodes(data=True) if d["change"] == "added"]
    assert all(g.in_degree(k) > 0 and g.out_degree(k) > 0 for k in added)
    result = m2.diff(model, plan.apply())
    assert sorted(c.path for c in result.changes) == sorted(p for s in plan.converted for p in s.replaces)
    assert result.params_before - result.params_after == plan.model_params - plan.totals()["params_after"]
    assert result.counts()["added"] > 0 and "replaced" in str(result)


def test_debug_log_names_the_pattern(tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("M2_DEBUG", "1")
    m2.plan(tiny_model("llama", "eager", layers=1), SMALL)
    err = capsys.readouterr().err
    assert "eager-attention fired at 'model.layers.0.self_attn'" in err and "gated-mlp fired at" in err


def test_a_converted_model_plans_no_new_sites():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    converted = m2.convert(transformers.BertModel(config).eval(), m2.ConvertConfig(filter_order=8))
    assert m2.plan(converted).sites == []
