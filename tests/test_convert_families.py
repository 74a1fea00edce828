"""Every supported family converts: sites counted, forward + backward, outputs typed and shaped as before,
original untouched, parameter drop as planned; plus seeding, padding, causality and failure atomicity."""

from __future__ import annotations

import json

import pytest
import torch

import m2convert as m2
from m2convert.errors import ConversionError
from m2convert.layers.base import M2Block

pytestmark = pytest.mark.usefixtures("one_thread")      # tiny models; threads only contend

CASES = [(f, a) for f in ("bert", "gpt2", "llama") for a in ("sdpa", "eager")]
EXPECT = {  # adapter, MLP pattern, causal
    "bert": ("M2PostNormAttention", "gelu-mlp", False),
    "gpt2": ("M2Attention", "gelu-mlp", True),
    "llama": ("M2Attention", "gated-mlp", True),
}
SMALL = m2.ConvertConfig(filter_order=16)


def _params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _tensors(output) -> dict:
    return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("family,attn", CASES)
def test_family_converts_and_trains(tiny_model, tiny_inputs, family, attn):
    model = tiny_model(family, attn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = m2.plan(model, SMALL)
    adapter, mlp, causal = EXPECT[family]
    seq = [s for s in plan.converted if s.kind == "sequence"]
    dim = [s for s in plan.converted if s.kind == "dimension"]
    assert len(seq) == 2 and len(dim) == 2 and not plan.skipped
    assert {s.pattern for s in seq} == {f"{attn}-attention"} and {s.pattern for s in dim} == {mlp}
    assert all(s.causal is causal and s.layout.adapter == adapter for s in seq)

    converted = plan.apply()
    assert type(converted) is type(model)
    for site in plan.converted:
        for path in site.replaces:
            assert isinstance(converted.get_submodule(path), M2Block), path
    assert type(converted.get_submodule(seq[0].fqn)).__name__ == adapter

    inputs = tiny_inputs()
    with torch.no_grad():
        ref = model(**inputs)
    out = converted(**inputs)
    assert type(out) is type(ref)
    assert {k: v.shape for k, v in _tensors(out).items()} == {k: v.shape for k, v in _tensors(ref).items()}
    first = next(iter(_tensors(out).values()))
    first.float().pow(2).mean().backward()
    new_params = [p for s in plan.converted for path in s.replaces
                  for p in converted.get_submodule(path).parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in new_params)

    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _params(model) - _params(converted) == sum(s.params_before - s.params_after for s in plan.converted)
    assert plan.totals()["params_after"] == _params(converted)
    assert json.loads(json.dumps(converted.m2convert_plan)) == plan.to_dict()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_full_rank_monarch_keeps_outputs(tiny_model, tiny_inputs, family):
    # nblocks=1 makes each Monarch factor full rank, so the projected MLP equals the dense one:
    # the MLP pass and its weight mapping (Linear, GPT-2 Conv1D, gated roles) are checked numerically.
    model = tiny_model(family)
    converted = m2.convert(model, sequence=False, nblocks=1)
    inputs = tiny_inputs()
    with torch.no_grad():
        ref, out = model(**inputs), converted(**inputs)
    key = "last_hidden_state" if family == "bert" else "logits"
    torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)


def test_attention_seeding_maps_qkvo(tiny_model):
    llama = tiny_model("llama", layers=1)
    attn = llama.model.layers[0].self_attn
    mixer = m2.convert(llama, SMALL).model.layers[0].self_attn.mixer
    w = mixer.in_proj.weight                                                   # (3H, H): x1 | x2 | v
    k = attn.k_proj.weight.reshape(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # GQA: 2 -> 4 heads
    v = attn.v_proj.weight.reshape(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    assert torch.equal(w[:32], attn.q_proj.weight) and torch.equal(w[32:64], k) and torch.equal(w[64:], v)
    assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)

    gpt2 = tiny_model("gpt2", layers=1)
    block = m2.convert(gpt2, SMALL).transformer.h[0].attn
    assert torch.equal(block.mixer.in_proj.weight, gpt2.transformer.h[0].attn.c_attn.weight.t())  # Conv1D (in, out)
    assert torch.equal(block.mixer.out_proj.weight, gpt2.transformer.h[0].attn.c_proj.weight.t())

    bert = tiny_model("bert", layers=1)
    new = m2.convert(bert, SMALL).encoder.layer[0].attention
    old = bert.encoder.layer[0].attention
    assert torch.equal(new.norm.weight, old.output.LayerNorm.weight) and new.norm.eps == old.output.LayerNorm.eps
    assert torch.equal(new.mixer.out_proj.weight, old.output.dense.weight)


def test_interleaved_fused_qkv_is_split_per_head():
    # HF GPT-NeoX packs its fused projection per head: rows [3d h, 3d h + d) are head h's Q, then K, V.
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64)).eval()
    plan = m2.plan(model, SMALL)
    assert [(s.kind, s.status) for s in plan.sites] == [("sequence", "convert"), ("dimension", "convert")]
    fused = model.gpt_neox.layers[0].attention.query_key_value.weight.reshape(4, 3, 8, 32)   # (heads, qkv, d, H)
    mixer = plan.apply().gpt_neox.layers[0].attention.mixer
    assert torch.equal(mixer.in_proj.weight, fused.transpose(0, 1).reshape(96, 32))            # x1 | x2 | v


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_padding_does_not_leak(tiny_model, attn):
    converted = m2.convert(tiny_model("bert", attn), SMALL)
    ids = torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        alone = converted(input_ids=ids).last_hidden_state
        batched = converted(input_ids=padded, attention_mask=mask).last_hidden_state[:, :6]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["causal", "causal-monarch"])
def test_decoder_stays_causal_and_generates(tiny_model, mode):
    converted = m2.convert(tiny_model("gpt2"), SMALL, causal_mode=mode)
    assert {m.mixer.mode for m in converted.modules() if hasattr(m, "mixer")} == {mode}
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 96
    with torch.no_grad():
        a, b = converted(input_ids=ids).logits, converted(input_ids=changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-5)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3
    generated = converted.generate(ids, max_new_tokens=3, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(3):                                    # greedy by recomputing the whole sequence
            seq = torch.cat([seq, converted(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_inplace_and_failed_apply_leave_no_half_conversion(tiny_model, monkeypatch):
    model = tiny_model("bert")
    plan = m2.plan(model, SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import m2convert.passes.apply as apply_mod

    real, calls = apply_mod.build_replacements, []

    def flaky(site, target, seed=True, device=None):
        calls.append(site.fqn)
        if len(calls) == 3:
            raise ValueError("simulated failure")
        return real(site, target, seed=seed, device=device)

    monkeypatch.setattr(apply_mod, "build_replacements", flaky)
    with pytest.raises(ConversionError, match="input model is unchanged"):
        plan.apply(inplace=True)
    assert not any(isinstance(m, M2Block) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    monkeypatch.setattr(apply_mod, "build_replacements", real)
    assert plan.apply(inplace=True) is model
    assert isinstance(model.encoder.layer[0].attention, M2Block)


@pytest.mark.slow
def test_minilm_converts_and_trains(minilm, minilm_plan):
    model, tokenizer = minilm
    plan = minilm_plan
    assert [s.kind for s in plan.converted].count("sequence") == 6
    assert [s.kind for s in plan.converted].count("dimension") == 6
    assert all(s.pattern == "sdpa-attention" and s.causal is False for s in plan.converted if s.kind == "sequence")
    converted = plan.apply()
    batch = tokenizer(["a converted encoder", "padding should not matter here at all"], return_tensors="pt",
                      padding=True)
    out = converted(**batch)
    assert out.last_hidden_state.shape == model(**batch).last_hidden_state.shape
    out.last_hidden_state.pow(2).mean().backward()
    assert converted.encoder.layer[0].attention.mixer.in_proj.weight.grad is not None
    assert _params(model) - _params(converted) == sum(s.params_before - s.params_after for s in plan.converted)
