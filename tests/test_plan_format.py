"""Saved plans keep loading across plan format versions.

tests/data/plan_v1 holds a tiny BERT and a tiny GPT-2 converted and saved by m2convert 0.1.0 (plan format
version 1, untyped site layouts; made by make_saves.py there), with their outputs on fixed inputs.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import m2convert as m2
from m2convert.kernels.testing import assert_close
from m2convert.passes.plan import RewritePlan

SAVES = Path(__file__).parent / "data" / "plan_v1"


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_version_1_save_loads_the_same_model(name):
    expected = load_file(SAVES / "expected.safetensors")
    model = m2.from_pretrained(SAVES / name).eval()
    with torch.no_grad():
        out = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
    got = out.last_hidden_state if name == "bert" else out.logits
    # The same model: equal up to float32 rounding (the CPU kernels' GEMM and FFT groupings may change
    # between versions, and with them the order of the additions).
    assert_close(got, expected[name], 1e-5, name)


def test_version_1_plan_reads_into_typed_sites():
    import json
    plan_dict = json.loads((SAVES / "bert" / "m2convert.json").read_text())["plan"]
    assert plan_dict["version"] == 1
    plan = RewritePlan.from_dict(plan_dict)
    attention = next(s for s in plan.sites if s.kind == "sequence")
    assert attention.layout.hidden == 32 and attention.layout.heads == 2
    assert attention.layout.norm.path == "encoder.layer.0.attention.output.LayerNorm"
    assert attention.roles["q"].path.endswith("attention.self.query")
    mlp = next(s for s in plan.sites if s.kind == "dimension")
    assert mlp.layout.activation == "gelu"
    again = RewritePlan.from_dict(plan.to_dict())
    assert again.to_dict()["version"] > 1
    assert [s.to_dict() for s in again.sites] == [s.to_dict() for s in plan.sites]


def test_newer_plan_version_is_refused():
    import json
    plan_dict = json.loads((SAVES / "bert" / "m2convert.json").read_text())["plan"]
    plan_dict["version"] = 99
    with pytest.raises(m2.M2Error, match="version 99"):
        RewritePlan.from_dict(plan_dict)
