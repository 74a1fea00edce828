"""Seeding the mixers' long-conv filters from the teacher's attention by relative offset.

The main teacher is a tiny BERT whose attention depends on relative position only (sinusoidal
position embeddings, Q a per-frequency rotation of K), leaning towards earlier tokens, so the target
has a shape and a direction that a wrong sign or head mapping would miss.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import m2convert as m2
from m2convert.errors import ConfigError, TrainingError, UnsupportedModelError
from m2convert.layers import MonarchLinear
from m2convert.recover import layer_pairs, seed_filters_from_attention
from m2convert.recover.stages import TransferObjective, record_module_io, teacher_forward
from test_recover_common import class_batches, lm_batches, one_thread, state, tiny_bert, tiny_gpt2  # noqa: F401

SMALL = m2.ConvertConfig(filter_order=16)
H, HEADS = 32, 4


def positional_bert(shift: float = 2.0):
    """Tiny BERT whose head-h scores are ~ sum_i cos(w_i (q - k - shift)): a bump ``shift`` tokens back.

    The bump is a few tokens wide (w_i <= 0.5): the implicit filter is smooth at the token scale (its
    features move by 1/512 per offset), so it can follow a broad profile but not a one-token spike.
    """
    teacher = tiny_bert()
    n = teacher.config.max_position_embeddings
    freqs = torch.linspace(0.1, 0.5, H // 2)                                     # (H/2,)
    angle = torch.arange(n, dtype=torch.float32)[:, None] * freqs                 # (n, H/2)
    rot = torch.zeros(H, H)
    for i, w in enumerate(freqs.tolist()):
        c, s = math.cos(-w * shift), math.sin(-w * shift)
        rot[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[c, -s], [s, c]])
    with torch.no_grad():
        emb = teacher.bert.embeddings
        emb.word_embeddings.weight.mul_(0.1)
        emb.token_type_embeddings.weight.zero_()
        emb.position_embeddings.weight.copy_(torch.stack([angle.cos(), angle.sin()], -1).reshape(n, H))
        for layer in teacher.bert.encoder.layer:
            att = layer.attention.self
            att.key.weight.copy_(torch.eye(H))
            att.query.weight.copy_(rot)
            att.key.bias.zero_()
            att.query.bias.zero_()
    return teacher


def reference_profiles(teacher, batches) -> list[torch.Tensor]:
    """Per layer (heads, 2L - 1): mean attention probability over real pairs at key - query = i - (L - 1)."""
    longest = max(b["input_ids"].shape[1] for b in batches)
    eager = copy.deepcopy(teacher)
    eager.set_attn_implementation("eager")
    sums, counts = None, torch.zeros(2 * longest - 1, dtype=torch.float64)
    for b in batches:
        with torch.no_grad():
            att = eager(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True).attentions
        m = b["attention_mask"].double()
        n = m.shape[1]
        sums = sums if sums is not None else [torch.zeros(HEADS, 2 * longest - 1, dtype=torch.float64) for _ in att]
        for d in range(-(n - 1), n):
            pair = torch.diagonal(m[:, :, None] * m[:, None, :], offset=d, dim1=1, dim2=2)   # (B, n - |d|)
            counts[longest - 1 + d] += pair.sum()
            for i, a in enumerate(att):
                diag = torch.diagonal(a.double(), offset=d, dim1=2, dim2=3)                   # (B, heads, n - |d|)
                sums[i][:, longest - 1 + d] += (diag * pair[:, None]).sum((0, 2))
    return [s / counts.clamp_min(1) for s in sums]


def mean_corr(taps: torch.Tensor, target: torch.Tensor) -> float:
    """Mean Pearson correlation of matching rows of (rows, L) tensors."""
    a = taps - taps.mean(-1, keepdim=True)
    b = target - target.mean(-1, keepdim=True)
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item()


def filter_rows(mixer, profile: torch.Tensor, longest: int):
    """(taps, targets) as rows over offsets: forward j = 0..L-1 <-> key - query = -j; reverse j >= 1 <-> +j."""
    taps = mixer.filter(longest).detach().double()                                 # (heads_f, H, L)
    per_channel = profile.repeat_interleave(H // HEADS, dim=0)                     # (H, 2L - 1)
    zero = longest - 1
    fwd = (taps[0], per_channel[:, zero - torch.arange(longest)])
    rev = (taps[1, :, 1:], per_channel[:, zero + torch.arange(1, longest)])
    return fwd, rev


def test_seeded_filters_follow_the_teachers_attention_by_offset():
    teacher = positional_bert()
    batches = class_batches(4)
    student = m2.convert(teacher, SMALL)
    before = copy.deepcopy(student)
    report = seed_filters_from_attention(student, teacher, batches, progress=False)
    longest = batches[0]["input_ids"].shape[1]
    assert report["offsets"] == longest and len(report["layers"]) == 2
    for i, profile in enumerate(reference_profiles(teacher, batches)):
        path = f"bert.encoder.layer.{i}.attention"
        layer = report["layers"][path]
        assert layer["fit_error_after"] < 0.1 < 0.9 < layer["fit_error_before"], layer
        assert layer["corr_after"] > 0.75 and layer["corr_before"] < 0.3, layer
        # Against an independent per-offset average of the teacher's returned attentions.
        (f_new, f_tgt), (r_new, r_tgt) = filter_rows(student.get_submodule(path).mixer, profile, longest)
        (f_old, _), (r_old, _) = filter_rows(before.get_submodule(path).mixer, profile, longest)
        corr_new = mean_corr(torch.cat([f_new, r_new], 1), torch.cat([f_tgt, r_tgt], 1))
        corr_old = mean_corr(torch.cat([f_old, r_old], 1), torch.cat([f_tgt, r_tgt], 1))
        assert corr_new > 0.7 and corr_old < 0.3, (corr_new, corr_old)
        # The bump sits behind the query: the forward (causal) filter holds more of it than the reverse.
        assert f_new[:, 1:4].mean() > 1.25 * r_new[:, :3].mean(), (f_new[:, :4].mean(0), r_new[:, :3].mean(0))


def test_seeding_changes_only_the_gated_filters():
    teacher = positional_bert()
    student = m2.convert(teacher, SMALL)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    old, teacher_old = state(student), state(teacher)
    seed_filters_from_attention(student, teacher, class_batches(2), steps=20, progress=False)
    new = student.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert {k.rsplit(".mixer.", 1)[0] for k in changed} == {f"bert.encoder.layer.{i}.attention" for i in range(2)}
    assert all(".mixer.filter." in k for k in changed), sorted(changed)
    assert any(k.endswith("mlp.4.weight") for k in changed)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_old.items())
    assert teacher.config._attn_implementation == "sdpa"                          # switched back after seeding
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    assert all(p.grad is None for p in student.parameters())


def attention_transfer_loss(student, teacher, batches) -> float:
    """The transfer stage's loss of the attention replacements alone, before any training."""
    pairs = [p for p in layer_pairs(student, teacher) if p[0].endswith("attention")]
    objective = TransferObjective(pairs)
    losses = []
    for b in batches:
        with torch.no_grad(), record_module_io({p: t for p, _, t in pairs}) as calls:
            teacher_forward(teacher, b, hidden=False)
            losses.append(objective(calls, b["attention_mask"]).item())
    return sum(losses) / len(losses)


def test_open_gates_start_the_mixer_as_the_average_attention():
    teacher = positional_bert()
    with torch.no_grad():                          # V = O = I, so attention's output is the mixing itself
        for layer in teacher.bert.encoder.layer:
            layer.attention.self.value.weight.copy_(torch.eye(H))
            layer.attention.self.value.bias.zero_()
            layer.attention.output.dense.weight.copy_(torch.eye(H))
            layer.attention.output.dense.bias.zero_()
    base = m2.convert(teacher, SMALL)
    kept, opened, control = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    seed_filters_from_attention(kept, teacher, class_batches(4), progress=False)
    report = seed_filters_from_attention(opened, teacher, class_batches(4), open_gates=True, progress=False)
    assert report["gates"] == "open"
    for i in range(2):
        old = base.bert.encoder.layer[i].attention.mixer
        new = opened.bert.encoder.layer[i].attention.mixer
        assert torch.equal(new.in_proj.weight[:2 * H], torch.zeros(2 * H, H))
        assert torch.equal(new.in_proj.bias[:2 * H], torch.ones(2 * H)) and torch.equal(new.D, torch.zeros(H))
        assert torch.equal(new.in_proj.weight[2 * H:], old.in_proj.weight[2 * H:])           # V rows kept
        assert torch.equal(new.out_proj.weight, old.out_proj.weight)
        ctrl = control.bert.encoder.layer[i].attention.mixer                                 # open, not seeded
        with torch.no_grad():
            ctrl.in_proj.weight[:2 * H].zero_()
            ctrl.in_proj.bias[:2 * H].fill_(1.0)
            ctrl.D.zero_()
    held = class_batches(4, seed=1)
    losses = {name: attention_transfer_loss(m, teacher, held)
              for name, m in [("base", base), ("kept", kept), ("opened", opened), ("control", control)]}
    assert losses["opened"] < 0.5 * min(losses["base"], losses["kept"], losses["control"]), losses


def test_open_gates_need_a_dense_in_proj_and_change_nothing_otherwise():
    teacher = tiny_bert()
    student = m2.convert(teacher, SMALL)
    mixer = student.bert.encoder.layer[1].attention.mixer
    mixer.in_proj = MonarchLinear.from_dense(mixer.in_proj, nblocks=2)
    old = state(student)
    with pytest.raises(ConfigError, match=r"open_gates=True .*bert\.encoder\.layer\.1\.attention"):
        seed_filters_from_attention(student, teacher, class_batches(1), open_gates=True, progress=False)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in old.items())


def test_causal_gpt2_fits_only_the_forward_filter():
    teacher = tiny_gpt2()
    student = m2.convert(teacher, SMALL)
    batches = [{"input_ids": b["input_ids"]} for b in lm_batches(3)]                # no mask: every pair counts
    report = seed_filters_from_attention(student, teacher, batches, steps=200, progress=False)
    assert list(report["layers"]) == [f"transformer.h.{i}.attn" for i in range(2)]
    for path, layer in report["layers"].items():
        assert layer["mode"] == "causal" and student.get_submodule(path).mixer.filter.heads == 1
        assert layer["fit_error_after"] < 0.2 * layer["fit_error_before"], layer
        assert layer["corr_after"] > 0.8, layer
    logits = student(input_ids=lm_batches(1)[0]["input_ids"]).logits
    assert torch.isfinite(logits).all()


def test_student_without_mixers_is_refused():
    teacher = tiny_bert()
    student = m2.convert(teacher, SMALL, sequence=False)
    with pytest.raises(TrainingError, match="no M2SequenceMixer"):
        seed_filters_from_attention(student, teacher, class_batches(1), progress=False)


def test_teacher_without_attention_probabilities_is_refused():
    teacher = tiny_bert()
    student = m2.convert(teacher, SMALL)
    # An attention module that drops its probabilities, whatever the implementation.
    teacher.bert.encoder.layer[1].attention.register_forward_hook(lambda _m, _a, out: (out[0], None))
    with pytest.raises(UnsupportedModelError, match=r"bert\.encoder\.layer\.1\.attention.*no attention probabilities"):
        seed_filters_from_attention(student, teacher, class_batches(1), progress=False)
    assert teacher.config._attn_implementation == "sdpa"


def test_wrong_teacher_and_bad_arguments_are_refused():
    teacher = tiny_bert()
    student = m2.convert(teacher, SMALL)
    with pytest.raises(TrainingError, match="has no module at"):
        seed_filters_from_attention(student, tiny_gpt2(), class_batches(1), progress=False)
    for kwargs, match in [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"max_offset": 0}, "max_offset")]:
        with pytest.raises(ConfigError, match=match):
            seed_filters_from_attention(student, teacher, class_batches(1), progress=False, **kwargs)
    with pytest.raises(ConfigError, match="at least one batch"):
        seed_filters_from_attention(student, teacher, [], progress=False)
    with pytest.raises(ConfigError, match="same object"):
        seed_filters_from_attention(teacher, teacher, class_batches(1), progress=False)
