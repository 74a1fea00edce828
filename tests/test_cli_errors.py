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
    (["plan", "{root}/bert", "--input", "input_ids=2x16"],
     "argument --input: input 'input_ids=2x16' is not of the form NAME=SHAPE:DTYPE, e.g. input_ids=1x128:int64"),
    (["convert", "{root}/bert", "--out", "{root}/o", "--input", "input_ids=2,16:int64"],
     "input 'input_ids=2,16:int64' is not of the form NAME=SHAPE:DTYPE"),
    (["plan", "{root}/bert", "--input", "input_ids=2x16:int65"], "input 'input_ids=2x16:int65': unknown DTYPE 'int65'"),
    (["plan", "{root}/bert", "--input", "input_ids=2x0:int64"], "every size in SHAPE must be at least 1"),
    (["plan", "{root}/bert", "--inputs", "{root}/file.txt"], "inputs file '{root}/file.txt' is not a readable"),
    (["plan", "{root}/bert", "--inputs", "{root}/none.safetensors"], "inputs file '{root}/none.safetensors' does not"),
])
def test_cli_bad_input_is_one_line(dirs, argv, needle):
    code, err = _run([a.format(root=dirs) for a in argv])
    assert code in (1, 2)
    assert needle.format(root=dirs) in _one_line(err)


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


@pytest.mark.parametrize("argv, code, needle", [
    (["plan", "{root}/good", "--input", "pixel_values=1x3x16x16"], 2, "is not of the form NAME=SHAPE:DTYPE"),
    (["export", "{root}/good", "--out", "{root}/x.pt2", "--input", "input_ids=1x16:long"], 2, "unknown DTYPE 'long'"),
    (["convert", "{root}/good", "--out", "{root}/x", "--inputs", "{root}/none.safetensors"], 1, "does not exist"),
])
def test_cli_checks_example_inputs_before_loading(saved, monkeypatch, argv, code, needle):
    def refuse(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(api, "load_model", refuse)
    monkeypatch.setattr("m2convert.serialize.from_pretrained", refuse)
    got, err = _run([a.format(root=saved) for a in argv])
    assert got == code and needle in _one_line(err), err


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    """A tiny saved WhisperModel: its forward takes input_features, which no config describes."""
    from conftest import _whisper

    path = tmp_path_factory.mktemp("whisper") / "whisper"
    _whisper().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted_bert(saved):
    import m2convert as m2

    m2.save_pretrained(m2.convert(_bert(layers=1), m2.ConvertConfig(filter_order=8)), saved / "converted")
    return saved / "converted"


# Library advice names Python arguments (example_inputs=, dynamic_seq=False); on the command line each
# becomes the options that do the same.
ADVICE = re.compile(r"[Pp]ass example_inputs|example_inputs match|dynamic_seq")


@pytest.mark.parametrize("argv, needle", [
    (["plan", "{whisper}"], "give --input NAME=SHAPE:DTYPE (repeatable) or --inputs FILE.safetensors"),
    (["plan", "{root}/good", "--input", "not_an_input=1x4:int64"], "give --input NAME=SHAPE:DTYPE"),
    (["export", "{converted}", "--out", "{root}/a.pt2", "--seq-len", "1"], "or pass --static to export static"),
    (["export", "{converted}", "--out", "{root}/b.pt2", "--input", "not_an_input=1x4:int64"],
     "Check that the example inputs (--input/--inputs) match its forward; pass --static if the model fixes"),
])
def test_cli_errors_name_cli_options_not_python_arguments(saved, converted_bert, whisper_dir, argv, needle):
    fill = dict(root=saved, converted=converted_bert, whisper=whisper_dir)
    code, err = _run([a.format(**fill) for a in argv])
    line = _one_line(err)
    assert code == 1 and needle in line and not ADVICE.search(line), line


def test_every_library_advice_has_cli_wording():
    """Each raise in the package whose message advises example_inputs=/dynamic_seq reads with CLI options."""
    import ast
    from pathlib import Path

    from m2convert.cli import cli_wording

    root = Path(__file__).resolve().parents[1]
    messages = []
    for path in [*root.glob("passes/*.py"), *root.glob("m2convert/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = "".join(n.value for n in ast.walk(node.exc) if isinstance(n, ast.Constant)
                               and isinstance(n.value, str))
                messages += [(path.name, text)] if ADVICE.search(text) else []
    assert len(messages) >= 4, messages                # capture, inputs, export: the advice exists to be reworded
    left = [(name, m) for name, m in messages if ADVICE.search(cli_wording(m))]
    assert not left, left


def test_m2_debug_shows_the_traceback_of_an_m2error(saved, monkeypatch):
    monkeypatch.setenv("M2_DEBUG", "1")
    code, err = _run(["plan", str(saved / "missing-folder")])
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("m2convert: error: ")
    monkeypatch.delenv("M2_DEBUG")
    code, err = _run(["plan", str(saved / "missing-folder")])
    assert code == 1 and "Traceback" not in err
