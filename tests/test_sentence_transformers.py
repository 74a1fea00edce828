"""sentence-transformers models go through m2.plan / m2.convert / m2.distill: shown on the bundled
all-MiniLM-L6-v2 loaded as a SentenceTransformer offline."""

from __future__ import annotations

import copy

import pytest
import torch

import m2convert as m2
from m2convert.layers import M2Block
from m2convert.loading import bundled_model_path
from m2convert.recover import DistillConfig, StageConfig

st_lib = pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.slow

SENTENCES = ["A man is eating food.", "A man is riding a horse on the beach.", "The cat sits on the mat.",
             "Stocks fell sharply after the announcement.", "Two children play football in the park.",
             "The recipe needs three eggs and some flour."]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def minilm_st():
    """(SentenceTransformer, its embeddings of SENTENCES, a copy of its weights), loaded offline."""
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled all-MiniLM-L6-v2 package is not installed")
    st = st_lib.SentenceTransformer(path, device="cpu")
    return st, st.encode(SENTENCES, convert_to_tensor=True), _state(st)


@pytest.fixture(scope="module")
def converted_st(minilm_st):
    return m2.convert(minilm_st[0])


def test_convert_returns_a_converted_copy_that_encodes(minilm_st, converted_st):
    st, embeddings, weights = minilm_st
    assert isinstance(converted_st, st_lib.SentenceTransformer) and converted_st is not st
    inner = converted_st[0].model                                 # sentence-transformers 6: the HF model
    assert sum(isinstance(m, M2Block) for m in inner.modules()) > 0
    # Replaced where it lives, not set through the read-only auto_model property (no stray submodule).
    assert converted_st[0].auto_model is inner and list(converted_st[0]._modules) == list(st[0]._modules)
    assert [type(m) for m in converted_st] == [type(m) for m in st]   # pooling and normalization kept
    out = converted_st.encode(SENTENCES, convert_to_tensor=True)
    assert out.shape == embeddings.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(SENTENCES)))
    # The input is untouched: same modules, same weights, same embeddings.
    assert not any(isinstance(m, M2Block) for m in st.modules())
    assert all(torch.equal(v, weights[k]) for k, v in st.state_dict().items())
    assert torch.equal(st.encode(SENTENCES, convert_to_tensor=True), embeddings)


def test_plan_of_a_sentence_transformer_is_the_plan_of_its_model(minilm_st, converted_st):
    plan = m2.plan(minilm_st[0])
    assert type(plan.model).__name__ == "BertModel"
    assert len(plan.converted) == 12                              # 6 attention + 6 MLP sites
    # The same plan m2.convert applied to the SentenceTransformer.
    assert [s.fqn for s in plan.sites] == [s["fqn"] for s in converted_st[0].model.m2convert_plan["sites"]]


def test_distill_takes_sentence_transformers(minilm_st, converted_st):
    teacher, embeddings, weights = minilm_st
    student = copy.deepcopy(converted_st)
    batches = []
    for i in range(0, len(SENTENCES), 2):
        enc = teacher.tokenizer(SENTENCES[i:i + 2], padding=True, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    config = DistillConfig(stages=[StageConfig("transfer", steps=4)], progress=False)
    result = m2.distill(student, teacher, batches * 2, config)
    losses = result.stages[0].losses
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    # The student's own model trained; the teacher did not change.
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                      converted_st.state_dict().values()))
    assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())
    assert torch.equal(teacher.encode(SENTENCES, convert_to_tensor=True), embeddings)


def test_saved_sentence_transformer_loads_back_bit_equal(converted_st, tmp_path):
    expected = converted_st.encode(SENTENCES, convert_to_tensor=True)
    converted_st.save(str(tmp_path))
    loaded = st_lib.SentenceTransformer(str(tmp_path), trust_remote_code=True, device="cpu")
    assert sum(isinstance(m, M2Block) for m in loaded.modules()) == sum(
        isinstance(m, M2Block) for m in converted_st.modules())
    saved, back = converted_st.state_dict(), loaded.state_dict()
    assert set(saved) == set(back) and all(torch.equal(saved[k], back[k]) for k in saved)
    assert torch.equal(loaded.encode(SENTENCES, convert_to_tensor=True), expected)


def test_cli_convert_keeps_the_sentence_transformers_modules(converted_st, tmp_path, capsys):
    from m2convert.cli import main

    assert main(["convert", "all-MiniLM-L6-v2", "--out", str(tmp_path / "st-m2")]) == 0
    assert "SentenceTransformer(DIR" in capsys.readouterr().err
    loaded = st_lib.SentenceTransformer(str(tmp_path / "st-m2"), trust_remote_code=True, device="cpu")
    assert loaded.max_seq_length == converted_st.max_seq_length == 256
    got = loaded.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), rtol=1e-5, atol=1e-5)  # normalized
    torch.testing.assert_close(got, converted_st.encode(SENTENCES, convert_to_tensor=True), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, M2Block) for m in loaded.modules()) > 0
