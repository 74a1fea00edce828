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
    assert choose([0.3, 0.1, 0.2], [1, 1, 1], 2) == [0, 2]
    assert choose([0.3, 0.1, 0.2], [1, 1, 1], 5) == [0, 1, 2]
    assert choose([0.3, 0.1, 0.2], [16, 8, 8], 8) == [2]                  # the best does not fit
    assert choose([None] * 3, [8, 8, 8], 16) == [0, 2]
    assert choose([None] * 12, [1] * 12, 3) == [2, 6, 10]
    assert Budget(heads=0.125).describe() == "12.5% of the heads"


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
    assert [s.selection.kv_bytes for s in bytes_plan.sites if s.selection] == [0, 256, 0]


def test_kl_scores_only_the_positions_that_predict_labelled_tokens():
    model = _gpt2()
    cfg = m2.ConvertConfig(keep_layers=1, dimension=False, selection_steps=0)

    def scores(calibration):
        plan = m2.plan(model, cfg, calibration=calibration, progress=False)
        return {s.fqn: s.selection.score for s in plan.sites if s.selection}

    plain = _calibration()
    labelled = []
    for batch in plain:
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, [6, 21]] = batch["input_ids"][:, [6, 21]]            # two answers a row: positions 5 and 20
        labelled.append({**batch, "labels": labels})
    everywhere, answers = scores(plain), scores(labelled)
    assert answers["transformer.h.1.attn"] > 0 and answers["transformer.h.0.attn"] == 0.0
    assert answers["transformer.h.1.attn"] != pytest.approx(everywhere["transformer.h.1.attn"], rel=1e-3)
    unmarked = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in labelled]
    assert scores(unmarked) == pytest.approx(everywhere)                 # no answer marked: every token counts


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


def _one_head_gpt2():
    """3 layers x 4 heads where only head 2 of layer 1 reaches the output (every other head's columns of
    the output projections are zero)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            w = block.attn.c_proj.weight                        # Conv1D: (in = heads * d, out)
            keep = w[16:24].clone() if i == 1 else None
            w.zero_()
            if keep is not None:
                w[16:24] = keep
    return model


def test_kl_at_head_level_keeps_the_only_head_that_matters():
    model = _one_head_gpt2()
    cfg = m2.ConvertConfig(keep_heads=1 / 12, dimension=False, selection_steps=0, filter_order=16)
    plan = m2.plan(model, cfg, calibration=_calibration(), progress=False)
    rows = {(s.fqn, g["group"]): g for s in plan.sites if s.selection for g in s.selection.groups}
    kept = [key for key, g in rows.items() if g["kept"]]
    assert kept == [("transformer.h.1.attn", 2)], {k: g["score"] for k, g in rows.items()}
    assert all(g["score"] == 0.0 for key, g in rows.items() if key != kept[0])
    assert rows[kept[0]]["score"] > 0 and rows[kept[0]]["rank"] == 1
    site = next(s for s in plan.sites if s.fqn == "transformer.h.1.attn")
    assert site.status == "convert" and site.settings["kept_groups"] == [2]
    assert "softmax heads [2]" in site.replacement and "kl heads" in str(plan)
    assert site.selection.kv_bytes == 2 * 8 * 4                       # one head's K and V per token, fp32
    student = plan.apply()
    adapter = student.get_submodule("transformer.h.1.attn")
    assert adapter.kept.query_heads == [2]
    assert student.get_submodule("transformer.h.0.attn").kept is None
    again = RewritePlan.from_dict(json.loads(plan.to_json()))
    assert again.sites[2].selection == site.selection


def test_head_budget_counts_whole_kv_groups():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    plan = m2.plan(model, m2.ConvertConfig(keep_heads=0.25, dimension=False, filter_order=16))
    kept = {s.fqn: s.settings.get("kept_groups") for s in plan.sites if s.selection and s.selection.kept}
    # 16 heads in 8 KV groups of 2: a quarter is 4 heads, two groups, evenly spaced (uniform without data).
    assert sum(len(v) for v in kept.values()) == 2, kept
    with pytest.raises(ConfigError, match="fraction"):
        m2.ConvertConfig(keep_heads=1.5)
