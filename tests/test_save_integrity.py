"""A save records SHA-256 hashes of its weight file's header and of every tensor; loading checks them, so a
flipped byte anywhere in model.safetensors is a CheckpointError naming the file (and the tensor, for a
byte in tensor data), also through ``m2convert export``. Saves without hashes still load."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct

import pytest
import torch

import m2convert as m2
from m2convert.cli import main
from m2convert.errors import CheckpointError
from m2convert.safetensors_header import read_safetensors_header

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import _gpt2

    path = tmp_path_factory.mktemp("integrity") / "gpt2"
    m2.save_pretrained(m2.convert(_gpt2(), m2.ConvertConfig(filter_order=16)), path)
    return path


def _copy(saved, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(saved, path)
    return path, path / "model.safetensors"


def _data_start(weights) -> int:
    return 8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]


def _flip(weights, offset: int, mask: int = 0x01) -> None:
    data = bytearray(weights.read_bytes())
    data[offset] ^= mask
    weights.write_bytes(bytes(data))


def _nan_flip(weights) -> tuple[str, int, int]:
    """(tensor, offset, mask): one byte whose flip turns an F32 weight into NaN.

    F32 bytes are little-endian: the last byte holds the sign and the top 7 exponent bits, the one before
    it the lowest exponent bit. A weight whose lowest exponent bit is set and whose mantissa is not zero
    becomes NaN when its last byte is set to 0x7F (all exponent bits set).
    """
    start, raw = _data_start(weights), weights.read_bytes()
    for name, entry in read_safetensors_header(weights).items():
        if entry.dtype != "F32":
            continue
        for at in range(start + entry.start, start + entry.end, 4):
            b0, b1, b2, b3 = raw[at:at + 4]
            if b2 & 0x80 and (b2 & 0x7F or b1 or b0) and b3 != 0x7F:
                return name, at + 3, b3 ^ 0x7F
    raise AssertionError("no F32 weight to turn into NaN")


def test_an_unchanged_save_loads_and_records_every_tensor(saved):
    meta = json.loads((saved / "m2convert.json").read_text())
    header = read_safetensors_header(saved / "model.safetensors")
    assert meta["hashes"]["algorithm"] == "sha256" and meta["hashes"]["header_bytes"] == _data_start(
        saved / "model.safetensors")
    assert sorted(meta["hashes"]["tensors"]) == sorted(header)
    m2.from_pretrained(saved)


def _header_offsets(weights) -> dict[str, int]:
    raw = weights.read_bytes()
    return {"size prefix": 0, "metadata value": raw.index(b'"pt"') + 1, "last header byte": _data_start(weights) - 1}


@pytest.mark.parametrize("where", ["size prefix", "metadata value", "last header byte"])
def test_a_flipped_header_byte_names_the_file(saved, tmp_path, where):
    path, weights = _copy(saved, tmp_path)
    _flip(weights, _header_offsets(weights)[where])
    with pytest.raises(CheckpointError) as info:
        m2.from_pretrained(path)
    assert str(weights) in str(info.value)


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_flipped_tensor_byte_names_the_tensor(saved, tmp_path, which):
    path, weights = _copy(saved, tmp_path)
    entries = sorted(read_safetensors_header(weights).items(), key=lambda item: item[1].start)
    name, entry = entries[0] if which == "first" else entries[-1]
    offset = _data_start(weights) + (entry.start if which == "first" else entry.end - 1)
    _flip(weights, offset)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' .* does not match the sha256 recorded") as info:
        m2.from_pretrained(path)
    assert str(weights) in str(info.value)


def test_a_byte_that_makes_a_weight_nan_is_caught_and_the_export_command_fails(saved, tmp_path):
    path, weights = _copy(saved, tmp_path)
    name, offset, mask = _nan_flip(weights)
    _flip(weights, offset, mask)
    from safetensors.torch import load_file
    assert load_file(str(weights))[name].isnan().any()                     # the flip did make a NaN
    with pytest.raises(CheckpointError, match=f"tensor '{name}'"):
        m2.from_pretrained(path)

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", str(path), "--out", str(tmp_path / "x.pt2")])
    assert code == 1 and f"tensor '{name}'" in err.getvalue() and err.getvalue().startswith("m2convert: error: ")
    assert not (tmp_path / "x.pt2").exists()

    # A save without recorded hashes (written before they were) loads unchecked: the NaN goes through.
    meta = json.loads((path / "m2convert.json").read_text())
    del meta["hashes"]
    (path / "m2convert.json").write_text(json.dumps(meta))
    assert m2.from_pretrained(path).state_dict()[name].isnan().any()


@pytest.mark.parametrize("damage, needle", [
    (lambda h: h.pop("tensors"), "'hashes' entry is malformed"),
    (lambda h: h.update(algorithm="md5"), "'md5' hashes"),
])
def test_a_damaged_hash_record_is_named(saved, tmp_path, damage, needle):
    path, _ = _copy(saved, tmp_path)
    meta = json.loads((path / "m2convert.json").read_text())
    damage(meta["hashes"])
    (path / "m2convert.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=needle):
        m2.from_pretrained(path)


def test_the_auto_classes_check_the_hashes_too(saved, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    path, weights = _copy(saved, tmp_path)
    name, entry = max(read_safetensors_header(weights).items(), key=lambda item: item[1].end - item[1].start)
    _flip(weights, _data_start(weights) + entry.start + 5)
    with pytest.raises(CheckpointError, match=f"tensor '{name}'"):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
