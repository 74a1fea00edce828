"""Inputs to converted models: any length and batch size, padding on either side, all-padding rows.

Sequence lengths 1, odd, up to the position table and (rotary decoders) far beyond it; batch sizes 1 to
256; right padding (encoders), left padding (decoders), rows that are all padding. Rows never affect
each other and padding never reaches real tokens.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import m2convert as m2

transformers = pytest.importorskip("transformers")
FAST = settings(max_examples=12, deadline=None)


def _bert(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval().to(dtype)


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(seed))     # (B, N)


@pytest.fixture(scope="module")
def bert_m2():
    return m2.convert(_bert())


@pytest.fixture(scope="module")
def llama_m2():
    return m2.convert(_llama())


@FAST
@given(batch=st.integers(1, 5), n=st.integers(1, 64), seed=st.integers(0, 2 ** 16))
def test_bert_any_length_and_batch_rows_are_independent(bert_m2, batch, n, seed):
    ids = _ids(batch, n, seed)
    with torch.no_grad():
        out = bert_m2(input_ids=ids).last_hidden_state                         # (B, N, 32)
        alone = bert_m2(input_ids=ids[-1:]).last_hidden_state                  # (1, N, 32)
    assert out.shape == (batch, n, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out[-1:], alone, atol=1e-5, rtol=1e-4)


def test_bert_large_batch_matches_single_rows(bert_m2):
    ids = _ids(256, 7)
    with torch.no_grad():
        out = bert_m2(input_ids=ids).last_hidden_state                         # (256, 7, 32)
        for i in (0, 101, 255):
            torch.testing.assert_close(out[i:i + 1], bert_m2(input_ids=ids[i:i + 1]).last_hidden_state,
                                       atol=1e-5, rtol=1e-4)


@FAST
@given(n=st.integers(1, 20), pad=st.integers(1, 12))
def test_bert_right_padding_never_reaches_real_tokens(bert_m2, n, pad):
    ids = _ids(2, n + pad)
    mask = torch.ones_like(ids)
    mask[1, n:] = 0
    with torch.no_grad():
        out = bert_m2(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = bert_m2(input_ids=ids[1:, :n]).last_hidden_state
    torch.testing.assert_close(out[1, :n], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_all_padding_row_is_finite_and_harmless(bert_m2, llama_m2, which):
    model = bert_m2 if which == "bert" else llama_m2
    ids = _ids(3, 9)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)[0]
        rest = model(input_ids=ids[[0, 2]], attention_mask=mask[[0, 2]])[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[[0, 2]], rest, atol=1e-5, rtol=1e-4)


@FAST
@given(n=st.integers(1, 12), pad=st.integers(1, 6))
def test_llama_left_padding_matches_unpadded(llama_m2, n, pad):
    ids = _ids(1, n)
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)  # (1, pad + n)
    mask = (torch.arange(pad + n) >= pad).long()[None]                        # (1, pad + n)
    other = _ids(1, pad + n, seed=7)
    with torch.no_grad():
        out = llama_m2(input_ids=torch.cat([padded, other]), attention_mask=torch.cat([mask, torch.ones_like(mask)]))
        alone = llama_m2(input_ids=ids).logits
    torch.testing.assert_close(out.logits[:1, pad:], alone, atol=1e-5, rtol=1e-4)


@FAST
@given(n=st.integers(65, 400), k=st.integers(1, 64))
def test_llama_far_beyond_training_length_keeps_prefixes(llama_m2, n, k):
    # max_position_embeddings is 64; the mixers have no position limit and are causal.
    ids = _ids(1, n, seed=n)
    with torch.no_grad():
        full = llama_m2(input_ids=ids).logits                                 # (1, n, V)
        prefix = llama_m2(input_ids=ids[:, :k]).logits                        # (1, k, V)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full[:, :k], prefix, atol=1e-4, rtol=1e-4)
