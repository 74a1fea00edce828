"""Corner cases of planning, loading and the command line that must not go wrong quietly.

Planning leaves every submodule's train/eval flag as it was; a module object reachable by two paths
and weights tied between two converted linears are skipped with a reason (strict raises); a model on
the meta device is refused by name. Loading reads safetensors only and wraps every failure into a
named M2Error. The CLI prints one line for unexpected errors and checks ``--out`` before any work.
Per-site settings have upper limits, also inside overrides.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

import m2convert as m2
from m2convert import api
from m2convert.cli import main
from m2convert.errors import CheckpointError, ConfigError, ConversionError, ModelLoadError, UnsupportedModelError
from m2convert.layers import M2Block, MonarchLinear
from m2convert.passes.capture import capture

transformers = pytest.importorskip("transformers")
SMALL = m2.ConvertConfig(filter_order=16)


def _bert(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    return transformers.BertModel(cfg).eval()


def _flags(model) -> list[tuple[str, bool]]:
    return [(name, module.training) for name, module in model.named_modules()]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(model, before: dict) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


# 1. capture restores each module's own mode -------------------------------------------------------

def test_plan_restores_every_submodules_own_training_flag():
    model = _bert().train()
    model.encoder.layer[0].eval()                         # e.g. a frozen layer
    model.pooler.dense.eval()
    before, weights = _flags(model), _weights(model)
    assert not model.encoder.layer[0].training and model.encoder.layer[1].training
    plan = m2.plan(model, SMALL)
    assert plan.converted
    assert _flags(model) == before
    assert _same_weights(model, weights)


# 2. one module object at two paths ----------------------------------------------------------------

def test_shared_module_is_skipped_with_reason_and_strict_raises():
    model = _bert()
    model.encoder.layer[1] = model.encoder.layer[0]       # one object, two paths
    captured = capture(model)
    assert "?" not in captured.calls                      # hooks name paths even when export copies modules
    assert captured.shared["encoder.layer.1"] == ("encoder.layer.0", "encoder.layer.1")

    plan = m2.plan(model, SMALL)
    assert len(plan.sites) == 4 and not plan.converted
    for site in plan.sites:
        assert site.status == "skip"
        assert "module object shared by paths 'encoder.layer.0' and 'encoder.layer.1'" in site.reason
        assert "copy.deepcopy" in site.reason
    converted = plan.apply()
    assert converted.encoder.layer[0] is converted.encoder.layer[1]
    assert not any(isinstance(m, (M2Block, MonarchLinear)) for m in converted.modules())

    with pytest.raises(ConversionError, match="module object shared by paths"):
        m2.convert(model, SMALL, strict=True)
    assert model.encoder.layer[0] is model.encoder.layer[1]

    # excluding the sites, as the reason suggests, is accepted under strict
    kept = m2.convert(model, SMALL, strict=True, overrides={r"encoder\.layer\.": None})
    assert kept.encoder.layer[0] is kept.encoder.layer[1]


def test_shared_submodule_skips_both_sites_that_hold_it():
    model = _bert()
    model.encoder.layer[1].attention.self.query = model.encoder.layer[0].attention.self.query
    plan = m2.plan(model, SMALL)
    attention = [s for s in plan.sites if s.kind == "sequence"]
    assert len(attention) == 2
    assert all(s.status == "skip" and "encoder.layer.0.attention.self.query" in s.reason for s in attention)
    assert {s.status for s in plan.sites if s.kind == "dimension"} == {"convert"}


# 3. weights tied between converted linears --------------------------------------------------------

def test_tied_mlp_weights_are_skipped_and_strict_raises():
    model = _bert()
    model.encoder.layer[1].intermediate.dense.weight = model.encoder.layer[0].intermediate.dense.weight
    plan = m2.plan(model, SMALL)
    mlps = [s for s in plan.sites if s.kind == "dimension"]
    assert len(mlps) == 2 and all(s.status == "skip" and "tied weights" in s.reason for s in mlps)
    assert "'encoder.layer.1.intermediate.dense.weight'" in mlps[0].reason
    assert {s.status for s in plan.sites if s.kind == "sequence"} == {"convert"}
    converted = plan.apply()
    assert converted.encoder.layer[1].intermediate.dense.weight is converted.encoder.layer[0].intermediate.dense.weight
    with pytest.raises(ConversionError, match="tied weights"):
        m2.convert(model, SMALL, strict=True)


def test_gpt2_tied_lm_head_still_converts():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    plan = m2.plan(model, SMALL)
    assert len(plan.converted) == 4 and not plan.skipped
    converted = plan.apply()
    assert converted.lm_head.weight is converted.transformer.wte.weight


# 4. meta device -----------------------------------------------------------------------------------

def test_meta_model_is_refused_by_name_and_saved_models_still_load(tmp_path):
    model = _bert().to("meta")
    with pytest.raises(UnsupportedModelError, match=r"'meta' device .*to_empty"):
        m2.plan(model)
    with pytest.raises(UnsupportedModelError, match="'meta' device"):
        m2.convert(model)

    # loading a converted model builds it on meta and applies the plan with seed=False
    converted = m2.convert(_bert(layers=1), SMALL)
    m2.save_pretrained(converted, tmp_path / "m2")
    loaded = m2.from_pretrained(tmp_path / "m2")
    assert isinstance(loaded.encoder.layer[0].attention, M2Block)
    assert not any(p.is_meta for p in loaded.parameters())


# 5. load_model reads safetensors only and names every failure ---------------------------------------

class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    _bert(layers=1).save_pretrained(root / "good")
    return root


def _copy(saved: Path, name: str) -> Path:
    import shutil
    return Path(shutil.copytree(saved / "good", saved / name))


def test_load_model_refuses_pickled_checkpoints_without_unpickling(saved):
    marker = saved / "code-ran"
    folder = saved / "pickled"
    folder.mkdir()
    _bert(layers=1).config.save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\).*safetensors"):
        api.load_model(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda data: data[: len(data) // 2], "is truncated"),
    (lambda data: b"garbage" * 10, "not a safetensors file"),
])
def test_load_model_names_a_corrupt_safetensors_file(saved, damage, needle):
    folder = _copy(saved, f"damaged-{needle.split()[-1]}")
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=needle):
        api.load_model(str(folder))


def test_load_model_names_a_config_that_disagrees_with_the_weights(saved):
    import json

    folder = _copy(saved, "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json does not match its weights \(tensor '.*' is \[32"):
        api.load_model(str(folder))


@pytest.mark.parametrize("raised, kind", [
    ("safetensors", CheckpointError),
    ("unpickling", CheckpointError),
    ("runtime", ModelLoadError),
])
def test_load_model_wraps_whatever_the_loader_raises(saved, monkeypatch, raised, kind):
    import safetensors

    errors = {"safetensors": safetensors.SafetensorError("Error while deserializing header: incomplete metadata"),
              "unpickling": pickle.UnpicklingError("Weights only load failed"),
              "runtime": RuntimeError("something else\nwith a second line")}

    def broken(*args, **kwargs):
        assert kwargs.get("use_safetensors") is True            # never falls back to pickled weights
        raise errors[raised]

    monkeypatch.setattr(transformers.BertModel, "from_pretrained", broken)
    with pytest.raises(kind) as info:
        api.load_model(str(saved / "good"))
    assert str(saved / "good") in str(info.value) and "\n" not in str(info.value)


# 6. and 7. the command line -----------------------------------------------------------------------

def _run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


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


# 8. upper limits of the filter settings -----------------------------------------------------------

@pytest.mark.parametrize("field, bad, good, shown", [
    ("filter_order", 4097, 4096, "[1, 4096]"),
    ("filter_order", 65536, 1, "[1, 4096]"),
    ("filter_emb_dim", 131, 129, "[3, 129]"),
    ("filter_emb_dim", 255, 3, "[3, 129]"),
])
def test_filter_settings_have_upper_limits_also_in_overrides(field, bad, good, shown):
    with pytest.raises(ConfigError, match=rf"{field}={bad} is out of range; valid range is \{shown}"):
        m2.ConvertConfig(**{field: bad})
    with pytest.raises(ConfigError, match=rf"overrides\['x'\]\['{field}'\]={bad} is out of range.*\{shown}"):
        m2.ConvertConfig(overrides={"x": {field: bad}})
    assert getattr(m2.ConvertConfig(**{field: good}), field) == good
    assert m2.ConvertConfig(overrides={"x": {field: good}}).overrides["x"][field] == good


def test_cli_refuses_a_huge_filter_order(saved, monkeypatch):
    def refuse(_):                                    # were the value accepted, planning would allocate
        raise AssertionError("the model was loaded")  # 65536 x 65536 filter weights

    monkeypatch.setattr(api, "load_model", refuse)
    code, err = _run(["plan", str(saved / "good"), "--filter-order", "65536"])
    assert code == 1 and "filter_order=65536 is out of range; valid range is [1, 4096]" in err
