"""Checkpoints: exact resume after a kill, NaN stops with a named error and a usable checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from m2convert.errors import CheckpointError, TrainingError
from m2convert.recover import DistillConfig, StageConfig, distill
from m2convert.recover import checkpoint as ckpt
from test_recover_common import class_batches, convert_bert, one_thread, state, tiny_bert  # noqa: F401


class Killed(Exception):
    pass


def stages():
    return [StageConfig("transfer", steps=5, lr=3e-3),
            StageConfig("kd", steps=5, lr=1e-3, schedule="cosine", warmup_steps=2, hidden_weight=0.5),
            StageConfig("task", steps=4, lr=1e-3, kd_weight=0.5, schedule="linear")]


def make_pair():
    teacher = tiny_bert()
    with torch.no_grad():
        teacher.classifier.weight.mul_(30)
    torch.manual_seed(1)
    return teacher, convert_bert(teacher)


def config(tmp_path, **kw):
    return DistillConfig(stages=stages(), checkpoint_dir=str(tmp_path), checkpoint_every=2, progress=False,
                         seed=3, **kw)


@pytest.mark.parametrize("kill_at", [("kd", 3), ("transfer", 5)])
def test_killed_and_resumed_run_ends_bit_equal_to_an_uninterrupted_one(tmp_path, kill_at):
    batches = class_batches(6)
    teacher, student = make_pair()
    full = distill(student, teacher, batches, config(tmp_path / "full"))
    expected = state(student)

    teacher, student = make_pair()

    def kill(stage, step, loss):
        if (stage, step) == kill_at:
            raise Killed()

    with pytest.raises(Killed):
        distill(student, teacher, batches, config(tmp_path / "killed"), on_step=kill)
    teacher, fresh = make_pair()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)                                              # the checkpoint must overwrite these
    resumed = distill(fresh, teacher, batches, config(tmp_path / "killed", resume=True))
    got = state(fresh)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [s.losses for s in resumed.stages] == [s.losses for s in full.stages]
    assert [s.tokens for s in resumed.stages] == [s.tokens for s in full.stages]


def test_non_finite_loss_names_stage_and_step_and_leaves_a_good_checkpoint(tmp_path):
    batches = class_batches(6)
    teacher, student = make_pair()
    calls = {"n": 0}

    def poison(_module, _inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    cfg = DistillConfig(stages=[StageConfig("kd", steps=6, lr=1e-3)], checkpoint_dir=str(tmp_path),
                        checkpoint_every=100, progress=False)
    handle = student.classifier.register_forward_hook(poison)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) in stage 'kd' at step 2.*last good checkpoint"):
        distill(student, teacher, batches, cfg)
    handle.remove()
    doc = ckpt.read_state(tmp_path / "latest")
    assert doc["state"]["stage_step"] == 2 and doc["state"]["data_position"] == 2
    _, reloaded = make_pair()
    ckpt.load_model_weights(tmp_path / "latest", reloaded)
    now = student.state_dict()
    assert all(torch.equal(v, now[k]) and torch.isfinite(v).all() for k, v in reloaded.state_dict().items()
               if v.is_floating_point())
    result = distill(reloaded, teacher, batches, DistillConfig(**{**cfg.to_dict(), "resume": True}))
    assert result.stages[0].steps == 6 and all(torch.isfinite(torch.tensor(result.stages[0].losses)))


def test_foreign_corrupt_and_mismatched_checkpoints_raise_checkpoint_errors(tmp_path):
    batches = class_batches(2)
    teacher, student = make_pair()
    latest = tmp_path / "latest"
    latest.mkdir()
    (latest / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        distill(student, teacher, batches, config(tmp_path, resume=True))
    (latest / "state.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an m2convert distill checkpoint"):
        distill(student, teacher, batches, config(tmp_path, resume=True))
    (latest / "state.json").unlink()
    distill(student, teacher, batches, DistillConfig(stages=[StageConfig("kd", steps=1)], progress=False,
                                                     checkpoint_dir=str(tmp_path)))
    with pytest.raises(CheckpointError, match="stages"):
        distill(student, teacher, batches, config(tmp_path, resume=True))
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt.load_model_weights(latest, tiny_bert())


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    teacher, student = make_pair()
    result = distill(student, teacher, class_batches(2), config(tmp_path / "none", resume=True))
    assert [s.steps for s in result.stages] == [5, 5, 4]
    assert result.checkpoint_path == str(tmp_path / "none" / "latest")
    assert ckpt.read_state(result.checkpoint_path)["state"]["stage_index"] == 3


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path / "c", model, opt, {"x": 1})
    doc = ckpt.read_state(tmp_path / "c")
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt.load_optimizer(tmp_path / "c", opt2, doc)
    a, b = opt.state_dict(), opt2.state_dict()
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    assert a["param_groups"] == b["param_groups"]
