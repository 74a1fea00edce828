"""Bad configuration values and command lines: a named ConfigError in Python; on the command line one
line ``m2convert: error: ...``, a non-zero exit and no traceback."""

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

import m2convert as m2
from m2convert.cli import main
from m2convert.config import CAUSAL_MODES
from m2convert.errors import CaptureError, ConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")
FAST = settings(max_examples=40, deadline=None)
PROGRESS = re.compile(r"\d+%\|")
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
