"""Mixture-of-experts MLPs: stacked experts modules plan as experts-mlp sites and become MonarchExperts.

Tiny random Mixtral and Qwen2-MoE models (transformers 5 experts modules, stacked gate_up (E, 2I, H) and
down (E, H, I)), plus toy experts modules for biases and for a formula MonarchExperts does not compute.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from torch import nn

import m2convert as m2
from m2convert.layers.experts import MonarchExperts, dense_experts
from m2convert.passes.experts import routing
from m2convert.passes.plan import RewritePlan
from m2convert.passes.site import ExpertsLayout

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = m2.ConvertConfig(filter_order=16)
TEXT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")


def _mixtral(cls=T.MixtralModel, layers=1, **kw):
    torch.manual_seed(0)
    config = T.MixtralConfig(**{**TEXT, "num_hidden_layers": layers}, intermediate_size=64, num_local_experts=4,
                             num_experts_per_tok=2, **kw)
    return cls(config).eval()


def _qwen2_moe(**kw):
    torch.manual_seed(0)
    config = T.Qwen2MoeConfig(**TEXT, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=48, shared_expert_intermediate_size=64, **kw)
    return T.Qwen2MoeModel(config).eval()


FAMILIES = {"mixtral": (_mixtral, 64), "qwen2-moe": (_qwen2_moe, 48)}     # builder, expert width I


def _inputs(batch: int, n: int = 10) -> dict:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, 96, (batch, n), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, 6:] = 0                                   # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def _experts_site(plan):
    sites = [s for s in plan.sites if s.pattern == "experts-mlp"]
    assert len(sites) == 1, [(s.fqn, s.pattern) for s in plan.sites]
    return sites[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_plan_as_convert_sites_with_their_layout(family):
    build, inter = FAMILIES[family]
    model = build()
    plan = m2.plan(model, SMALL)
    site = _experts_site(plan)
    assert site.status == "convert" and site.fqn == "layers.0.mlp.experts" and site.replaces == [site.fqn]
    layout = site.layout
    assert isinstance(layout, ExpertsLayout)
    assert (layout.experts, layout.hidden, layout.intermediate, layout.top_k) == (4, 32, inter, 2)
    assert (layout.gate_up, layout.down, layout.gated, layout.transposed) == ("gate_up_proj", "down_proj", True, False)
    assert (layout.act, layout.activation) == ("act_fn", "silu")
    assert site.settings == {"nblocks": 4, "rank": 1} and site.replacement.startswith("MonarchExperts(4 experts")
    assert 0 < site.params_after < site.params_before == 3 * 4 * 32 * inter
    # the JSON plan round-trips the layout; the table, diff and HTML name the replacement
    again = RewritePlan.from_dict(json.loads(plan.to_json()))
    assert json.loads(plan.to_json())["version"] == 2 and _experts_site(again) == site
    assert "MonarchExperts(4 experts, nblocks=4, rank=1)" in str(plan)
    node = plan.graph_diff().nodes[site.fqn]
    assert (node["change"], node["after_type"]) == ("replaced", "MonarchExperts")
    assert '<span class="type">MonarchExperts</span>' in plan_html(plan)


def plan_html(plan) -> str:
    from m2convert.passes.html import render_plan
    return render_plan(plan)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_experts_equal_the_original(family):
    # float64; the default grouped_mm experts take float32/bf16/fp16 only, batched_mm any float
    model = FAMILIES[family][0](experts_implementation="batched_mm").double()
    converted = m2.convert(model, SMALL, nblocks=1, sequence=False)      # one block: the exact projection
    experts, original = converted.layers[0].mlp.experts, model.layers[0].mlp.experts
    assert isinstance(experts, MonarchExperts)
    inputs = routing(4, 32, 2, original.down_proj)
    with torch.no_grad():
        assert torch.allclose(experts(*inputs), original(*inputs), rtol=1e-9, atol=1e-10)
        feed = _inputs(3)
        assert torch.allclose(converted(**feed).last_hidden_state, model(**feed).last_hidden_state,
                              rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_conversion_runs_padded_batches_and_keeps_the_router(family):
    model = FAMILIES[family][0]()
    plan = m2.plan(model, SMALL)
    converted = plan.apply()
    block, before = converted.layers[0].mlp, model.layers[0].mlp
    assert isinstance(block.experts, MonarchExperts) and block.experts.nblocks == 4
    assert type(block.gate) is type(before.gate) and torch.equal(block.gate.weight, before.gate.weight)
    with torch.no_grad():
        for batch in (1, 3):
            out = converted(**_inputs(batch)).last_hidden_state
            assert out.shape == (batch, 10, 32) and torch.isfinite(out).all()
    # fewer parameters, by exactly what the plan said
    count = sum(p.numel() for p in converted.parameters())
    assert count == plan.totals()["params_after"] < sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in block.experts.parameters()) < sum(p.numel() for p in before.experts.parameters())


def test_settings_overrides_and_filter_fn_reach_experts_sites():
    model = _mixtral()
    plan = m2.plan(model, m2.ConvertConfig(filter_order=16, overrides={r"\.experts$": {"nblocks": 2, "rank": 2}}))
    site = _experts_site(plan)
    assert site.settings == {"nblocks": 2, "rank": 2}
    experts = plan.apply().layers[0].mlp.experts
    assert (experts.nblocks, experts.rank, experts.up.nblocks) == (2, 2, 2)
    assert _experts_site(m2.plan(model, m2.ConvertConfig(filter_order=16, overrides={r"experts": None}))).status \
        == "exclude"
    keep = m2.ConvertConfig(filter_order=16, filter_fn=lambda module, path: not path.endswith("experts"))
    excluded = _experts_site(m2.plan(model, keep))
    assert excluded.status == "exclude" and "filter_fn" in excluded.reason


def test_generate_with_the_cache_equals_without():
    model = m2.convert(_mixtral(T.MixtralForCausalLM, layers=2), SMALL)
    assert isinstance(model.model.layers[1].mlp.experts, MonarchExperts)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompt = _inputs(2, 9)
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    prompt["attention_mask"][1, :3] = 0                    # left padding
    cached = model.generate(**prompt, use_cache=True, do_sample=False, max_new_tokens=8)
    recomputed = model.generate(**prompt, use_cache=False, do_sample=False, max_new_tokens=8)
    assert cached.shape == (2, 17) and torch.equal(cached, recomputed)


def test_save_and_load_are_bit_equal(tmp_path):
    converted = m2.convert(_mixtral(T.MixtralForCausalLM), SMALL)
    converted.save_pretrained(tmp_path / "own")
    m2.save_pretrained(converted, tmp_path / "m2")
    feed = _inputs(3)
    with torch.no_grad():
        expected = converted(**feed).logits
        for folder in ("own", "m2"):
            loaded = m2.from_pretrained(tmp_path / folder)
            assert isinstance(loaded.model.layers[0].mlp.experts, MonarchExperts)
            assert torch.equal(loaded(**feed).logits, expected), folder


def test_a_converted_model_plans_no_experts_site():
    converted = m2.convert(_mixtral(), SMALL)
    assert not [s for s in m2.plan(converted, SMALL).sites if s.pattern == "experts-mlp"]


class ToyExperts(nn.Module):
    """An experts module in the HF layout; ``plus_one`` computes (up + 1) * act(gate) instead."""

    def __init__(self, experts=4, hidden=16, inter=24, bias=False, plus_one=False):
        super().__init__()
        self.num_experts, self.plus_one = experts, plus_one
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden) / 4)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter) / 5)
        self.gate_up_proj_bias = nn.Parameter(torch.randn(experts, 2 * inter)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.randn(experts, hidden)) if bias else None
        self.act_fn = nn.GELU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            weight = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)                  # (T, 1)
            bias = None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[e]
            gate, up = nn.functional.linear(hidden_states, self.gate_up_proj[e], bias).chunk(2, dim=-1)
            h = (up + 1) * self.act_fn(gate) if self.plus_one else self.act_fn(gate) * up
            bias = None if self.down_proj_bias is None else self.down_proj_bias[e]
            out = out + nn.functional.linear(h, self.down_proj[e], bias) * weight
        return out


class ToyMoE(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.router = nn.Linear(16, 4, bias=False)
        self.experts = ToyExperts(**kwargs)

    def forward(self, x):                                                  # (B, N, 16)
        tokens = x.reshape(-1, x.shape[-1])
        weights, index = self.router(tokens).softmax(-1).topk(2, dim=-1)
        return self.experts(tokens, index, weights).reshape(x.shape)


def test_experts_with_biases_convert_exactly_at_full_rank():
    torch.manual_seed(0)
    model = ToyMoE(bias=True).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    plan = m2.plan(model, m2.ConvertConfig(nblocks=1), example_inputs=(x,))
    layout = _experts_site(plan).layout
    assert (layout.gate_up_bias, layout.down_bias, layout.act, layout.activation) == \
        ("gate_up_proj_bias", "down_proj_bias", "act_fn", "gelu")
    converted = plan.apply()
    assert converted.experts.up.bias is not None and converted.experts.down.bias is not None
    with torch.no_grad():
        assert torch.allclose(converted(x), model(x), rtol=1e-9, atol=1e-10)
    ref = dense_experts(*routing(4, 16, 2, x), model.experts.gate_up_proj, model.experts.down_proj, nn.GELU(),
                        model.experts.gate_up_proj_bias, model.experts.down_proj_bias)
    assert torch.allclose(converted.experts(*routing(4, 16, 2, x)), ref, atol=1e-10)


def test_experts_computing_another_formula_are_skipped_with_the_reason():
    torch.manual_seed(0)
    model = ToyMoE(plus_one=True)
    x = torch.randn(2, 5, 16)
    plan = m2.plan(model, example_inputs=(x,))
    site = _experts_site(plan)
    assert site.status == "skip" and site.layout is None
    assert "['down_proj', 'gate_up_proj']" in site.reason and "differs from the experts formula" in site.reason
    error = float(site.reason.split("relative error ")[1].split(" ")[0])
    assert error > 0.01
    with torch.no_grad():
        assert torch.equal(plan.apply()(x), model(x))                     # left as it was
    strict = m2.ConvertConfig(strict=True, overrides={r"^experts$": None})
    assert _experts_site(m2.plan(model, strict, example_inputs=(x,))).status == "exclude"
