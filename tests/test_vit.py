"""Hugging Face ViT (ViTModel, ViTForImageClassification): patch tokens + CLS become bidirectional M2 mixers.

Each test converts a tiny random ViT (16x16 images, patch 4: 16 patch tokens + CLS, width 32, 2 layers)
and checks the plan's site counts, that the converted model keeps its class and output type, runs
forward and backward, and leaves the original untouched.
"""

from __future__ import annotations

import pytest
import torch

import m2convert as m2
from m2convert.layers import M2Block, MonarchLinear

transformers = pytest.importorskip("transformers")


def _vit(head: str = "ViTModel", attn: str = "sdpa", layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                 num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                                 num_labels=5, attn_implementation=attn)
    return getattr(transformers, head)(cfg).eval()


def _pixels(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))   # (B, C, S, S)


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


_PLANS: dict = {}


def _plan(head: str = "ViTModel", attn: str = "sdpa"):
    """The default plan of a tiny ViT, captured once per (head, attn) for this module."""
    if (head, attn) not in _PLANS:
        _PLANS[head, attn] = m2.plan(_vit(head, attn))
    return _PLANS[head, attn]


@pytest.mark.parametrize("head", ["ViTModel", "ViTForImageClassification"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vit_plan_sites(head, attn):
    plan = _plan(head, attn)
    seq = [s for s in plan.converted if s.kind == "sequence"]
    dim = [s for s in plan.converted if s.kind == "dimension"]
    assert (len(seq), len(dim), len(plan.skipped)) == (2, 2, 0)
    assert {s.pattern for s in seq} == {f"{attn}-attention"}
    assert {s.pattern for s in dim} == {"gelu-mlp"}
    assert all(s.causal is False and s.mode == "bidirectional" for s in seq)
    prefix = "vit." if head != "ViTModel" else ""
    assert [s.fqn for s in seq] == [f"{prefix}layers.{i}.attention" for i in range(2)]


@pytest.mark.parametrize("head", ["ViTModel", "ViTForImageClassification"])
def test_vit_converts_forward_backward(head):
    plan = _plan(head)
    model = plan.model
    before = _state(model)
    converted = plan.apply()
    assert type(converted) is type(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # original untouched

    x = _pixels()
    with torch.no_grad():
        ref = model(pixel_values=x)
    out = converted(pixel_values=x)
    assert type(out) is type(ref)
    main = "last_hidden_state" if head == "ViTModel" else "logits"
    assert getattr(out, main).shape == getattr(ref, main).shape
    assert torch.isfinite(getattr(out, main)).all()

    mixers = [m for m in converted.modules() if isinstance(m, M2Block) and hasattr(m, "mixer")]
    assert len(mixers) == 2 and all(m.mixer.mode == "bidirectional" for m in mixers)
    assert sum(isinstance(m, MonarchLinear) for m in converted.modules()) == 4
    converted.train()
    loss = getattr(converted(pixel_values=x), main).pow(2).mean()
    loss.backward()
    for m in mixers:
        assert m.mixer.in_proj.weight.grad is not None and m.mixer.in_proj.weight.grad.abs().sum() > 0


def test_vit_classifier_loss_and_pooler():
    model = _plan("ViTForImageClassification").model
    converted = _plan("ViTForImageClassification").apply()
    labels = torch.tensor([1, 4])
    out = converted(pixel_values=_pixels(), labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert converted.classifier.weight.grad is not None

    base = transformers.ViTModel(model.config, add_pooling_layer=True).eval()
    pooled = m2.convert(base)(pixel_values=_pixels()).pooler_output
    assert pooled.shape == (2, 32)


def test_vit_cls_token_sees_every_patch():
    # Bidirectional mixing: the CLS output (position 0) must depend on the last patch, which a
    # causal mixer would not allow.
    converted = m2.convert(_vit(), dimension=False)
    x = _pixels(batch=1)
    y = x.clone()
    y[..., 12:, 12:] += 1.0                                                     # the last 4x4 patch only
    with torch.no_grad():
        a = converted(pixel_values=x).last_hidden_state[:, 0]
        b = converted(pixel_values=y).last_hidden_state[:, 0]
    assert (a - b).abs().max() > 1e-4


def test_vit_longer_sequence_than_trained():
    # 32x32 images with interpolated position embeddings: 64 patches + CLS (vs 16 + CLS at capture).
    converted = _plan().apply()
    with torch.no_grad():
        out = converted(pixel_values=_pixels(size=32), interpolate_pos_encoding=True).last_hidden_state
    assert out.shape == (2, 65, 32) and torch.isfinite(out).all()


def test_vit_overrides_select_layers():
    model = _vit("ViTForImageClassification")
    plan = m2.plan(model, m2.ConvertConfig(overrides={r"layers\.0\.": None}))
    assert [s.fqn for s in plan.converted] == ["vit.layers.1.attention", "vit.layers.1.mlp"]
    assert len(plan.excluded) == 2
    converted = plan.apply()
    assert not any(isinstance(m, M2Block) for m in converted.vit.layers[0].modules())
    assert isinstance(converted.vit.layers[1].attention, M2Block)


def test_distill_takes_image_batches():
    """m2.distill on pixel_values batches: transfer, kd and task lower their losses; images are counted."""
    from m2convert.recover import DistillConfig, StageConfig, distill
    teacher = _vit("ViTForImageClassification")
    student = m2.convert(teacher, filter_order=16)
    gen = torch.Generator().manual_seed(2)
    batches = [{"pixel_values": torch.randn(8, 3, 16, 16, generator=gen),
                "labels": torch.randint(0, 5, (8,), generator=gen)} for _ in range(2)]
    stages = [StageConfig("transfer", steps=12, lr=3e-3), StageConfig("kd", steps=12, lr=3e-3),
              StageConfig("task", steps=12, lr=3e-3)]
    result = distill(student, teacher, batches, DistillConfig(stages=stages, progress=False))
    for stage in result.stages:
        assert stage.steps == 12
        assert sum(stage.losses[-3:]) < sum(stage.losses[:3]), (stage.name, stage.losses)
        assert stage.tokens == 12 * 8                                # images, not pixels
    assert isinstance(student, transformers.ViTForImageClassification)


def test_distill_refuses_batches_without_model_inputs():
    from m2convert.recover import DistillConfig, StageConfig, distill
    teacher = _vit("ViTForImageClassification")
    student = m2.convert(teacher, filter_order=16)
    bad = [{"images": torch.randn(2, 3, 16, 16)}]
    with pytest.raises(m2.M2Error, match="input_ids' or 'pixel_values'"):
        distill(student, teacher, bad, DistillConfig(stages=[StageConfig("kd", steps=1)], progress=False,
                                                     on_bad="raise"))
