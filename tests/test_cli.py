"""The command line: plan and convert on saved tiny models and the bundled MiniLM; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from m2convert.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bert_dir(tiny_model, tmp_path):
    path = tmp_path / "tiny-bert"
    tiny_model("bert").save_pretrained(path)
    return path


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
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
