"""Checkpoints: exact resume after a kill, NaN stops with a named error and a usable checkpoint."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from pathlib import Path

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


def one_stage(folder, **kw):
    return DistillConfig(stages=[StageConfig("kd", steps=3, lr=1e-3)], checkpoint_dir=str(folder),
                         checkpoint_every=1, progress=False, seed=3, **kw)


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


class Warnings(logging.Handler):
    """The WARNING records of the m2convert.recover logger while it is attached."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("m2convert.recover").addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        logging.getLogger("m2convert.recover").removeHandler(self)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    teacher, student = make_pair()
    with Warnings() as warned:
        result = distill(student, teacher, class_batches(2), config(tmp_path / "none", resume=True))
    assert [s.steps for s in result.stages] == [5, 5, 4]
    assert result.checkpoint_path == str(tmp_path / "none" / "latest")
    assert ckpt.read_state(result.checkpoint_path)["state"]["stage_index"] == 3
    assert warned == [f"resume=True but {tmp_path / 'none'} holds no checkpoint; starting from the beginning"]

    (tmp_path / "empty").mkdir()
    with Warnings() as warned:
        result = distill(student, teacher, class_batches(2), one_stage(tmp_path / "empty", resume=True))
    assert result.stages[0].steps == 3 and len(warned) == 1 and "holds no checkpoint" in warned[0]


def test_resume_from_leftovers_of_a_stopped_first_save_raises(tmp_path):
    teacher, student = make_pair()
    (tmp_path / "latest.tmp").mkdir()
    (tmp_path / "latest.tmp" / "model.safetensors").write_bytes(b"half a file")
    leftovers_only = re.escape(str(tmp_path)) + " holds no complete checkpoint, only latest.tmp .*delete"
    with pytest.raises(CheckpointError, match=leftovers_only):
        distill(student, teacher, class_batches(2), one_stage(tmp_path, resume=True))
    distill(student, teacher, class_batches(2), one_stage(tmp_path))     # without resume: starts over, clears
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


class Stop(Exception):
    pass


# The operations save_checkpoint changes the disk with, and which argument names the path.
FILE_OPS = [(Path, "mkdir", 0), (Path, "rename", 0), (Path, "unlink", 0), (os, "replace", 0),
            (shutil, "rmtree", 0), (ckpt, "save_file", 1), (ckpt, "save_model", 1)]


def stop_file_op(monkeypatch, root, k=None) -> list[str]:
    """Raise Stop just before the k-th file operation on ``root`` (never when k is None). Returns the
    list that collects the names of the operations done on ``root``."""
    seen: list[str] = []

    def patch(owner, name, where):
        real = getattr(owner, name)

        def op(*args, **kwargs):
            if str(args[where]).startswith(str(root)):
                seen.append(name)
                if len(seen) == k:
                    raise Stop(f"before {name} {args[where]}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, op)

    for spec in FILE_OPS:
        patch(*spec)
    return seen


@pytest.mark.parametrize("start", ["latest", "between renames"])
def test_a_save_stopped_at_any_point_resumes_from_the_previous_or_the_new_checkpoint(tmp_path, monkeypatch,
                                                                                     start):
    """Start from step 1's checkpoint in ``latest``, or from what a save of step 2 stopped between its
    renames leaves (step 1 in latest.old, step 2 in latest.tmp). Resume, stop the next save before each
    of its file operations in turn, and resume again: the run continues from the previous or the new
    checkpoint, never from the beginning, and ends bit-equal to an uninterrupted run."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)         # a kill, not a power cut: no need to flush
    batches = class_batches(3)
    teacher, student = make_pair()
    fresh = copy.deepcopy(student)
    full = distill(student, teacher, batches, one_stage(tmp_path / "full"))
    expected = state(student)

    base = tmp_path / "base"
    stop = 1 if start == "latest" else 2

    def keep_step1_then_stop(stage, step, loss):
        if step == 1:
            shutil.copytree(base / "latest", tmp_path / "step1")
        if step == stop:
            raise Stop(f"after step {stop}")

    with pytest.raises(Stop):
        distill(copy.deepcopy(fresh), teacher, batches, one_stage(base), on_step=keep_step1_then_stop)
    if start == "between renames":
        (base / "latest").rename(base / "latest.tmp")
        (tmp_path / "step1").rename(base / "latest.old")
    previous, new = stop, stop + 1                  # step 3's checkpoint is the one the stage ends with

    def after_save(stage, step, loss):
        if step == new < 3:                         # step 2's save is done: stop before the next one
            raise Stop("after the save")

    def stopped_resume(name, k=None) -> list[str]:
        """Resume a copy of base and stop its first save before file operation k (k=None: let it end)."""
        shutil.copytree(base, tmp_path / name)
        stopped = None
        with pytest.MonkeyPatch.context() as m:
            seen = stop_file_op(m, tmp_path / name, k)
            try:
                distill(copy.deepcopy(fresh), teacher, batches, one_stage(tmp_path / name, resume=True),
                        on_step=after_save)
            except Stop as e:
                stopped = str(e)
        assert stopped.startswith("before") if k else stopped in (None, "after the save")
        return seen

    ops = stopped_resume("whole")                   # the next save, not stopped, then a stop after it
    assert {"mkdir", "save_file", "save_model", "replace", "rename", "rmtree"} <= set(ops)
    resumed_at = set()
    for k in range(1, len(ops) + 1):
        name = f"stop-{k}"
        stopped_resume(name, k)
        resumed = copy.deepcopy(fresh)
        with torch.no_grad():
            for p in resumed.parameters():
                p.add_(1.0)                                      # the checkpoint must overwrite these
        steps = []
        result = distill(resumed, teacher, batches, one_stage(tmp_path / name, resume=True),
                         on_step=lambda stage, step, loss: steps.append(step))
        at = steps[0] - 1 if steps else 3
        assert at in (previous, new), f"stopped before {ops[k - 1]} #{k}: resumed after step {at}"
        resumed_at.add(at)
        got = state(resumed)
        assert all(torch.equal(got[key], expected[key]) for key in expected), name
        assert result.stages[0].losses == full.stages[0].losses, name
        if steps:                                                # it saved: the leftovers are gone
            assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["latest"], name
    assert resumed_at == {previous, new}
