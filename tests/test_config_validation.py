"""Bad configuration values get a ConfigError naming the field and its valid range or choices.

ConvertConfig (a property test over all integers, wrong types, overrides, upper limits also inside
overrides), DistillConfig, and the arguments of m2.plan / m2.convert.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import m2convert as m2
from m2convert.config import CAUSAL_MODES
from m2convert.errors import CaptureError, ConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")
FAST = settings(max_examples=40, deadline=None)
ANY_INT = st.one_of(st.integers(-3, 6), st.integers(-(2 ** 40), 2 ** 40))


def _valid(nblocks, rank, filter_order, filter_emb_dim, seq_len, causal_mode, projection_nblocks=0) -> bool:
    return (1 <= nblocks <= 4096 and 1 <= rank <= 65536 and 1 <= filter_order <= 4096
            and 0 <= projection_nblocks <= 4096
            and 3 <= filter_emb_dim <= 129 and filter_emb_dim % 2 == 1 and 1 <= seq_len <= 2 ** 24
            and causal_mode in CAUSAL_MODES)


@FAST
@given(nblocks=ANY_INT, rank=ANY_INT, filter_order=ANY_INT, filter_emb_dim=ANY_INT,
       seq_len=st.one_of(st.integers(-2, 4), st.integers(2 ** 24 - 1, 2 ** 24 + 1)),
       causal_mode=st.sampled_from([*CAUSAL_MODES, "bidirectional", "", "CAUSAL"]), projection_nblocks=ANY_INT)
def test_convert_config_accepts_exactly_the_valid_values(nblocks, rank, filter_order, filter_emb_dim, seq_len,
                                                         causal_mode, projection_nblocks):
    kw = dict(nblocks=nblocks, rank=rank, filter_order=filter_order, filter_emb_dim=filter_emb_dim,
              seq_len=seq_len, causal_mode=causal_mode, projection_nblocks=projection_nblocks)
    if _valid(**kw):
        cfg = m2.ConvertConfig(**kw)
        assert m2.ConvertConfig.from_dict(cfg.to_dict()) == cfg
    else:
        with pytest.raises(ConfigError) as info:
            m2.ConvertConfig(**kw)
        assert isinstance(info.value, ValueError)
        assert any(name in str(info.value) for name in kw)


@pytest.mark.parametrize("kw, needle", [
    ({"nblocks": 2.0}, "nblocks must be an int"),
    ({"nblocks": True}, "nblocks must be an int"),
    ({"rank": "2"}, "rank must be an int"),
    ({"sequence": "yes"}, "sequence must be True or False"),
    ({"filter_fn": 3}, "filter_fn must be callable"),
    ({"overrides": [r"layer\.0"]}, "overrides must be a dict"),
    ({"overrides": {"(": None}}, "does not compile"),
    ({"overrides": {3: None}}, "override keys must be regex strings"),
    ({"overrides": {"x": {"nblocks": 2, "bogus": 1}}}, "unknown settings ['bogus']"),
    ({"overrides": {"x": 4}}, "must be a dict of settings or None"),
    ({"overrides": {"x": {"filter_emb_dim": 6}}}, "must be odd"),
])
def test_convert_config_names_the_bad_field(kw, needle):
    with pytest.raises(ConfigError) as info:
        m2.ConvertConfig(**kw)
    assert needle in str(info.value)


@pytest.mark.parametrize("field, bad, good, shown", [
    ("filter_order", 4097, 4096, "[1, 4096]"),
    ("filter_order", 65536, 1, "[1, 4096]"),
    ("filter_emb_dim", 131, 129, "[3, 129]"),
    ("filter_emb_dim", 255, 3, "[3, 129]"),
])
def test_filter_settings_have_upper_limits_also_in_overrides(field, bad, good, shown):
    with pytest.raises(ConfigError, match=rf"{field}={bad} is out of range; valid range is \{shown}"):
        m2.ConvertConfig(**{field: bad})
    with pytest.raises(ConfigError, match=rf"overrides\['x'\]\['{field}'\]={bad} is out of range.*\{shown}"):
        m2.ConvertConfig(overrides={"x": {field: bad}})
    assert getattr(m2.ConvertConfig(**{field: good}), field) == good
    assert m2.ConvertConfig(overrides={"x": {field: good}}).overrides["x"][field] == good


def test_api_entry_points_refuse_bad_arguments():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    with pytest.raises(ConfigError, match="unknown ConvertConfig fields"):
        m2.convert(model, nblock=8)
    with pytest.raises(ConfigError, match="config must be a ConvertConfig"):
        m2.plan(model, config=42)
    with pytest.raises(ConfigError, match="unknown ConvertConfig fields"):
        m2.plan(model, config={"nblocks": 2, "colour": "red"})
    with pytest.raises(UnsupportedModelError, match="expects a torch.nn.Module"):
        m2.convert("bert-base-uncased")
    with pytest.raises(CaptureError, match="example_inputs must be"):
        m2.plan(model, example_inputs=42)
    with pytest.raises(CaptureError, match="no Hugging Face `config`"):
        m2.plan(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("kw, needle", [
    ({"steps": 0}, "steps=0 is out of range"),
    ({"stages": ["kd", "transfer"]}, "out of order"),
    ({"stages": ["finetune"]}, "stage name='finetune' is not valid"),
    ({"stages": []}, "non-empty list"),
    ({"batch_size": 0}, "batch_size=0 is out of range"),
    ({"resume": True}, "resume=True needs checkpoint_dir"),
    ({"on_bad": "ignore"}, "on_bad='ignore' is not valid"),
])
def test_distill_config_names_the_bad_field(kw, needle):
    with pytest.raises(ConfigError) as info:
        m2.DistillConfig(**kw)
    assert needle in str(info.value)
