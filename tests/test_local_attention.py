"""Sliding-window (local) attention converts to mixers whose filters hold only the window's offsets
(ConvertConfig.local_attention), so every token still sees exactly its window."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import m2convert as m2
from m2convert.layers import M2SequenceMixer, padding_mask

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, intermediate_size=64, bos_token_id=0,
            eos_token_id=0, pad_token_id=0, attn_implementation="eager")
CONVERT = m2.ConvertConfig(local_attention="convert", filter_order=16)


def _mistral(window: int, layers: int = 1, lm: bool = False):
    torch.manual_seed(0)
    config = T.MistralConfig(**TEXT, num_hidden_layers=layers, num_key_value_heads=2, sliding_window=window)
    return (T.MistralForCausalLM if lm else T.MistralModel)(config).eval()


def _attention_sites(plan):
    return [s for s in plan.sites if s.kind == "sequence"]


def _reach(model, n: int, changed: int) -> torch.Tensor:
    """Per position, how far the output moves when the first ``changed`` tokens change."""
    ids = torch.randint(1, 96, (1, n))
    other = ids.clone()
    other[0, :changed] = (other[0, :changed] + 7) % 95 + 1
    with torch.no_grad():
        return (model(input_ids=ids).last_hidden_state - model(input_ids=other).last_hidden_state).abs().amax(-1)[0]


def test_narrow_windows_stay_attention_by_default_and_convert_when_asked():
    model = _mistral(8)
    kept = _attention_sites(m2.plan(model))
    assert [s.status for s in kept] == ["exclude"] and "kept, already cheap and exact" in kept[0].reason
    assert "each query sees 8 tokens" in kept[0].reason
    (site,) = _attention_sites(m2.plan(model, CONVERT))
    assert site.status == "convert" and site.layout.window == 8 and site.settings["filter_window"] == 6
    assert "causal, window 8" in m2.plan(model, CONVERT).table()
    assert _attention_sites(m2.plan(model, m2.ConvertConfig(local_attention="keep")))[0].status == "exclude"


def test_windows_wider_than_the_capture_convert_by_default_with_the_configs_window():
    (site,) = _attention_sites(m2.plan(_mistral(256)))          # the capture is shorter than the window
    assert site.status == "convert" and site.layout.window == 256 and site.settings["filter_window"] == 254
    assert "local_attention='keep'" in _attention_sites(m2.plan(_mistral(256), m2.ConvertConfig(local_attention="keep")))[0].reason


def test_a_window_narrower_than_the_short_convolution_is_kept():
    (site,) = _attention_sites(m2.plan(_mistral(2), CONVERT))
    assert site.status == "exclude" and "short convolution" in site.reason


def test_a_converted_local_layer_sees_exactly_its_window():
    converted = m2.convert(_mistral(8), CONVERT, progress=False)
    reach = _reach(converted, 48, 10)                         # tokens 0..9 change
    assert bool((reach[:10] > 1e-3).all())                    # they move their own outputs
    # Token 9 reaches 7 positions ahead (the filters' 6 offsets and the short conv's 2); past that, rounding.
    assert float(reach[9 + 8:].max()) < 1e-5 and float(reach[12:15].max()) > 1e-3


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_a_windowed_mixer_is_local_on_both_sides(mode):
    torch.manual_seed(0)
    mixer = M2SequenceMixer(16, mode=mode, filter_order=16, filter_window=5).eval()
    with torch.no_grad():
        mixer.short_conv.weight.normal_()                    # a trained short conv reaches 2 tokens back
        x = torch.randn(1, 40, 16)
        moved = x.clone()
        moved[0, 20] += 1
        reach = (mixer(x) - mixer(moved)).abs().amax(-1)[0]   # (40,)
    back = 5 - 1 + 2 if mode == "causal" else 5 - 1 + 2     # positions after token 20 it reaches
    ahead = 0 if mode == "causal" else 5 - 1                  # positions before it
    inside = torch.zeros(40, dtype=torch.bool)
    inside[20 - ahead:20 + back + 1] = True
    assert float(reach[~inside].max()) < 1e-5 and float(reach[inside].min()) > 0


@pytest.mark.parametrize("prompt", [3, 6, 11])
@pytest.mark.parametrize("residual", [True, False])
def test_a_windowed_mixer_decodes_from_a_ring_of_its_window(prompt, residual):
    """Prompts shorter than, equal to and longer than the window, then steps well past it: each step's
    output equals the full forward's at that position."""
    from m2convert.layers.decode import decode_step, prefill
    torch.manual_seed(0)
    mixer = M2SequenceMixer(16, mode="causal", filter_order=16, filter_window=6, residual_conv=residual).eval()
    x = torch.randn(2, prompt + 17, 16)
    with torch.no_grad():
        mixer.short_conv.weight.normal_()
        full = mixer(x)
        _, state = prefill(mixer, x[:, :prompt])
        steps = torch.stack([decode_step(mixer, x[:, t], state) for t in range(prompt, x.shape[1])], dim=1)
    assert state.w.shape[-1] == 6                              # the state never grows past the window
    torch.testing.assert_close(steps, full[:, prompt:], atol=1e-5, rtol=1e-4)


def test_local_decoder_generates_the_same_cached_uncached_and_recurrent():
    converted = m2.convert(_mistral(8, layers=2, lm=True), CONVERT, progress=False)
    ids = torch.randint(1, 96, (2, 12))
    cached = converted.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True)
    assert torch.equal(cached, converted.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False))
    recurrent = m2.to_recurrent(converted, state_size=8, horizon=512).model
    assert torch.equal(recurrent.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True),
                       recurrent.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False))


def test_the_window_survives_save_and_load(tmp_path):
    converted = m2.convert(_mistral(8), CONVERT, progress=False)
    loaded = m2.from_pretrained(m2.save_pretrained(converted, tmp_path / "m"))
    assert loaded.layers[0].self_attn.mixer.filter.window == 6
    ids = torch.randint(1, 96, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, converted(input_ids=ids).last_hidden_state)


def test_modernbert_local_layers_convert_and_ignore_padding():
    torch.manual_seed(0)
    config = T.ModernBertConfig(**{**TEXT, "num_hidden_layers": 2}, cls_token_id=0, sep_token_id=0,
                                local_attention=8, global_attn_every_n_layers=2)
    model = T.ModernBertModel(config).eval()
    sites = _attention_sites(m2.plan(model, CONVERT))
    assert [s.layout.window for s in sites] == [None, 5] and all(s.status == "convert" for s in sites)
    converted = m2.convert(model, CONVERT, progress=False)
    ids = torch.randint(1, 96, (1, 24))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 24), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        alone = converted(input_ids=ids).last_hidden_state
        batched = converted(input_ids=padded, attention_mask=mask).last_hidden_state[:, :24]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_padding_is_read_from_a_sliding_window_mask():
    n, window, pad = 12, 4, 3
    pos = torch.arange(n)
    band = (pos[:, None] - pos[None, :] >= 0) & (pos[:, None] - pos[None, :] < window)
    real = pos >= pad                                                     # left padding
    mask = (band & real[None, :])[None, None]                             # (1, 1, N, N): keys of real tokens
    assert torch.equal(padding_mask(mask, 1, n)[0], real)


def test_the_command_line_converts_local_attention_when_asked(tmp_path, capsys):
    from m2convert.cli import main

    folder = tmp_path / "mistral"
    _mistral(8).save_pretrained(folder)
    assert main(["plan", str(folder), "--json"]) == 0
    default = capsys.readouterr().out
    assert main(["plan", str(folder), "--json", "--local-attention", "convert"]) == 0
    converted = capsys.readouterr().out
    assert '"filter_window": 6' in converted and '"filter_window"' not in default


def test_a_local_decoder_decodes_from_a_fixed_window_of_inputs():
    from m2convert.layers.recurrent import window_state_bytes

    converted = m2.convert(_mistral(8, layers=2, lm=True), CONVERT, progress=False)
    ids = torch.randint(1, 96, (2, 3))                        # a prompt shorter than the window, then past it
    out = converted.generate(ids, max_new_tokens=30, do_sample=False, use_cache=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, converted.generate(ids, max_new_tokens=30, do_sample=False, use_cache=False))
    states = [layer.state for layer in out.past_key_values.layers]
    assert all(s.w.shape[-1] == 6 and s.length == 32 for s in states)     # 6 inputs held after 32 tokens
    report = m2.to_recurrent(converted, state_size=8, horizon=512)
    mixer = converted.model.layers[0].self_attn.mixer
    assert [f.status for f in report.layers] == ["window", "window"]
    assert report.layers[0].state_bytes == window_state_bytes(mixer) < 2 * 32 * 8 * 2 * 4
    with pytest.raises(m2.M2Error, match="decodes exactly from its last 6 inputs"):
        m2.export_decode_step(report.model, "step.pt2")


def test_the_plan_prices_local_attention_by_its_window():
    narrow, wide = (_attention_sites(m2.plan(_mistral(w), CONVERT))[0] for w in (8, 4096))
    n = 4096
    from m2convert.layers.cost import B, N
    before = {w: s.flops_before.subs({B: 1, N: n}) for w, s in ((8, narrow), (4096, wide))}
    assert before[8] < before[4096] / 50                        # 8 keys a query against 4096
    assert narrow.flops_after.subs({B: 1, N: n}) > before[8]    # a mixer costs more than a window of 8


@pytest.mark.parametrize("chunk", [4, 8192])
def test_chunked_attention_is_named_and_kept(chunk):
    torch.manual_seed(0)
    config = T.Llama4TextConfig(**{**TEXT, "num_hidden_layers": 2}, intermediate_size_mlp=64, num_key_value_heads=2,
                                head_dim=8, attention_chunk_size=chunk, num_local_experts=2, interleave_moe_layer_step=2,
                                layer_types=["chunked_attention", "full_attention"])
    sites = _attention_sites(m2.plan(T.Llama4TextModel(config).eval(), CONVERT))
    where = "attention mask" if chunk == 4 else "model config"           # a chunk the capture spans shows in the mask
    assert [s.status for s in sites] == ["skip", "convert"]
    assert sites[0].reason.startswith(f"chunked attention (chunks of {chunk} tokens in the {where}")


def test_a_local_model_lowers_and_exports(tmp_path):
    converted = m2.convert(_mistral(8), CONVERT, progress=False)
    ids = torch.randint(1, 96, (1, 40))
    with torch.no_grad():
        want = converted(input_ids=ids).last_hidden_state
        lowered = m2.lower(converted, example_inputs={"input_ids": ids})
        got = lowered(input_ids=ids)
    assert torch.allclose(got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0], want, atol=1e-5)
    program = torch.export.load(str(m2.export(converted, {"input_ids": ids}, tmp_path / "local.pt2"))).module()
    assert torch.allclose(program(input_ids=ids)[0], want, atol=1e-5)
