"""Inputs nobody planned for: each converts correctly or is refused with a named M2Error.

Models: tied weights, frozen parameters, fp16/bf16 weights, DataParallel wrappers. Inputs to converted
models: sequence lengths 1, odd and far beyond the training length, batch sizes 1 and large,
all-padding rows, left padding. A failed or interrupted convert leaves the input model bit-identical.
Loading never unpickles. (Configs and the command line: test_hardening_cli.py.)
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import m2convert as m2
from m2convert.errors import CaptureError, CheckpointError, ConversionError
from m2convert.layers import M2Block

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
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


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the state-dict bytes, dtypes and shapes, module types, train/eval and grad flags."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.requires_grad}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr([(n, type(m).__name__, m.training) for n, m in model.named_modules()]).encode())
    h.update(repr(hasattr(model, "m2convert_plan")).encode())
    return h.hexdigest()


def _ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(seed))     # (B, N)


@pytest.fixture(scope="module")
def bert_plan():
    return m2.plan(_bert())


@pytest.fixture(scope="module")
def bert_m2(bert_plan):
    return bert_plan.apply()


@pytest.fixture(scope="module")
def llama_m2():
    return m2.convert(_llama())


def test_tied_lm_head_stays_tied():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    converted = m2.convert(model)
    assert converted.lm_head.weight is converted.transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(isinstance(m, M2Block) for m in converted.modules()) >= 2
    names = [n for n, _ in converted.named_parameters()]
    assert "lm_head.weight" not in names                                       # counted once


def test_frozen_parameters_stay_frozen_and_new_modules_train():
    model = _bert()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("embeddings."))                    # freeze the embeddings
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    converted = m2.convert(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    kept = dict(converted.named_parameters())
    assert all(not kept[n].requires_grad for n in before if n.startswith("embeddings."))
    new = [p for m in converted.modules() if isinstance(m, M2Block) for p in m.parameters()]
    assert new and all(p.requires_grad for p in new)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_half_precision_weights_convert_in_their_dtype(dtype, tol):
    ids = _ids(2, 9)
    torch.manual_seed(5)
    ref = m2.convert(_bert())(input_ids=ids).last_hidden_state               # (2, 9, 32) fp32
    torch.manual_seed(5)
    converted = m2.convert(_bert(dtype))
    assert {p.dtype for p in converted.parameters()} == {dtype}
    out = converted(input_ids=ids).last_hidden_state
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < tol


def test_data_parallel_needs_inputs_then_converts_its_module():
    ids = _ids(2, 9)
    with pytest.raises(CaptureError, match="DataParallel"):
        m2.convert(torch.nn.DataParallel(_bert()))
    torch.manual_seed(5)
    wrapped = m2.convert(torch.nn.DataParallel(_bert()).eval(), example_inputs={"input_ids": ids})
    torch.manual_seed(5)
    plain = m2.convert(_bert(), example_inputs={"input_ids": ids})
    assert isinstance(wrapped, torch.nn.DataParallel)
    assert isinstance(wrapped.module.encoder.layer[1].attention, M2Block)
    torch.testing.assert_close(wrapped(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state)


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


@FAST
@given(fail_at=st.integers(0, 3), inplace=st.booleans(), interrupt=st.booleans())
def test_failed_or_interrupted_convert_leaves_the_model_bit_identical(bert_plan, fail_at, inplace, interrupt):
    import m2convert.passes.apply as apply_mod

    model = bert_plan.model
    before = fingerprint(model)
    real, calls = apply_mod.build_replacements, []

    def flaky(site, target, **kw):
        calls.append(site.fqn)
        if len(calls) > fail_at:
            raise KeyboardInterrupt if interrupt else RuntimeError(f"simulated failure at {site.fqn}")
        return real(site, target, **kw)

    with mock.patch.object(apply_mod, "build_replacements", flaky):
        with pytest.raises(KeyboardInterrupt if interrupt else ConversionError) as info:
            bert_plan.apply(inplace=inplace)
    if not interrupt:
        assert calls[-1] in str(info.value) and "unchanged" in str(info.value)
    assert fingerprint(model) == before


def test_strict_refusal_and_failing_filter_fn_leave_the_model_bit_identical():
    model = _bert()
    before = fingerprint(model)
    with pytest.raises(ConversionError, match=r"strict=True .*encoder\.layer\.1"):
        m2.convert(model, overrides={r"layer\.1\.": {"nblocks": 64}}, strict=True)   # 64 blocks > width 32

    def broken(module, fqn):
        raise KeyError(fqn)

    with pytest.raises(m2.M2Error, match="filter_fn raised KeyError"):
        m2.convert(model, filter_fn=broken)
    assert fingerprint(model) == before


def _source_files():
    for folder in ("m2convert", "passes", "kernels", "benchmarks", "examples"):
        yield from (ROOT / folder).rglob("*.py")


def test_source_never_unpickles():
    unsafe = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|joblib|cloudpickle)\b|"
                        r"torch\.jit\.load\(|allow_pickle\s*=\s*True|pickle\.loads?\(", re.M)
    offenders = []
    for path in _source_files():
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in unsafe.finditer(text)]
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end():text.find(")", call.end()) + 1]
            if not re.search(r"weights_only\s*=\s*True", args):
                offenders.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not offenders, offenders


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_checkpoints_never_run_code(tmp_path, bert_m2):
    marker = tmp_path / "code-ran"
    saved = tmp_path / "m2"
    m2.save_pretrained(bert_m2, saved)
    with open(saved / "pytorch_model.bin", "wb") as f:                        # ignored beside safetensors
        pickle.dump({"w": _Payload(marker)}, f, protocol=2)
    assert isinstance(m2.from_pretrained(saved), transformers.BertModel)
    with open(saved / "model.safetensors", "wb") as f:                        # a pickle posing as weights
        pickle.dump({"w": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        m2.from_pretrained(saved)

    plain = tmp_path / "hf"
    bert_m2.config.save_pretrained(plain)
    with open(plain / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="no m2convert.json"):
        m2.from_pretrained(plain)
    with pytest.raises(Exception):
        m2.load_model(str(plain))
    assert not marker.exists()
