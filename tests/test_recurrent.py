"""Recurrent decoding: modal fits of causal filters, fixed-size states, and generate() with them."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch import nn

import m2convert as m2
import m2convert.layers.cache as generation
from m2convert.errors import ConfigError
from m2convert.layers.decode import decode_step, prefill, recurrent_prefill, recurrent_step
from m2convert.layers.modal import fit_modal, modal_taps
from m2convert.layers.recurrent import RecurrentFilter, recurrent_layout, restore_recurrent_layout, state_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = m2.ConvertConfig(filter_order=16)


def _modes(channels, state_size, seed):
    """Random stable poles (radius 0.6..0.99, angle 0..pi) and residues, complex128 (C, S)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(channels, state_size, generator=gen, dtype=torch.float64)
    lam = torch.polar(rand(0.6, 0.99), rand(0.0, torch.pi))
    residue = torch.complex(rand(-1, 1), rand(-1, 1))
    return lam, residue, torch.randn(channels, generator=gen, dtype=torch.float64)


def _mixer(d_model=24, residual=True, mode="causal"):
    torch.manual_seed(0)
    m = m2.M2SequenceMixer(d_model, mode=mode, residual_conv=residual).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@functools.cache
def _converted():
    """A converted tiny GPT-2 with room for a prompt plus 64 new tokens (tests copy it before changing it)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), SMALL)
    converted.generation_config.eos_token_id = None       # always generate every requested token
    converted.generation_config.pad_token_id = 0
    return converted


@functools.cache
def _recurrent():
    """:func:`_converted` made recurrent with 8 modes per channel (tests copy it before changing it)."""
    return m2.to_recurrent(_converted(), state_size=8, horizon=1024)


def _prompt(length=11):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 96, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                       # left padding, as batched generation uses
    return {"input_ids": ids, "attention_mask": mask}


def test_fit_recovers_a_sum_of_exponentials():
    lam, residue, h0 = _modes(8, 16, seed=0)
    taps = modal_taps(lam, residue, h0, 2048)                                   # (8, 2048)
    fit = fit_modal(taps, state_size=16)
    assert fit.error.max() < 1e-8
    refit = modal_taps(fit.lam, fit.residue, fit.h0, 2048)
    assert ((refit - taps).norm(dim=1) / taps.norm(dim=1)).max() < 1e-8
    assert (fit.lam.abs() < 1).all()


def test_fit_handles_real_poles_and_a_pure_delay():
    poles = torch.tensor([[0.95, -0.9, 0.3 + 0.5j]], dtype=torch.complex128)
    residues = torch.tensor([[1.0, 0.5, 1 - 1j]], dtype=torch.complex128)
    real = modal_taps(poles, residues, torch.ones(1, dtype=torch.float64), 4096)
    delay = torch.zeros(2, 4096, dtype=torch.float64)
    delay[0, 1] = 1.0                                     # y_t = w_{t-1}: a pole at 0
    fit = fit_modal(torch.cat([real, delay]), state_size=3)
    assert fit.error.max() < 1e-9
    assert fit.error[2] == 0                              # an all-zero filter fits exactly, no NaN


def test_fit_error_decreases_with_state_size():
    errors = []
    for size in (1, 2, 4, 8):
        report = m2.to_recurrent(_converted(), state_size=size, horizon=1024)
        assert [layer.status for layer in report.layers] == ["recurrent"] * 2
        errors.append([e for layer in report.layers for e in (layer.filter_error, layer.residual_error)])
    for smaller, larger in zip(errors, errors[1:]):
        assert all(b < a for a, b in zip(smaller, larger)), errors
    assert max(errors[-1]) < 1e-4


def test_one_step_equals_the_direct_convolution():
    mixer = m2.to_recurrent(_mixer(), state_size=6, horizon=512).model
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    with torch.no_grad():
        _, state = recurrent_prefill(mixer, x[:, :29])
        _, direct = prefill(mixer, x[:, :29])             # O(N): a dot product with the fitted taps
        y = recurrent_step(mixer, x[:, 29:], state)
        torch.testing.assert_close(y, decode_step(mixer, x[:, 29:], direct), rtol=0, atol=1e-10)
        torch.testing.assert_close(y, mixer(x)[:, 29:], rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["causal", "causal-monarch"])
@pytest.mark.parametrize("residual", [True, False])
def test_steps_and_states_are_prefix_invariant(mode, residual):
    mixer = m2.to_recurrent(_mixer(residual=residual, mode=mode), state_size=4, horizon=512).model
    x = torch.randn(2, 300, 24, dtype=torch.float64)      # past one scan chunk of 128 tokens
    with torch.no_grad():
        full = mixer(x)
        torch.testing.assert_close(mixer(x[:, :17]), full[:, :17], rtol=1e-9, atol=1e-9)
        y, state = recurrent_prefill(mixer, x[:, :5])
        steps = [recurrent_step(mixer, x[:, t:t + 1], state) for t in range(5, 300)]
        torch.testing.assert_close(torch.cat([y, *steps], 1), full, rtol=1e-9, atol=1e-9)
        _, whole = recurrent_prefill(mixer, x)
    assert int(state.length) == int(whole.length) == 300
    torch.testing.assert_close(state.modes, whole.modes, rtol=1e-10, atol=1e-10)
    if residual:
        torch.testing.assert_close(state.res_modes, whole.res_modes, rtol=1e-10, atol=1e-10)


def test_left_padding_contributes_nothing():
    mixer = m2.to_recurrent(_mixer(), state_size=4, horizon=512).model
    seq = torch.randn(1, 9, 24, dtype=torch.float64)
    padded = torch.cat([torch.full((1, 3, 24), 5.0, dtype=torch.float64), seq[:, :6]], dim=1)
    with torch.no_grad():
        alone = mixer(seq)
        _, state = recurrent_prefill(mixer, padded, torch.tensor([[0, 0, 0] + [1] * 6]))
        outs = [recurrent_step(mixer, seq[:, t:t + 1], state) for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), alone[:, 6:9], rtol=1e-9, atol=1e-9)


def test_model_forward_equals_token_by_token_decoding():
    from transformers import DynamicCache

    model = copy.deepcopy(_recurrent().model).double()
    ids = _prompt()["input_ids"][:1]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits                                # (1, 11, vocab)
        cache = DynamicCache()
        steps = [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("options", [{"do_sample": False}, {"do_sample": False, "num_beams": 3},
                                     {"do_sample": True, "top_k": 0}], ids=["greedy", "beams", "sampling"])
def test_cached_generate_equals_uncached(options, monkeypatch):
    report = _recurrent()
    steps = []
    step = generation.recurrent_step
    monkeypatch.setattr(generation, "recurrent_step", lambda *a: steps.append(1) or step(*a))

    def run(use_cache):
        torch.manual_seed(7)
        return report.model.generate(**_prompt(), max_new_tokens=24, use_cache=use_cache, **options)

    cached = run(True)
    assert len(steps) == 23 * 2                           # every token after the prompt came from the states
    assert cached.shape == (2, 11 + 24)
    assert torch.equal(cached, run(False))


def test_a_left_padded_batch_decodes_each_prompt_as_alone():
    model = copy.deepcopy(_recurrent().model).double()
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 96, (n,), generator=gen) for n in (3, 9, 14)]
    ids = torch.stack([nn.functional.pad(p, (14 - len(p), 0)) for p in prompts])          # pad id 0 on the left
    mask = (ids != 0).long()
    mask[2] = 1
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        for i, p in enumerate(prompts):
            alone = model.generate(input_ids=p[None], max_new_tokens=20, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True)
            assert torch.equal(batched.sequences[i, 14:], alone.sequences[0, len(p):])
            torch.testing.assert_close(torch.stack([s[i] for s in batched.scores]), torch.cat(alone.scores),
                                       rtol=1e-9, atol=1e-9)


def test_state_bytes_do_not_grow_with_the_prompt():
    from transformers import DynamicCache

    report = _recurrent()
    sizes = []
    for length in (5, 60):
        cache = DynamicCache()
        with torch.no_grad():
            report.model(**_prompt(length), cache=cache, use_cache=True)
        sizes.append(sum(layer.state.nbytes() for layer in cache.layers))
    mixers = [m for m in report.model.modules() if isinstance(m, m2.M2SequenceMixer)]
    per_sequence = sum(state_bytes(m, 8) for m in mixers)
    assert report.state_bytes == per_sequence
    assert sizes == [2 * per_sequence + 8 * len(mixers)] * 2         # batch of 2, plus an int64 length each


def test_to_recurrent_copies_unless_inplace():
    mixer = _mixer()
    report = m2.to_recurrent(mixer, state_size=4, horizon=512)
    assert isinstance(report.model.filter, RecurrentFilter) and report.model is not mixer
    assert type(mixer.filter).__name__ == "ImplicitFilter"
    assert m2.to_recurrent(mixer, state_size=4, horizon=512, inplace=True).model is mixer
    assert isinstance(mixer.residual_filter, RecurrentFilter)


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="'bidirectional'"):
        m2.to_recurrent(m2.M2SequenceMixer(8, mode="bidirectional"))
    with pytest.raises(ConfigError, match="state_size=0"):
        m2.to_recurrent(_mixer(), state_size=0)
    with pytest.raises(ConfigError, match="horizon=100"):
        m2.to_recurrent(_mixer(), state_size=16, horizon=100)
    with pytest.raises(ConfigError, match="to_recurrent"):
        recurrent_prefill(_mixer(), torch.randn(1, 4, 24, dtype=torch.float64))


def test_compiled_forward_reuses_one_graph_for_every_new_token():
    model = copy.deepcopy(_recurrent().model)
    eager = model.generate(**_prompt(), max_new_tokens=64, do_sample=False)
    graphs = []
    model.forward = torch.compile(model.forward, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)
    compiled = model.generate(**_prompt(), max_new_tokens=64, do_sample=False)
    assert torch.equal(compiled, eager)
    assert len(graphs) == 2                               # the prompt's, and one step's for all 63 later tokens


def test_layout_and_weights_restore_the_recurrent_model_bit_equal():
    report = _recurrent()
    layout = json.loads(json.dumps(recurrent_layout(report.model)))
    assert layout == {f"transformer.h.{i}.attn.mixer": {"state_size": 8, "horizon": 1024} for i in range(2)}
    fresh = restore_recurrent_layout(copy.deepcopy(_converted()), layout)
    result = fresh.load_state_dict(report.model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    ids = _prompt()["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, report.model(ids).logits)
    filt = fresh.transformer.h[0].attn.mixer.filter
    assert torch.equal(filt.fit_error, report.model.transformer.h[0].attn.mixer.filter.fit_error)
    with pytest.raises(ConfigError, match="'transformer.h.0.attn'"):
        restore_recurrent_layout(fresh, {"transformer.h.0.attn": {"state_size": 8, "horizon": 1024}})


def test_a_bf16_decoder_converts_and_becomes_recurrent_in_bf16():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    converted = m2.convert(model, SMALL, inplace=True)
    report = m2.to_recurrent(converted, state_size=4, horizon=256, inplace=True)
    assert report.model is model and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 13)
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))
