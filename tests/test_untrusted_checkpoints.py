"""Loading never runs code from a file and names every failure.

Nothing in the source unpickles; a pickle posing as safetensors, a pickled pytorch_model.bin beside a
save or alone, truncated or garbage weights, a config.json that disagrees with its weights and any
error of the underlying loader become a named CheckpointError or ModelLoadError, and no payload runs.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

import m2convert as m2
from m2convert import api
from m2convert.errors import CheckpointError, ModelLoadError

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def _bert(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    return transformers.BertModel(cfg).eval()


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
    """Unpickling this creates ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bert_m2():
    return m2.convert(_bert())


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
