"""The stage registry: a stage registered here, with its own objective, runs through m2.distill with
the defaults and the inputs its registration names; unknown names are refused; unregistering removes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import m2convert as m2
from m2convert.errors import ConfigError
from m2convert.recover import (MODULE_IO, TEACHER_OUTPUTS, DistillConfig, StageConfig, layer_pairs, register_stage,
                               stage_kind, stage_names, unregister_stage)
from m2convert.recover.stages import first_tensor, model_inputs
from test_recover_common import class_batches, one_thread, state, tiny_bert  # noqa: F401


class LogitRegression(nn.Module):
    """MSE between the student's and the teacher's logits (regression on logits, no temperature)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, batch: dict, teacher_out) -> torch.Tensor:
        return F.mse_loss(self.student(**model_inputs(batch)).logits, teacher_out.logits)


class CosineTransfer(nn.Module):
    """Mean cosine distance of each replaced module, fed the teacher's inputs, to the teacher module's output."""

    def __init__(self, pairs):
        super().__init__()
        self.paths = [p for p, _, _ in pairs]                # the teacher modules MODULE_IO records
        self.layers = nn.ModuleList([s for _, s, _ in pairs])

    def forward(self, calls: dict, mask) -> torch.Tensor:
        terms = []
        for path, layer in zip(self.paths, self.layers):
            for args, kwargs, output in calls[path]:
                pred, target = first_tensor(layer(*args, **kwargs)), first_tensor(output)
                terms.append(1 - F.cosine_similarity(pred, target, dim=-1).mean())
        return torch.stack(terms).mean()


@pytest.fixture
def logit_stage():
    """A ``logit-mse`` stage between kd and task that trains everything; removed after the test."""
    built = []

    def objective(student, teacher, stage):
        built.append(stage)
        return LogitRegression(student)

    kind = register_stage("logit-mse", objective, inputs=TEACHER_OUTPUTS, order=25, lr=3e-3, train="all")
    yield kind, built
    unregister_stage("logit-mse")


@pytest.fixture
def cosine_stage():
    """A ``cosine-transfer`` stage after transfer that trains only the replaced modules; removed after."""
    def objective(student, teacher, stage):
        return CosineTransfer(layer_pairs(student, teacher))

    kind = register_stage("cosine-transfer", objective, inputs=MODULE_IO, order=15, lr=3e-3, train="replaced")
    yield kind
    unregister_stage("cosine-transfer")


def converted():
    teacher = tiny_bert()
    with torch.no_grad():
        teacher.classifier.weight.mul_(30)                  # spread-out logits, so there is something to match
    student = m2.convert(teacher, m2.ConvertConfig(filter_order=16, nblocks=2))
    with torch.no_grad():
        student.classifier.weight.neg_()                    # start far from the teacher
    return teacher, student


def mean(xs):
    return sum(xs) / len(xs)


def test_a_registered_stage_takes_its_defaults_and_its_place_in_the_order(logit_stage):
    kind, _ = logit_stage
    assert stage_names() == ("transfer", "kd", "logit-mse", "task")
    assert stage_kind("logit-mse") is kind
    stage = StageConfig("logit-mse", steps=4)
    assert (stage.lr, stage.train, stage.kd_weight) == (3e-3, "all", 0.0)
    cfg = DistillConfig(stages=["transfer", "logit-mse", "task"], steps=3)
    assert DistillConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match=r"out of order; run them as transfer, kd, logit-mse, task"):
        DistillConfig(stages=["task", "logit-mse"])
    with pytest.raises(ConfigError, match="already registered"):
        register_stage("logit-mse", LogitRegression, inputs=TEACHER_OUTPUTS, order=1, lr=1e-3, train="all")


def test_a_registered_end_to_end_stage_lowers_its_loss_and_trains_everything(logit_stage):
    _, built = logit_stage
    teacher, student = converted()
    before, teacher_before = state(student), state(teacher)
    cfg = DistillConfig(stages=[StageConfig("logit-mse", steps=16)], progress=False)
    result = m2.distill(student, teacher, class_batches(4), cfg)
    res = result.stages[0]
    assert res.name == "logit-mse" and res.steps == 16 and [s.name for s in built] == ["logit-mse"]
    assert mean(res.losses[-4:]) < 0.5 * mean(res.losses[:4]), res.losses
    after = student.state_dict()
    replaced = tuple(p + "." for p, _, _ in layer_pairs(student, teacher))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"classifier.weight", "bert.embeddings.word_embeddings.weight"} <= changed      # train="all"
    assert any(k.startswith(replaced) for k in changed)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_a_registered_module_io_stage_trains_only_the_replaced_modules(cosine_stage):
    teacher, student = converted()
    before = state(student)
    cfg = DistillConfig(stages=["transfer", "cosine-transfer"], steps=16, progress=False)
    result = m2.distill(student, teacher, class_batches(4), cfg)
    assert [s.name for s in result.stages] == ["transfer", "cosine-transfer"]
    res = result.stages[1]
    assert res.steps == 16 and mean(res.losses[-4:]) < 0.9 * mean(res.losses[:4]), res.losses
    replaced = tuple(p + "." for p, _, _ in layer_pairs(student, teacher))
    after = student.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith(replaced) for k in changed)                     # train="replaced"
    assert all(p.requires_grad for p in student.parameters())                          # restored


def test_unknown_stage_names_list_the_registered_ones():
    with pytest.raises(ConfigError, match=r"choose one of \['transfer', 'kd', 'task'\]"):
        StageConfig("finetune", steps=1)
    with pytest.raises(ConfigError, match="no stage 'finetune' is registered"):
        unregister_stage("finetune")
    with pytest.raises(ConfigError, match="inputs="):
        register_stage("bad", LogitRegression, inputs="outputs", order=1, lr=1e-3, train="all")
    with pytest.raises(ConfigError, match="train="):
        register_stage("bad", LogitRegression, inputs=TEACHER_OUTPUTS, order=1, lr=1e-3, train="some")
    assert "bad" not in stage_names()


def test_an_unregistered_stage_is_gone():
    register_stage("logit-mse", LogitRegression, inputs=TEACHER_OUTPUTS, order=25, lr=3e-3, train="all")
    assert StageConfig("logit-mse", steps=1).name == "logit-mse"
    unregister_stage("logit-mse")
    assert stage_names() == ("transfer", "kd", "task")
    with pytest.raises(ConfigError, match="stage name='logit-mse' is not valid"):
        StageConfig("logit-mse", steps=1)
    with pytest.raises(ConfigError, match="stage name"):
        DistillConfig(stages=["transfer", "logit-mse"])
