"""The command line: plan and convert on saved tiny models and the bundled MiniLM; one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from m2convert.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bert_dir(tiny_model, tmp_path):
    path = tmp_path / "tiny-bert"
    tiny_model("bert").save_pretrained(path)
    return path


def _one_line_error(err: str) -> str:
    """The single error line of ``err``; progress-bar frames (``37%|###``) of model loading may precede it."""
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("m2convert: error: ") and "Traceback" not in err, err
    return lines[0]


def test_plan_prints_table_json_and_html(bert_dir, tmp_path, capsys):
    assert main(["plan", str(bert_dir), "--filter-order", "16"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.1.attention" in out and "M2PostNormAttention(bidirectional)" in out

    html = tmp_path / "plan.html"
    argv = ["plan", str(bert_dir), "--json", "--seq-len", "1024", "--html", str(html), "--skip", r"layer\.1\."]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["seq_len"] == 1024
    assert [s["status"] for s in data["sites"]] == ["convert", "convert", "exclude", "exclude"]
    assert "encoder.layer.0.attention" in html.read_text()


def test_convert_writes_weights_and_plan(bert_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(bert_dir), "--out", str(out), "--filter-order", "16", "--nblocks", "2"]) == 0
    meta = json.loads((out / "m2convert.json").read_text())
    assert meta["model_class"] == "BertModel" and meta["hf_config"]["hidden_size"] == 32
    assert {s["settings"].get("nblocks") for s in meta["plan"]["sites"] if s["kind"] == "dimension"} == {2}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.layer.0.attention.mixer.in_proj.weight" in keys and "encoder.layer.0.output.dense.w1" in keys
    assert "encoder.layer.0.attention" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["plan", "{dir}", "--nblocks", "0"], "nblocks=0 is out of range"),
    (["plan", "{dir}", "--causal-mode", "sideways"], "causal_mode='sideways' is not valid"),
    (["plan", "{dir}", "--skip", "("], "does not compile"),
    (["plan", "./no/such/dir"], "does not exist"),
    (["plan", "{tmp}"], "has no config.json"),
])
def test_bad_input_is_one_line(bert_dir, tmp_path, capsys, argv, needle):
    argv = [a.format(dir=bert_dir, tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    assert needle in _one_line_error(capsys.readouterr().err)


def test_usage_errors_exit_2(capsys):
    for argv in (["plan"], ["frobnicate"], ["plan", "x", "--seq-len", "many"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        _one_line_error(capsys.readouterr().err)


def test_unknown_model_id_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "m2convert", "plan", "m2convert-tests/no-such-model"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1
    line = _one_line_error(run.stderr)
    assert "could not load 'm2convert-tests/no-such-model'" in line and "HF_HUB_OFFLINE" in line


@pytest.mark.slow
def test_plan_on_bundled_minilm(minilm, capsys):
    assert main(["plan", "all-MiniLM-L6-v2"]) == 0
    out = capsys.readouterr().out
    assert "RewritePlan for BertModel: 12 site(s) to convert, 0 skipped" in out
    assert all(f"encoder.layer.{i}.attention" in out for i in range(6))


@pytest.fixture(scope="module")
def skip_dirs(tmp_path_factory):
    """A tiny BART (its decoder cross-attention cannot be converted) and a tiny two-layer ALBERT (one shared
    layer run twice: none of its sites can be converted)."""
    import transformers

    root = tmp_path_factory.mktemp("skips")
    torch.manual_seed(0)
    transformers.BartModel(transformers.BartConfig(
        vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)).save_pretrained(root / "bart")
    transformers.AlbertModel(transformers.AlbertConfig(
        vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "albert")
    return root


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("m2convert: warning: ")]


def test_convert_warns_once_about_skipped_sites_but_not_excluded_ones(bert_dir, skip_dirs, tmp_path, capsys):
    assert main(["convert", str(bert_dir), "--out", str(tmp_path / "a"), "--filter-order", "16",
                 "--skip", r"layer\.1\.", "--no-dimension"]) == 0
    assert not _warnings(capsys.readouterr().err)                                    # excluded, not skipped

    assert main(["convert", str(skip_dirs / "bart"), "--out", str(tmp_path / "b"), "--filter-order", "16"]) == 0
    captured = capsys.readouterr()
    (line,) = _warnings(captured.err)
    assert "1 of 5 sites were left unconverted" in line and "cross-attention: 1 site" in line, line
    assert "decoder.layers.0.encoder_attn" in captured.out and (tmp_path / "b" / "m2convert.json").exists()


@pytest.mark.parametrize("command", ["convert", "plan", "bench"])
def test_strict_fails_listing_each_skipped_site(skip_dirs, tmp_path, capsys, command):
    out = tmp_path / "out"
    extra = {"convert": ["--out", str(out)], "plan": [], "bench": ["--seq-lens", "16"]}[command]
    assert main([command, str(skip_dirs / "bart"), "--filter-order", "16", "--strict", *extra]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "--strict and 1 of 5 sites cannot be converted: 'decoder.layers.0.encoder_attn' (cross-attention): " \
           "cross-attention: keys/values come from another sequence" in line, line
    assert "--skip REGEX" in line and "strict=False" not in line and not out.exists()


def test_converting_nothing_fails_with_the_reasons(skip_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(skip_dirs / "albert"), "--out", str(out), "--filter-order", "16"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "nothing to convert in AlbertModel: 2 site(s) cannot be converted (" in line, line
    assert "runs 2 times per forward (shared module): 1 site" in line and not out.exists()

    assert main(["convert", str(skip_dirs / "bart"), "--out", str(out), "--no-dimension", "--skip", "self_attn"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "1 site(s) cannot be converted (cross-attention: 1 site); 4 site(s) are left out by --skip" in line, line


def test_the_command_line_shows_no_import_noise_of_other_libraries():
    """torchao (which transformers imports where installed) logs C extensions built for another torch, and
    torch's pytree that torchao's registrations are deprecated: nothing about the user's command."""
    done = subprocess.run([sys.executable, "-m", "m2convert", "plan", "all-MiniLM-L6-v2"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr, done.stderr[:2000]
    assert "RewritePlan for BertModel" in done.stdout
