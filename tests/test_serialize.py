"""save_pretrained / from_pretrained: a fresh process rebuilds bit-equal models; bad directories get named errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
import transformers
from torch import nn

import m2convert as m2
from m2convert.errors import CheckpointError, M2Error, ModelLoadError
from m2convert.safetensors_header import read_safetensors_header
from m2convert.serialize import from_pretrained, parameters_on_meta, save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")      # bit equality across processes: same thread count
SMALL = m2.ConvertConfig(filter_order=16)

LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)
    import m2convert as m2
    root = sys.argv[1]
    inputs, out = load_file(root + "/inputs.safetensors"), {}
    for name in sys.argv[2:]:
        model = m2.from_pretrained(root + "/" + name)
        feed = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(name + ".")}
        with torch.no_grad():
            out[name] = model(**feed)[0].contiguous()
    save_file(out, root + "/outputs.safetensors")
""")


def test_round_trip_in_a_fresh_process_is_bit_equal(tmp_path, tiny_model, tiny_inputs, minilm, minilm_plan):
    models = {f: m2.convert(tiny_model(f), SMALL) for f in ("bert", "gpt2", "llama")}
    models["minilm"] = minilm_plan.apply()
    feeds = {f: tiny_inputs(9) for f in ("bert", "gpt2", "llama")}
    feeds["minilm"] = dict(minilm[1](["a converted model", "saved and loaded again, bit for bit"],
                                     padding=True, return_tensors="pt"))
    expected, flat_inputs = {}, {}
    for name, model in models.items():
        save_pretrained(model, tmp_path / name)
        with torch.no_grad():
            expected[name] = model(**feeds[name])[0]
        flat_inputs.update({f"{name}.{k}": v for k, v in feeds[name].items()})
    save_file(flat_inputs, str(tmp_path / "inputs.safetensors"))
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tmp_path), *models], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = load_file(str(tmp_path / "outputs.safetensors"))
    for name in models:
        assert torch.equal(outputs[name], expected[name]), name

    # The loaded models keep ties, plan, generation settings and (for MiniLM) the tokenizer.
    gpt2 = from_pretrained(tmp_path / "gpt2")
    assert type(gpt2) is type(models["gpt2"]) and not gpt2.training
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert gpt2.m2convert_plan == models["gpt2"].m2convert_plan
    meta = json.loads((tmp_path / "gpt2" / "m2convert.json").read_text())
    assert meta["aliases"] == [["transformer.wte.weight", "lm_head.weight"]]
    assert (tmp_path / "gpt2" / "generation_config.json").is_file()
    assert {"vocab.txt", "tokenizer_config.json"} <= set(json.loads(
        (tmp_path / "minilm" / "m2convert.json").read_text())["tokenizer_files"])
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "minilm")
    assert tokenizer("hello world")["input_ids"] == minilm[1]("hello world")["input_ids"]


def test_the_models_own_save_pretrained_writes_the_m2convert_folder(tmp_path, tiny_model, tiny_inputs):
    converted = m2.convert(tiny_model("gpt2"), SMALL)
    save_pretrained(converted, tmp_path / "ours")
    converted.save_pretrained(tmp_path / "own")
    names = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "own").iterdir())
    assert all((tmp_path / "ours" / n).read_bytes() == (tmp_path / "own" / n).read_bytes() for n in names)
    loaded = from_pretrained(tmp_path / "own")
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_inputs()).logits, converted(**tiny_inputs()).logits)

    # transformers' own method, bypassing the converted model's: same weights, no m2convert.json.
    type(converted).save_pretrained(converted, tmp_path / "hf")
    ours, theirs = load_file(str(tmp_path / "ours/model.safetensors")), load_file(str(tmp_path / "hf/model.safetensors"))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(CheckpointError, match="m2convert.json"):
        from_pretrained(tmp_path / "hf")
    loaded = from_pretrained(tmp_path / "hf", plan=converted.m2convert_plan)
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_inputs()).logits, converted(**tiny_inputs()).logits)


def test_structure_is_built_on_meta_with_real_buffers():
    with parameters_on_meta():
        layer = m2.M2SequenceMixer(8, mode="causal", filter_order=4).to(device="meta")
    assert all(p.is_meta for p in layer.parameters())
    assert all(not b.is_meta for b in layer.buffers()) and len(list(layer.buffers())) > 0
    assert not nn.Linear(2, 2).weight.is_meta                                  # patches undone on exit


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    from conftest import _gpt2

    path = tmp_path_factory.mktemp("saved") / "gpt2"
    save_pretrained(m2.convert(_gpt2(), SMALL), path)
    return path


def _rewrite_weights(path, change):
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-64])


BAD = {
    "corrupt file": (lambda p: (p / "model.safetensors").write_bytes(b"\x00garbage" * 40), "not a safetensors"),
    "truncated file": (_truncate, "truncated: tensor '"),
    "missing key": (lambda p: _rewrite_weights(p, lambda t: t.pop("transformer.h.1.attn.mixer.D")),
                    "lacks tensor 'transformer.h.1.attn.mixer.D'"),
    "shape mismatch": (lambda p: _rewrite_weights(p, lambda t: t.update({"transformer.ln_f.bias": torch.zeros(3)})),
                       r"'transformer.ln_f.bias' has shape \(3,\) but the model expects \(32,\)"),
    "unexpected key": (lambda p: _rewrite_weights(p, lambda t: t.update({"extra.weight": torch.zeros(1)})),
                       "extra.weight"),
    "foreign json": (lambda p: (p / "m2convert.json").write_text('{"format": "something-else"}'), "format"),
    "newer format": (lambda p: (p / "m2convert.json").write_text(
        (p / "m2convert.json").read_text().replace('"format_version": 1', '"format_version": 99')), "upgrade"),
    "broken json": (lambda p: (p / "m2convert.json").write_text("{not json"), "cannot read"),
    "not an m2convert save": (lambda p: (p / "m2convert.json").unlink(), "not an m2convert save"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "no weight file"),
    "recurrent layout of another model": (lambda p: _rewrite_meta(p, recurrent={
        "transformer.h.0.attn": {"state_size": 4, "horizon": 128}}), "recurrent layout .*transformer.h.0.attn"),
    "malformed recurrent layout": (lambda p: _rewrite_meta(p, recurrent={"transformer.h.0.attn.mixer": 4}),
                                   "recurrent layout"),
}


def _rewrite_meta(path, **changes):
    meta = json.loads((path / "m2convert.json").read_text())
    meta.update(changes)
    (path / "m2convert.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_directories_get_a_named_error(tmp_path, saved_gpt2, case):
    damage, message = BAD[case]
    path = tmp_path / "copy"
    shutil.copytree(saved_gpt2, path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as info:
        from_pretrained(path)
    assert isinstance(info.value, M2Error)


def test_save_refuses_unconverted_models_and_files(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="m2convert_plan"):
        save_pretrained(tiny_model("bert"), tmp_path / "x")
    (tmp_path / "file").write_text("")
    converted = m2.convert(tiny_model("bert"), SMALL)
    with pytest.raises(CheckpointError, match="is a file"):
        save_pretrained(converted, tmp_path / "file")


def test_the_header_reader_accepts_any_dtype_and_checks_the_bytes_of_known_ones(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3, 4), "u": torch.zeros(2, dtype=torch.uint16)}, str(path))
    header = read_safetensors_header(path)
    assert (header["w"].dtype, header["w"].shape, header["w"].end - header["w"].start) == ("F32", (3, 4), 48)
    assert header["u"].dtype == "U16"                                     # a dtype m2convert never saves
    data = path.read_bytes()
    assert data.count(b'"shape":[3,4]') == 1
    path.write_bytes(data.replace(b'"shape":[3,4]', b'"shape":[3,5]'))    # 60 bytes by shape, 48 on disk
    with pytest.raises(CheckpointError, match="'w' has 48 bytes for shape"):
        read_safetensors_header(path)


def test_load_model_points_converted_folders_to_from_pretrained(tmp_path):
    model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=64))
    m2.save_pretrained(m2.convert(model, m2.ConvertConfig(filter_order=8)), tmp_path / "m2")
    with pytest.raises(ModelLoadError, match=r"m2.from_pretrained"):
        m2.load_model(str(tmp_path / "m2"))


@pytest.fixture(scope="module")
def recurrent_gpt2():
    from conftest import _gpt2

    converted = m2.convert(_gpt2(), SMALL)
    converted.generation_config.eos_token_id = None         # always generate every requested token
    converted.generation_config.pad_token_id = 0
    return converted, m2.to_recurrent(converted, state_size=4, horizon=128).model


def test_a_recurrent_model_saves_and_loads_bit_equal(tmp_path, recurrent_gpt2, tiny_inputs):
    converted, recurrent = recurrent_gpt2
    recurrent.save_pretrained(tmp_path / "rec")
    meta = json.loads((tmp_path / "rec" / "m2convert.json").read_text())
    assert sorted(meta["recurrent"]) == [f"transformer.h.{i}.attn.mixer" for i in range(2)]
    assert meta["recurrent"]["transformer.h.1.attn.mixer"]["state_size"] == 4
    loaded = m2.from_pretrained(tmp_path / "rec")
    mixer = loaded.transformer.h[1].attn.mixer
    assert (type(mixer.filter).__name__, mixer.filter.state_size, mixer.filter.horizon) == ("RecurrentFilter", 4, 128)
    assert mixer.filter.total_error == recurrent.transformer.h[1].attn.mixer.filter.total_error
    inputs = tiny_inputs(9)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, recurrent(**inputs).logits)
        assert not torch.equal(loaded(**inputs).logits, converted(**inputs).logits)   # the fit is not exact
    ids = inputs["input_ids"][:1]
    assert torch.equal(loaded.generate(ids, max_new_tokens=24, do_sample=False),
                       recurrent.generate(ids, max_new_tokens=24, do_sample=False))
    loaded.save_pretrained(tmp_path / "again")                            # a loaded recurrent model saves alike
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("again", "rec")]
    assert weights[0] == weights[1]
    assert json.loads((tmp_path / "again" / "m2convert.json").read_text())["recurrent"] == meta["recurrent"]


def test_saves_without_a_recurrent_layout_still_load(tmp_path, recurrent_gpt2, tiny_inputs):
    converted = recurrent_gpt2[0]
    save_pretrained(converted, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "m2convert.json").read_text())
    assert meta["recurrent"] == {}
    del meta["recurrent"]
    (tmp_path / "old" / "m2convert.json").write_text(json.dumps(meta))   # as written before layouts were saved
    loaded = from_pretrained(tmp_path / "old")
    inputs = tiny_inputs(9)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, converted(**inputs).logits)


def test_plans_and_diffs_show_the_recurrent_form(tmp_path, recurrent_gpt2):
    from conftest import _gpt2

    from m2convert.passes.diff import recurrent_text

    converted, recurrent = recurrent_gpt2
    fits = {s["fqn"]: s["settings"].get("recurrent") for s in recurrent.m2convert_plan["sites"]}
    assert fits["transformer.h.0.mlp"] is None and "recurrent" not in converted.m2convert_plan["sites"][0]["settings"]
    fit = fits["transformer.h.0.attn"]
    mixer = recurrent.transformer.h[0].attn.mixer
    assert (fit["state_size"], fit["horizon"]) == (4, 128)
    filters = (mixer.filter, mixer.residual_filter)
    assert (fit["filter_error"], fit["residual_error"]) == tuple(f.total_error for f in filters)
    assert fit["max_channel_error"] == max(float(f.fit_error.max()) for f in filters)
    plan = m2.RewritePlan.from_dict(json.loads(json.dumps(recurrent.m2convert_plan)))
    assert plan.to_dict()["sites"][0]["settings"]["recurrent"] == fit             # round-trips, PLAN_VERSION 2
    worst = max(fit["filter_error"], fit["residual_error"])
    assert f"S=4, fit {worst:.1e}" in plan.table() and "recurrent" not in m2.RewritePlan.from_dict(
        converted.m2convert_plan).table()
    save_pretrained(recurrent, tmp_path / "rec")
    saved = json.loads((tmp_path / "rec" / "m2convert.json").read_text())["plan"]
    assert saved["sites"][0]["settings"]["recurrent"] == fit
    changes = {c.path: c for c in m2.diff(_gpt2(), recurrent).changes}
    assert changes["transformer.h.0.attn"].recurrent == fit and changes["transformer.h.0.mlp.c_fc"].recurrent is None
    lines = str(m2.diff(_gpt2(), recurrent)).splitlines()
    assert sum("attn" in line and line.endswith(f"recurrent {recurrent_text(fit)}") for line in lines) == 1
    assert all(c.recurrent is None for c in m2.diff(_gpt2(), converted).changes)
