"""The window branch: exact softmax attention over the last w tokens beside a mixer's long convolution
(ConvertConfig.softmax_window, M2SequenceMixer(window=w)), seeded from the attention it replaces."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import m2convert as m2
from m2convert.errors import ConfigError
from m2convert.layers import M2SequenceMixer
from m2convert.layers.decode import decode_step, prefill, recurrent_prefill, recurrent_step
from m2convert.layers.window import WindowAttention

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(vocab_size=96, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _dense_window(attn: WindowAttention, x, keep=None, rope=None):
    """The same attention with an explicit N x N band mask: the reference the blocks must equal."""
    q, k, v = attn._qkv(x, rope)
    k, v = attn._repeat(k), attn._repeat(v)
    n = x.shape[1]
    offset = torch.arange(n)[:, None] - torch.arange(n)[None]
    back, ahead = attn.reach
    allowed = (offset <= back) & (offset >= -ahead)
    if keep is not None:
        allowed = allowed & keep.bool()[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * attn.scale).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, -1).nan_to_num(0) @ v).transpose(1, 2).reshape(x.shape[0], n, -1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [2, 3, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 29])
def test_blocks_equal_the_banded_attention(causal, window, n):
    torch.manual_seed(n)
    attn = WindowAttention(16, window, heads=4, kv_heads=2, head_dim=4, causal=causal)
    x = torch.randn(2, n, 16)
    keep = torch.ones(2, n)
    keep[1, : n // 3] = 0
    for mask in (None, keep):
        torch.testing.assert_close(attn(x, mask), _dense_window(attn, x, mask), atol=1e-5, rtol=1e-4)
        q, k, v = attn._qkv(x, None)                                 # the form traced graphs take
        banded = attn.banded(q, attn._repeat(k), attn._repeat(v), mask).transpose(1, 2).reshape(2, n, -1)
        torch.testing.assert_close(banded, _dense_window(attn, x, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_a_windowed_mixer_sees_its_window_through_the_branch(mode):
    """Fast (no grad) and reference paths agree, and the branch changes the output."""
    torch.manual_seed(0)
    mixer = M2SequenceMixer(32, mode=mode, filter_order=16, window=4, window_heads=(4, 2, 8)).eval()
    x = torch.randn(2, 23, 32)
    keep = torch.ones(2, 23)
    keep[1, :5] = 0
    with torch.no_grad():
        fast = mixer(x, keep)
        plain = M2SequenceMixer(32, mode=mode, filter_order=16).eval()
        plain.load_state_dict({k: v for k, v in mixer.state_dict().items() if "window_attention" not in k})
        without = plain(x, keep)
    torch.testing.assert_close(fast, mixer(x, keep), atol=1e-5, rtol=1e-4)
    assert float((fast - without).abs().max()) > 1e-3


@pytest.mark.parametrize("prompt", [2, 5, 11])
def test_decoding_keeps_a_ring_of_the_window(prompt):
    torch.manual_seed(0)
    mixer = M2SequenceMixer(32, mode="causal", filter_order=16, window=5, window_heads=(4, 1, 8)).eval()
    x = torch.randn(2, prompt + 14, 32)
    keep = torch.ones(2, prompt)
    keep[1, :1] = 0                                              # left padding in the prompt
    with torch.no_grad():
        full = mixer(x, torch.cat([keep, torch.ones(2, 14)], 1))
        _, state = prefill(mixer, x[:, :prompt], keep)
        steps = torch.stack([decode_step(mixer, x[:, t], state) for t in range(prompt, x.shape[1])], 1)
        recurrent = m2.to_recurrent(mixer, state_size=8, horizon=256).model
        full_r = recurrent(x, torch.cat([keep, torch.ones(2, 14)], 1))
        _, rstate = recurrent_prefill(recurrent, x[:, :prompt], keep)
        rsteps = torch.stack([recurrent_step(recurrent, x[:, t], rstate) for t in range(prompt, x.shape[1])], 1)
    torch.testing.assert_close(steps, full[:, prompt:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rsteps, full_r[:, prompt:], atol=1e-4, rtol=1e-4)
    assert tuple(state.window.keys.shape) == (2, 1, 5, 8)        # w keys of the one KV head, never more


def _gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(**TINY, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def _llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(**TINY, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    return T.LlamaForCausalLM(cfg).eval()


WINDOW = m2.ConvertConfig(softmax_window=6, filter_order=16, dimension=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_branch_starts_as_the_original_attention_within_its_window(family):
    """Seeded from the layer's Q, K, V (rotary included): over N <= w tokens it is the original attention."""
    model = {"gpt2": _gpt2, "llama": _llama}[family]()
    plan = m2.plan(model, WINDOW)
    site = next(s for s in plan.sites if s.kind == "sequence")
    assert "softmax window 6" in site.replacement
    converted = plan.apply()
    seen = {}
    original = model.get_submodule(site.fqn)
    hooks = [original.register_forward_pre_hook(lambda m, a, k: seen.update(attn=(a, k)), with_kwargs=True),
             model.get_submodule(site.roles["o"].path).register_forward_pre_hook(lambda m, a: seen.update(o=a[0]))]
    ids = torch.randint(1, 96, (2, 6))
    with torch.no_grad():
        model(input_ids=ids)
        for h in hooks:
            h.remove()
        adapter = converted.get_submodule(site.fqn)
        x, _ = adapter._read_inputs(*seen["attn"])
        rope = adapter._argument("position_embeddings", *seen["attn"])
        ours = adapter.mixer.window_attention(x, None, rope)
    torch.testing.assert_close(ours, seen["o"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_generate_equals_uncached_and_the_state_stops_growing(family):
    converted = m2.convert({"gpt2": _gpt2, "llama": _llama}[family](), WINDOW, progress=False)
    ids = torch.randint(1, 96, (2, 9))
    cached = converted.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(cached, converted.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False))
    report = m2.to_recurrent(converted, state_size=8)
    recurrent = report.model

    def state_bytes(tokens):
        out = recurrent.generate(torch.randint(1, 96, (1, tokens)), max_new_tokens=1, do_sample=False,
                                 return_dict_in_generate=True)
        held = []
        for layer in out.past_key_values.layers:
            layer.state.map_batch(lambda t: held.append(t) or t)
        return sum(t.numel() * t.element_size() for t in held)
    assert state_bytes(4) == state_bytes(40)                      # w keys and values plus the modes
    assert report.state_bytes == state_bytes(40)                  # as to_recurrent reports it
    branch = sum(m.window_attention.state_bytes() for m in recurrent.modules() if isinstance(m, M2SequenceMixer))
    assert branch == 2 * (2 * (2 if family == "llama" else 4) * 8 * 6 * 4 + 6)      # 2 layers: K, V and flags


def test_an_encoder_branch_sees_both_sides_and_ignores_padding():
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=64)).eval()
    converted = m2.convert(bert, m2.ConvertConfig(softmax_window=4, filter_order=16), progress=False)
    ids = torch.randint(1, 96, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1).long()
    with torch.no_grad():
        alone = converted(input_ids=ids).last_hidden_state
        batched = converted(input_ids=padded, attention_mask=mask).last_hidden_state[:, :10]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    assert all(not m.window_attention.causal for m in converted.modules() if isinstance(m, M2SequenceMixer))


def test_save_load_lower_export_and_head_hybrids_keep_the_branch(serves_everywhere):
    plan = m2.plan(_llama(), m2.ConvertConfig(softmax_window=4, keep_heads=0.25, filter_order=16))
    hybrid = plan.apply()
    adapters = [m for m in hybrid.modules() if hasattr(m, "kept") and hasattr(m, "mixer")]
    assert any(a.kept is not None for a in adapters) and all(a.mixer.window_attention for a in adapters)
    ids = torch.randint(1, 96, (2, 12))
    serves_everywhere(hybrid, ids)
    cached = hybrid.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(cached, hybrid.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))


def test_the_decode_step_exporter_refuses_the_window_clearly(tmp_path):
    recurrent = m2.to_recurrent(m2.convert(_gpt2(), WINDOW, progress=False), state_size=8).model
    with pytest.raises(ConfigError, match="softmax_window.*m2.export instead"):
        m2.export_decode_step(recurrent, tmp_path / "step.pt2")


def test_an_encoder_window_must_reach_a_side():
    bert = T.BertModel(T.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=64)).eval()
    with pytest.raises(ConfigError, match="softmax_window=1.*encoder.*2 or more"):
        m2.plan(bert, m2.ConvertConfig(softmax_window=1, filter_order=16))


def test_the_command_line_adds_the_branch(tmp_path, capsys):
    from m2convert.cli import main
    _gpt2().save_pretrained(tmp_path / "gpt2")
    assert main(["plan", str(tmp_path / "gpt2"), "--softmax-window", "8", "--json"]) == 0
    assert "softmax window 8" in capsys.readouterr().out
