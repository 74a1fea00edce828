"""Bad command lines: one line ``m2convert: error: ...``, exit 1 (an M2Error) or 2 (bad arguments), no
traceback; values are checked before a model is loaded, and unexpected errors are cut to one short line."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m2convert import api
from m2convert.cli import main

transformers = pytest.importorskip("transformers")
PROGRESS = re.compile(r"\d+%\|")


def _one_line(err: str) -> str:
    """The single error line of ``err``; progress-bar frames (``37%|###``) may precede it."""
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("m2convert: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny saved BERT, a plain file, a folder without config.json and one with a corrupt config.json."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(root / "bert")
    (root / "file.txt").write_text("not a model")
    (root / "empty").mkdir()
    (root / "badconfig").mkdir()
    (root / "badconfig" / "config.json").write_text("{ not json")
    return root


SUBPROCESS_CASES = [
    ([], 2, "required: COMMAND"),
    (["plan", "{root}/bert", "--filter-emb-dim", "4"], 1, "filter_emb_dim=4 must be odd"),
    (["plan", "{root}/no/such/dir"], 1, "does not exist"),
    (["export", "{root}/bert", "--out", "{root}/x.pt2"], 1, "is not an m2convert save"),
]


def test_cli_subprocess_bad_input_is_one_line(dirs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "m2convert", *[a.format(root=dirs) for a in argv]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for argv, _, _ in SUBPROCESS_CASES]
    for proc, (argv, code, needle) in zip(procs, SUBPROCESS_CASES):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == code, (argv, err)
        assert needle in _one_line(err), (argv, err)
        assert out == "", (argv, out)


def _run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


@pytest.mark.parametrize("argv, needle", [
    (["plan", "{root}/empty"], "has no config.json"),
    (["plan", "{root}/file.txt"], "is a file"),
    (["plan", "{root}/bert", "--nblocks", "four"], "invalid int value: 'four'"),
    (["plan", "{root}/badconfig"], "could not load"),
    (["convert", "{root}/bert", "--out", "{root}/file.txt", "--filter-order", "8"], "is a file"),
    (["plan", "{root}/bert", "--skip", "[a-"], "does not compile"),
    (["plan", "{root}/bert", "--seq-len", "0"], "seq_len=0 is out of range"),
    (["convert", "{root}/bert"], "required: --out"),
    (["plan", "{root}/bert", "--rank", "2.5"], "invalid int value: '2.5'"),
])
def test_cli_bad_input_is_one_line(dirs, argv, needle):
    code, err = _run([a.format(root=dirs) for a in argv])
    assert code in (1, 2)
    assert needle in _one_line(err)


@settings(max_examples=25, deadline=None)
@given(flag=st.sampled_from(["--nblocks", "--projection-nblocks", "--rank", "--filter-order", "--filter-emb-dim",
                             "--seq-len"]),
       value=st.one_of(st.integers(-(2 ** 31), 2 ** 31).map(str), st.sampled_from(["", "x", "1e3", "0x10", "-"])))
def test_cli_any_numeric_setting_without_a_model_fails_in_one_line(flag, value):
    code, err = _run(["plan", "/nonexistent/m2convert-model", flag, value])
    assert code in (1, 2)
    _one_line(err)


def _bert(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    _bert(layers=1).save_pretrained(root / "good")
    return root


def test_cli_unexpected_error_is_one_short_line(saved, monkeypatch):
    monkeypatch.delenv("M2_DEBUG", raising=False)
    message = "x" * 1000 + "\nsecond line\n  File 'y.py', line 3\n"

    def broken(_):
        raise RuntimeError(message)

    monkeypatch.setattr(api, "load_model", broken)
    code, err = _run(["plan", str(saved / "good")])
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("m2convert: error: unexpected RuntimeError: xxx") and "M2_DEBUG=1" in lines[0]
    assert "second line" not in err and len(lines[0]) < 420


def test_cli_convert_checks_out_before_loading(saved, monkeypatch):
    loads = []
    monkeypatch.setattr(api, "load_model", lambda name: loads.append(name) or _bert(layers=1))
    target = saved / "out-file"
    target.write_text("taken")
    code, err = _run(["convert", str(saved / "good"), "--out", str(target), "--filter-order", "8"])
    assert code == 1 and f"--out {target} is a file; give a directory" in err and not loads
    code, err = _run(["convert", str(saved / "good"), "--out", str(target / "sub"), "--filter-order", "8"])
    assert code == 1 and "is a file" in err and not loads


def test_cli_refuses_a_huge_filter_order(saved, monkeypatch):
    def refuse(_):                                    # were the value accepted, planning would allocate
        raise AssertionError("the model was loaded")  # 65536 x 65536 filter weights

    monkeypatch.setattr(api, "load_model", refuse)
    code, err = _run(["plan", str(saved / "good"), "--filter-order", "65536"])
    assert code == 1 and "filter_order=65536 is out of range; valid range is [1, 4096]" in err
