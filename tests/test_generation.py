"""generate() on converted decoders: the decoding cache gives the same tokens as recomputing every step."""

from __future__ import annotations

import pytest
import torch
import transformers

import m2convert as m2
import m2convert.layers.cache as generation
from m2convert.errors import ConversionError
from m2convert.layers.cache import M2CacheLayer

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = m2.ConvertConfig(filter_order=16)


def _tiny(family):
    """Tiny random decoders with room for a prompt plus 64 new tokens (the shared fixtures stop at 64)."""
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        return transformers.GPT2LMHeadModel(config).eval()
    if family == "bloom":                                  # adds the residual inside its attention module
        config = transformers.BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0,
                                          bos_token_id=0, eos_token_id=0)
        return transformers.BloomForCausalLM(config).eval()
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def _decoder(family, **overrides):
    model = m2.convert(_tiny(family), SMALL, **overrides)
    model.generation_config.eos_token_id = None            # always generate every requested token
    model.generation_config.pad_token_id = 0
    return model


def _prompt():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 96, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                       # left padding, as batched generation uses
    return {"input_ids": ids, "attention_mask": mask}


def _generate(model, use_cache, seed=7, **kwargs):
    torch.manual_seed(seed)
    return model.generate(**_prompt(), use_cache=use_cache, **kwargs)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bloom"])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_cache_gives_the_tokens_of_full_recompute(family, sampling, monkeypatch):
    model = _decoder(family)
    steps = []
    decode_step = generation.decode_step
    monkeypatch.setattr(generation, "decode_step", lambda *a: steps.append(1) or decode_step(*a))
    options = {"do_sample": True, "top_k": 0} if sampling else {"do_sample": False}
    cached = _generate(model, True, max_new_tokens=64, **options)
    assert len(steps) == 63 * 2                           # every token after the prompt came from the state
    recomputed = _generate(model, False, max_new_tokens=64, **options)
    assert len(steps) == 63 * 2                           # ...and none without the cache
    assert cached.shape == (2, 11 + 64)
    assert torch.equal(cached, recomputed)


def test_beam_search_reorders_the_states():
    model = _decoder("gpt2")
    beams = {"num_beams": 3, "do_sample": False, "max_new_tokens": 12}
    assert torch.equal(_generate(model, True, **beams), _generate(model, False, **beams))


def test_causal_monarch_mixers_decode_too():
    model = _decoder("llama", causal_mode="causal-monarch")
    assert torch.equal(_generate(model, True, max_new_tokens=16), _generate(model, False, max_new_tokens=16))


def test_cache_reports_its_length_and_refuses_cropping():
    from transformers import DynamicCache

    model = _decoder("gpt2")
    ids = _prompt()["input_ids"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=ids, cache=cache, use_cache=True)
        step = model(input_ids=ids[:, :1], cache=first.cache, use_cache=True)
    assert all(isinstance(layer, M2CacheLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 12 and step.logits.shape == (2, 1, 96)
    with pytest.raises(ConversionError, match="cannot be cropped"):
        cache.crop(-1)
    with torch.no_grad():                                 # plain forward calls keep no state
        assert model(input_ids=ids).get("cache") is None


def test_compiled_forward_decodes_without_compiling_once_per_token():
    """The convolution-form decoding state keeps the tokens seen as a tensor size and writes with narrow(),
    so a compiled forward recompiles at the state's capacity doublings, not at every token."""
    import torch._dynamo

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=0)).eval()
    converted = m2.convert(model, filter_order=16, dimension=False)
    ids = torch.randint(1, 96, (1, 8))
    eager = converted.generate(ids, max_new_tokens=40, do_sample=False)
    torch._dynamo.reset()
    converted.forward = torch.compile(converted.forward, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=64):
        torch._dynamo.utils.counters.clear()
        compiled = converted.generate(ids, max_new_tokens=40, do_sample=False)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(compiled, eager)
    assert graphs <= 3, graphs               # the prompt, the first step (and a doubling per 256 tokens)
