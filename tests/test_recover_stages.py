"""Each recovery stage lowers its loss on a tiny model; transfer trains only the replaced modules."""

from __future__ import annotations

import copy

import pytest
import torch

from m2convert.errors import ConfigError, TrainingError
from m2convert.layers import MonarchLinear
from m2convert.recover import DistillConfig, StageConfig, distill, layer_pairs
from m2convert.recover.stages import kd_kl, masked_mse
from test_recover_common import (class_batches, convert_bert, convert_gpt2, lm_batches, one_thread,  # noqa: F401
                                 state, tiny_bert, tiny_gpt2)


def sharp_bert():
    """A tiny BERT whose classifier logits are spread out, so KD has something to match."""
    teacher = tiny_bert()
    with torch.no_grad():
        teacher.classifier.weight.mul_(30)
    return teacher


def run(student, teacher, batches, stage, **kw):
    cfg = DistillConfig(stages=[stage], progress=False, **kw)
    return distill(student, teacher, batches, cfg).stages[0]


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("name,lr", [("transfer", 3e-3), ("kd", 3e-3), ("task", 3e-3)])
def test_each_stage_lowers_its_loss_on_tiny_bert(name, lr):
    torch.manual_seed(0)
    teacher = sharp_bert()
    student = convert_bert(teacher)
    with torch.no_grad():
        student.classifier.weight.neg_()                                      # start far from the teacher
    batches = class_batches(4)
    res = run(student, teacher, batches, StageConfig(name, steps=16, lr=lr))
    assert res.steps == 16 and len(res.losses) == 16
    assert res.tokens == 4 * sum(int(b["attention_mask"].sum()) for b in batches)
    assert mean(res.losses[-4:]) < 0.7 * mean(res.losses[:4]), res.losses


@pytest.mark.parametrize("name", ["transfer", "kd", "task"])
def test_each_stage_lowers_its_loss_on_tiny_causal_lm(name):
    teacher = tiny_gpt2()
    student = convert_gpt2(teacher)
    res = run(student, teacher, lm_batches(2), StageConfig(name, steps=16, lr=3e-3))
    assert mean(res.losses[-4:]) < 0.9 * mean(res.losses[:4]), res.losses


def test_transfer_trains_only_replaced_modules_and_never_the_teacher():
    teacher = sharp_bert()
    student = convert_bert(teacher)
    before, teacher_before = state(student), state(teacher)
    run(student, teacher, class_batches(2), StageConfig("transfer", steps=3, weight_decay=0.1))
    replaced = tuple(p + "." for p, _, _ in layer_pairs(student, teacher))
    after = student.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith(replaced) for k in changed)
    unchanged = [k for k in before if not k.startswith(replaced)]
    assert unchanged and all(torch.equal(before[k], after[k]) for k in unchanged)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_transfer_with_mlp_only_conversion_pairs_each_linear():
    teacher = tiny_bert()
    student = convert_bert(teacher, attention=False)
    pairs = layer_pairs(student, teacher)
    assert [type(t).__name__ for _, _, t in pairs] == ["Linear"] * 4
    res = run(student, teacher, class_batches(2), StageConfig("transfer", steps=16, lr=3e-3))
    assert mean(res.losses[-4:]) < mean(res.losses[:4]), res.losses


def test_transfer_needs_replaced_modules_and_matching_teacher():
    teacher = tiny_bert()
    with pytest.raises(TrainingError, match="no M2 modules"):
        run(tiny_bert(1), teacher, class_batches(1), StageConfig("transfer", steps=1))
    student = convert_bert(teacher)
    with pytest.raises(TrainingError, match="teacher has no module at 'bert.encoder.layer.0.attention.self'"):
        run(student, tiny_gpt2(), class_batches(1), StageConfig("transfer", steps=1))


def test_token_budget_ends_a_stage_and_regex_selects_parameters():
    teacher = sharp_bert()
    student = convert_bert(teacher)
    before = state(student)
    batches = class_batches(4)
    budget = int(batches[0]["attention_mask"].sum()) + 1                     # needs two batches
    res = run(student, teacher, batches, StageConfig("kd", tokens=budget, train=[r"classifier\."]))
    assert res.steps == 2 and res.tokens >= budget
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    with pytest.raises(ConfigError, match="selects no parameter"):
        run(student, teacher, batches, StageConfig("kd", steps=1, train=["nothing-matches"]))


def test_task_stage_needs_labels():
    teacher = tiny_bert()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in class_batches(1)]
    with pytest.raises(TrainingError, match="needs labels"):
        run(convert_bert(teacher), teacher, batches, StageConfig("task", steps=1))


def test_stages_run_in_order_and_requires_grad_is_restored():
    teacher = sharp_bert()
    student = convert_bert(teacher)
    student.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    cfg = DistillConfig(stages=["transfer", "kd", "task"], steps=2, progress=False)
    result = distill(student, teacher, class_batches(2), cfg)
    assert [s.name for s in result.stages] == ["transfer", "kd", "task"]
    assert not student.bert.embeddings.word_embeddings.weight.requires_grad
    assert student.classifier.weight.requires_grad
    assert result.to_dict()["stages"][0]["final_loss"] == pytest.approx(sum(result.stages[0].losses) / 2)


def test_loss_helpers_mask_padding_and_vanish_on_equal_inputs():
    a = torch.randn(2, 5, 3)
    b = a.clone()
    b[1, 3:] += 100.0                                                         # only in padding
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    assert masked_mse(a, b, mask).item() == 0.0
    assert masked_mse(a, b, None).item() > 0
    logits = torch.randn(4, 7)
    assert kd_kl(logits, logits, 2.0).abs().item() < 1e-6
    assert kd_kl(logits, -logits, 2.0).item() > 0


def test_kd_on_a_model_without_logits_matches_last_hidden_states():
    from transformers import BertModel

    torch.manual_seed(0)
    teacher = BertModel(tiny_bert().config).eval()
    student = copy.deepcopy(teacher)
    for layer in student.encoder.layer:
        layer.output.dense = MonarchLinear.from_dense(layer.output.dense, nblocks=4)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in class_batches(2)]
    res = run(student, teacher, batches, StageConfig("kd", steps=20, lr=3e-3))
    assert mean(res.losses[-4:]) < 0.8 * mean(res.losses[:4]), res.losses


def test_students_from_m2_convert_pair_with_their_teacher_and_recover():
    import m2convert as m2

    teacher = sharp_bert()
    student = m2.convert(teacher, m2.ConvertConfig(filter_order=16, nblocks=2))
    pairs = layer_pairs(student, teacher)
    assert [(p, type(t).__name__) for p, _, t in pairs][:3] == [
        ("bert.encoder.layer.0.attention", "BertAttention"), ("bert.encoder.layer.0.intermediate.dense", "Linear"),
        ("bert.encoder.layer.0.output.dense", "Linear")] and len(pairs) == 6
    before = state(student)
    res = run(student, teacher, class_batches(2), StageConfig("transfer", steps=16, lr=3e-3))
    assert mean(res.losses[-4:]) < mean(res.losses[:4]), res.losses
    replaced = tuple(p + "." for p, _, _ in pairs)
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith(replaced))
