"""Attention whose heads x head_dim is not the model width H (Qwen3-0.6B: 16 x 128 over H = 1024; Gemma 4's
global layers): the mixer mixes D = heads x head_dim channels between in_proj (H -> 3D) and out_proj (D -> H)."""

from __future__ import annotations

import pytest
import torch
import transformers

import m2convert as m2
from m2convert.errors import ConfigError, ShapeError
from m2convert.layers import M2SequenceMixer
from m2convert.layers.decode import decode_step, prefill, recurrent_prefill, recurrent_step
from m2convert.layers.recurrent import state_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(head_dim: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=head_dim, intermediate_size=64,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("head_dim", [16, 4], ids=["wider", "narrower"])
def test_the_mixer_takes_the_heads_projections_as_they_are(head_dim):
    model = _llama(head_dim)
    plan = m2.plan(model, m2.ConvertConfig(filter_order=16, dimension=False))
    site = plan.sites[0]
    assert site.status == "convert" and site.layout.inner == 4 * head_dim and site.layout.width == 4 * head_dim
    mixer = plan.apply().model.layers[0].self_attn.mixer
    attn = model.model.layers[0].self_attn
    d = 4 * head_dim
    assert (mixer.d_model, mixer.d_inner, mixer.residual_filter) == (32, d, None)
    k = attn.k_proj.weight.view(2, head_dim, 32).repeat_interleave(2, dim=0).reshape(d, 32)   # GQA: 2 per KV head
    v = attn.v_proj.weight.view(2, head_dim, 32).repeat_interleave(2, dim=0).reshape(d, 32)
    assert torch.equal(mixer.in_proj.weight, torch.cat([attn.q_proj.weight, k, v]))
    assert torch.equal(mixer.out_proj.weight, attn.o_proj.weight)                             # (H, D)


def test_wide_mixer_decodes_as_its_forward():
    mixer = M2SequenceMixer(16, mode="causal", d_inner=40, residual_conv=False, filter_order=8).double().eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        _, state = prefill(mixer, x[:, :5])
        steps = [decode_step(mixer, x[:, t:t + 1], state) for t in range(5, 9)]
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], rtol=1e-9, atol=1e-9)
        rec = m2.to_recurrent(mixer, state_size=8, horizon=256).model
        whole = rec(x)
        _, state = recurrent_prefill(rec, x[:, :5])
        steps = [recurrent_step(rec, x[:, t:t + 1], state) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), whole[:, 5:], rtol=1e-9, atol=1e-9)
    assert state.modes.shape == (2, 40, 8)
    per_sequence = (state.nbytes() - state.length.element_size()) / 2                        # batch of 2
    assert per_sequence == state_bytes(rec, 8, torch.float64)


def test_the_fast_path_equals_the_reference_for_a_wide_mixer():
    mixer = M2SequenceMixer(16, mode="bidirectional", d_inner=24, residual_conv=False, filter_order=8).eval()
    x = torch.randn(2, 33, 16)
    with torch.no_grad():
        fast = mixer(x)
    mixer.train()                                           # training runs the reference path
    torch.testing.assert_close(fast, mixer(x), rtol=1e-4, atol=1e-5)


def test_a_residual_convolution_needs_equal_widths():
    with pytest.raises(ConfigError, match="residual_conv=False"):
        M2SequenceMixer(16, d_inner=32)
    mixer = M2SequenceMixer(16, d_inner=32, residual_conv=False)
    with pytest.raises(ShapeError, match=r"expected \(32, 16\)"):
        mixer.seed_projections(*[(torch.zeros(16, 16), None)] * 4)


def test_a_wide_llama_generates_with_its_cache_and_recurrent():
    converted = m2.convert(_llama(16), m2.ConvertConfig(filter_order=16))
    converted.generation_config.eos_token_id = None
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    for model in (converted, m2.to_recurrent(converted, state_size=8, horizon=256).model):
        cached = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(cached, model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))
