"""Measured choice of the attention to keep: budgets (layers, KV bytes), the kl / offset-fit / uniform
methods, the plan's views of every score, the converted hybrid, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import m2convert as m2
from m2convert.cli import main
from m2convert.errors import ConfigError
from m2convert.layers import ADAPTERS
from m2convert.passes.plan import RewritePlan
from m2convert.selection import Budget, choose

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def _gpt2(silent=(0, 2)):
    """A 3-layer GPT-2 whose attention in the ``silent`` layers writes nothing (zero output projection):
    only the other layer's attention changes the model, so only keeping it can bring the student closer."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for i in silent:
            model.transformer.h[i].attn.c_proj.weight.zero_()
            model.transformer.h[i].attn.c_proj.bias.zero_()
    return model


def _calibration(n=4, batch=4, length=32):
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, length), generator=gen)} for _ in range(n)]


def _kept(plan) -> list[str]:
    return [s.fqn for s in plan.sites if s.selection is not None and s.selection.kept]


def test_config_takes_one_budget_and_a_known_method():
    with pytest.raises(ConfigError, match="give one of them"):
        m2.ConvertConfig(keep_layers=1, keep_kv_bytes=256)
    with pytest.raises(ConfigError, match="selection"):
        m2.ConvertConfig(keep_layers=1, selection="random")
    with pytest.raises(ConfigError, match="keep_layers"):
        m2.ConvertConfig(keep_layers=-1)
    cfg = m2.ConvertConfig(keep_kv_bytes=512, selection="kl", selection_steps=3)
    assert m2.ConvertConfig.from_dict(cfg.to_dict()) == cfg and cfg.keeps_attention


def test_choose_within_each_budget():
    assert choose([0.3, 0.1, 0.2], [8, 8, 8], Budget(layers=2)) == [0, 2]
    assert choose([0.3, 0.1, 0.2], [8, 8, 8], Budget(layers=5)) == [0, 1, 2]
    assert choose([0.3, 0.1, 0.2], [16, 8, 8], Budget(kv_bytes=8)) == [2]        # the best fits no more
    assert choose([None] * 3, [8, 8, 8], Budget(kv_bytes=16)) == [0, 2]
    assert choose([None] * 12, [8] * 12, Budget(layers=3)) == [2, 6, 10]


def test_kl_keeps_the_only_attention_that_matters():
    model = _gpt2()
    plan = m2.plan(model, m2.ConvertConfig(keep_layers=1, dimension=False, selection_steps=5),
                   calibration=_calibration(), progress=False)
    scores = {s.fqn: s.selection.score for s in plan.sites if s.selection}
    assert _kept(plan) == ["transformer.h.1.attn"], scores
    # Restoring a layer whose attention writes nothing changes nothing: its score is exactly zero.
    assert scores["transformer.h.0.attn"] == 0.0 and scores["transformer.h.2.attn"] == 0.0
    assert scores["transformer.h.1.attn"] > 0
    assert [s.selection.method for s in plan.sites if s.selection] == ["kl"] * 3       # "auto" with data
    kept = next(s for s in plan.sites if s.fqn == "transformer.h.1.attn")
    assert kept.status == "exclude" and kept.reason.startswith("kept as attention: kl score")
    # The budget in bytes: one layer's K and V per token, fp32 (2 x 2 heads x 16 x 4 bytes).
    bytes_plan = m2.plan(model, m2.ConvertConfig(keep_kv_bytes=256, dimension=False, selection_steps=5),
                         calibration=_calibration(), progress=False)
    assert _kept(bytes_plan) == ["transformer.h.1.attn"]
    assert {s.selection.kv_bytes for s in bytes_plan.sites if s.selection} == {256}


def test_converted_hybrid_keeps_the_chosen_attention_and_reloads(tmp_path):
    model = _gpt2()
    student = m2.convert(model, m2.ConvertConfig(keep_layers=1, dimension=False, selection_steps=0),
                         calibration=_calibration(), progress=False)
    kinds = [type(block.attn).__name__ for block in student.transformer.h]
    assert kinds[1] == type(model.transformer.h[1].attn).__name__
    assert all(k in ADAPTERS for k in (kinds[0], kinds[2])), kinds
    ids = _calibration(1)[0]["input_ids"]
    m2.save_pretrained(student, tmp_path / "hybrid")
    again = m2.from_pretrained(tmp_path / "hybrid")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, student(input_ids=ids).logits)


def test_measured_methods_need_calibration_and_uniform_does_not():
    model = _gpt2()
    for method in ("kl", "offset-fit"):
        with pytest.raises(ConfigError, match="calibration"):
            m2.plan(model, m2.ConvertConfig(keep_layers=1, selection=method))
    plan = m2.plan(model, m2.ConvertConfig(keep_layers=1, dimension=False))
    assert _kept(plan) == ["transformer.h.1.attn"]                 # the middle one of three
    assert {s.selection.method for s in plan.sites if s.selection} == {"uniform"}


def test_offset_fit_scores_every_layer():
    plan = m2.plan(_gpt2(silent=()), m2.ConvertConfig(keep_layers=1, dimension=False, selection="offset-fit"),
                   calibration=_calibration(2), progress=False)
    sel = [s.selection for s in plan.sites if s.selection]
    assert len(sel) == 3 and all(s.score is not None and s.score >= 0 for s in sel)
    best = max(sel, key=lambda s: s.score)
    assert best.kept and best.rank == 1 and sum(s.kept for s in sel) == 1


def test_plan_views_show_every_score(tmp_path):
    plan = m2.plan(_gpt2(), m2.ConvertConfig(keep_layers=1, dimension=False, selection_steps=2),
                   calibration=_calibration(), progress=False)
    text = str(plan)
    assert "keep score (rank)" in text and "kept as attention: kl score" in text
    again = RewritePlan.from_dict(json.loads(plan.to_json()))
    assert [s.selection for s in again.sites] == [s.selection for s in plan.sites]
    html = plan.to_html(tmp_path / "plan.html").read_text()
    assert html.count("keep score: kl") == 3


def test_cli_plan_keeps_measured_layers(tmp_path, capsys):
    from m2convert.data.readers import sample_data_dir

    sample = sample_data_dir() / "wikitext2-valid-sentences.txt"
    argv = ["plan", "all-MiniLM-L6-v2", "--json", "--no-dimension", "--filter-order", "16", "--keep-layers", "2",
            "--calibration", str(sample), "--selection-steps", "2"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    sel = [s["selection"] for s in plan["sites"] if s["selection"]]
    assert len(sel) == 6 and sum(s["kept"] for s in sel) == 2 and {s["method"] for s in sel} == {"kl"}
    assert sorted(s["rank"] for s in sel) == [1, 2, 3, 4, 5, 6]
    assert main(["plan", "all-MiniLM-L6-v2", "--keep-layers", "1", "--select", "kl"]) == 1
    assert "--calibration" in capsys.readouterr().err
