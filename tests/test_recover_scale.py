"""Recovery at scale: layerwise transfer (one layer's activations at a time) gives the all-at-once
gradients, bf16 autocast trains with fp32 weights, gradient checkpointing keeps the gradients, and LoRA
on the dense parts trains only the adapters and the M2 modules and merges back into plain linears."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from m2convert.errors import ConfigError
from m2convert.recover import DistillConfig, StageConfig, distill, replaced_modules
from m2convert.recover.lora import dense_linears
from m2convert.recover.memory import gradient_checkpointing, held_bytes
from m2convert.recover.stages import (TransferObjective, layer_pairs, record_module_io, teacher_forward,
                                      transfer_layerwise)
from test_recover_common import (class_batches, convert_bert, convert_gpt2, lm_batches, one_thread, state,  # noqa: F401
                                 tiny_bert, tiny_gpt2)


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["relative-mse", "mse"])
def test_layerwise_transfer_has_the_all_at_once_loss_and_gradients(loss):
    teacher = tiny_bert()
    student = convert_bert(teacher)
    objective = TransferObjective(layer_pairs(student, teacher), loss)
    batch = class_batches(1)[0]                                  # padded rows: the mask matters
    with torch.no_grad(), record_module_io({p: teacher.get_submodule(p) for p in objective.paths}) as calls:
        teacher_forward(teacher, batch, hidden=False)
    whole = objective(calls, batch["attention_mask"])
    whole.backward()
    expected = _grads(objective)
    objective.zero_grad(set_to_none=True)
    got = transfer_layerwise(objective, teacher, batch)
    assert not got.requires_grad
    torch.testing.assert_close(got, whole.detach(), rtol=1e-6, atol=1e-7)
    grads = _grads(objective)
    assert grads.keys() == expected.keys() and len(grads) > 10
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_layerwise_transfer_in_distill_matches_the_default():
    teacher = tiny_gpt2()
    runs = []
    for layerwise in (False, True):
        torch.manual_seed(1)                                     # the same mixer initialisation
        student = convert_gpt2(teacher)
        cfg = DistillConfig(stages=[StageConfig("transfer", steps=3, lr=3e-3, layerwise=layerwise)], progress=False)
        runs.append((distill(student, teacher, lm_batches(3), cfg).stages[0], state(student)))
    (plain, w0), (layerwise, w1) = runs
    assert layerwise.losses == pytest.approx(plain.losses, rel=1e-5)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_layerwise_applies_only_to_module_io_stages():
    with pytest.raises(ConfigError, match="layerwise=True applies to stages such as 'transfer'"):
        StageConfig("kd", steps=1, layerwise=True)
    with pytest.raises(ConfigError, match="outside the FSDP root"):
        DistillConfig(stages=[StageConfig("transfer", steps=1, layerwise=True)], distributed="fsdp")


def test_bf16_autocast_trains_and_keeps_fp32_weights():
    teacher = tiny_gpt2()
    student = convert_gpt2(teacher)
    cfg = DistillConfig(stages=[StageConfig("transfer", steps=4, lr=3e-3, layerwise=True),
                                StageConfig("kd", steps=6, lr=3e-3)], autocast="bf16", progress=False)
    result = distill(student, teacher, lm_batches(2), cfg)
    for stage in result.stages:
        assert all(torch.isfinite(torch.tensor(stage.losses)))
        assert stage.losses[-1] < stage.losses[0], stage.name
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert DistillConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="autocast='fp8'"):
        DistillConfig(autocast="fp8")


def _checkpointed_grads(model: nn.Module, batch: dict, enabled: bool, calls: list) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)                                         # the same dropout masks
    with gradient_checkpointing(model, enabled):
        model(**batch).logits.square().mean().backward()
    return _grads(model)


@pytest.mark.parametrize("kind", ["hf", "module-list"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    model = convert_gpt2(tiny_gpt2()).train()
    if kind == "module-list":                                    # no HF switch: torch.utils.checkpoint per block
        model.supports_gradient_checkpointing = False
    calls: list[int] = []
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))     # inside block 0
    batch = {"input_ids": lm_batches(1)[0]["input_ids"]}
    plain = _checkpointed_grads(model, batch, False, calls)
    assert len(calls) == 1
    checkpointed = _checkpointed_grads(model, batch, True, calls)
    assert len(calls) == 3                                       # block 0 ran again in the backward pass
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert "forward" not in vars(model.transformer.h[0])          # switched off again on exit


def test_distill_with_gradient_checkpointing_matches_without():
    teacher = tiny_gpt2()
    losses = []
    for enabled in (False, True):
        torch.manual_seed(1)
        student = convert_gpt2(teacher)
        cfg = DistillConfig(stages=[StageConfig("kd", steps=2, lr=1e-3)], gradient_checkpointing=enabled,
                            progress=False)
        losses.append(distill(student, teacher, lm_batches(2), cfg).stages[0].losses)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in student.modules())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_lora_trains_only_adapters_and_m2_modules_and_merges_back():
    teacher = tiny_bert()
    student = convert_bert(teacher, mlp=False)                    # the MLPs and heads stay dense
    before = state(student)
    dense = dense_linears(student)
    assert "bert.encoder.layer.0.intermediate.dense" in dense and "classifier" in dense
    replaced = [p + "." for p, _ in replaced_modules(student)]
    trained: list[set[str]] = []
    on_step = lambda *_: trained.append({n for n, p in student.named_parameters() if p.requires_grad})
    cfg = DistillConfig(stages=[StageConfig("kd", steps=3, lr=1e-2, lora_rank=4)], progress=False)
    result = distill(student, teacher, class_batches(3), cfg, on_step=on_step)
    names = trained[0]
    assert names and all(".lora_" in n or any(n.startswith(p) for p in replaced) for n in names)
    assert any(".lora_A." in n for n in names) and any(n.startswith(replaced[0]) for n in names)
    after = state(student)
    assert after.keys() == before.keys()                          # plain linears again: saves as before
    assert all(type(student.get_submodule(p)) is nn.Linear for p in dense)
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])       # the merged update
    assert torch.equal(after["bert.embeddings.word_embeddings.weight"], before["bert.embeddings.word_embeddings.weight"])
    full_adamw = 2 * held_bytes(student.parameters())              # exp_avg + exp_avg_sq of every weight
    assert 0 < result.stages[0].optimizer_bytes < 0.9 * full_adamw


def test_lora_settings_are_checked():
    assert StageConfig("kd", steps=1, lora_rank=8).train == "replaced"
    with pytest.raises(ConfigError, match="checkpoint_every=0"):
        DistillConfig(stages=[StageConfig("kd", steps=1, lora_rank=8)], checkpoint_every=1, checkpoint_dir="x")
    teacher = tiny_gpt2()                                         # every linear converted, the head tied
    with pytest.raises(ConfigError, match="no dense nn.Linear left"):
        distill(convert_gpt2(teacher), teacher, lm_batches(1),
                DistillConfig(stages=[StageConfig("kd", steps=1, lora_rank=4)], progress=False))


def test_distill_cli_options_reach_the_config():
    import argparse

    from m2convert.recover.command import add_distill_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    args = parser.parse_args("--teacher t --student s --data d --out o --stages transfer,kd --autocast bf16 "
                             "--gradient-checkpointing --layerwise --lora-rank 8".split())
    cfg = config_from_args(args)
    assert (cfg.autocast, cfg.gradient_checkpointing) == ("bf16", True)
    assert [(s.name, s.layerwise, s.lora_rank) for s in cfg.stages] == [("transfer", True, 0), ("kd", False, 8)]
