"""Head-level hybrids: kept heads reproduce the original heads, cached decoding equals uncached, the cache
holds the kept heads' keys/values only, save/load and the recurrent form work."""

from __future__ import annotations

import pytest
import torch
import transformers

import m2convert as m2
from m2convert.layers.cache import M2CacheLayer

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(layers=2, attn="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(attn="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2, "gpt2-eager": lambda: _gpt2("eager"), "bert": _bert}


def _hybrid(model, groups: dict[int, list[int]]):
    """Convert every attention site; site i (in model order) keeps the KV groups groups[i]."""
    plan = m2.plan(model, m2.ConvertConfig(dimension=False, filter_order=16))
    attention = [s for s in plan.sites if s.kind == "sequence"]
    for i, kept in groups.items():
        attention[i].settings["kept_groups"] = kept
    return plan, attention, plan.apply()


def _record(module, name):
    """Forward pre-hook storing (args, kwargs) of each call under ``name``."""
    store = {}

    def hook(mod, args, kwargs):
        store[name] = (args, kwargs)
    return store, module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_kept_heads_reproduce_the_original_heads(family):
    model = MODELS[family]()
    plan, sites, hybrid = _hybrid(model, {0: [1]})
    site = sites[0]
    attn_in, h1 = _record(model.get_submodule(site.fqn), "attn")
    o_in, h2 = _record(model.get_submodule(site.roles["o"].path), "o")
    ids = torch.randint(1, 96, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0 if family != "bert" else 1
    mask[1, -2:] = 0 if family == "bert" else 1                      # right padding for the encoder
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h1.remove(), h2.remove()
    adapter = hybrid.get_submodule(site.fqn)
    kept = adapter.kept
    args, kwargs = attn_in["attn"]
    x, mask4 = adapter._read_inputs(args, kwargs)
    rope = adapter._argument("position_embeddings", args, kwargs)
    with torch.no_grad():
        ours = kept.attend(x, *kept.keys_values(x, rope), mask4, rope)          # (B, N, kept heads * d)
    theirs = o_in["o"][0][0][..., kept.channels]
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    assert kept.query_heads == ([2, 3] if family == "llama" else [1])           # GQA: a whole KV group


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generate_equals_uncached_and_keeps_only_kept_kv(family):
    model = MODELS[family]()
    _, sites, hybrid = _hybrid(model, {0: [0], 1: []})
    ids = torch.randint(1, 96, (2, 7))
    out = hybrid.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    again = hybrid.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, again)
    layer0 = out.past_key_values.layers[0]
    assert isinstance(layer0, M2CacheLayer) and layer0.kv is not None
    keys = layer0.kv[0]
    kept = hybrid.get_submodule(sites[0].fqn).kept
    assert tuple(keys.shape) == (2, len(kept.kept_groups), 7 + 6 - 1, kept.head_dim)
    assert out.past_key_values.layers[1].kv is None                               # a pure mixer layer


def test_recurrent_state_is_the_kept_kv_plus_a_constant(tmp_path):
    model = _llama()
    _, sites, hybrid = _hybrid(model, {0: [1], 1: [0]})
    recurrent = m2.to_recurrent(hybrid, state_size=4).model

    def state_bytes(tokens):
        ids = torch.randint(1, 96, (1, tokens))
        out = recurrent.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        total = 0
        for layer in out.past_key_values.layers:
            tensors = []
            layer.state.map_batch(lambda t: tensors.append(t) or t)
            tensors += list(layer.kv or ())
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    kv_per_token = sum(hybrid.get_submodule(s.fqn).kept.state_bytes(1) for s in sites)
    small, large = state_bytes(8), state_bytes(24)
    assert large - small == 16 * kv_per_token, (small, large, kv_per_token)
    m2.save_pretrained(hybrid, tmp_path / "hybrid")
    again = m2.from_pretrained(tmp_path / "hybrid")
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, hybrid(input_ids=ids).logits)
    assert again.get_submodule(sites[0].fqn).kept.kept_groups == [1]


def test_auto_classes_lower_and_export_run_a_head_hybrid(serves_everywhere):
    plan = m2.plan(_llama(), m2.ConvertConfig(keep_heads=0.25, filter_order=16))
    hybrid = plan.apply()
    assert sum(m.kept is not None for m in hybrid.modules() if hasattr(m, "kept")) == 1
    serves_everywhere(hybrid, torch.randint(1, 96, (2, 12)))
