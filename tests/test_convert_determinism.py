"""m2.convert is deterministic: the same model and config give bit-equal models, whatever the RNG state."""

import torch
import transformers

import m2convert as m2


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    return transformers.BertModel(config).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_model_and_config_give_bit_equal_models():
    model = _bert()
    torch.manual_seed(1)
    first = _state(m2.convert(model, m2.ConvertConfig(filter_order=8)))
    torch.manual_seed(2)                                   # another global RNG state changes nothing
    second = _state(m2.convert(model, m2.ConvertConfig(filter_order=8)))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_seed_changes_the_new_filters_only():
    model = _bert()
    a = _state(m2.convert(model, m2.ConvertConfig(filter_order=8, seed=0)))
    b = _state(m2.convert(model, m2.ConvertConfig(filter_order=8, seed=1)))
    differ = {k for k in a if not torch.equal(a[k], b[k])}
    assert differ and all(".filter." in k or "filter" in k for k in differ), sorted(differ)[:5]


def test_convert_leaves_the_global_rng_alone():
    model = _bert()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    m2.convert(model, m2.ConvertConfig(filter_order=8))
    assert torch.equal(torch.rand(4), expected)


def test_a_site_initialises_the_same_whichever_other_sites_convert():
    model = _bert()
    both = _state(m2.convert(model, m2.ConvertConfig(filter_order=8, dimension=False)))
    one = _state(m2.convert(model, m2.ConvertConfig(filter_order=8, dimension=False,
                                                     overrides={r"layer\.0\.": None})))
    keys = [k for k in one if k.startswith("encoder.layer.1.attention.")]
    assert keys and all(torch.equal(one[k], both[k]) for k in keys)
