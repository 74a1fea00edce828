"""Scorers of the attention sites a budget may keep: one registered function per selection method.

A scorer gets the :class:`Candidates` and returns one score per candidate :class:`Unit` (an attention
site, or at head level one KV group of a site), higher meaning more worth keeping as softmax attention
(all None: no measurement, keep evenly spaced units).

- ``kl``: convert every candidate, align the converted model briefly (layer-wise transfer on the first
  three quarters of the calibration batches), then for each unit put the original attention back (the
  whole module, or at head level that KV group's heads beside the aligned mixer) and measure how much the
  student's divergence from the teacher on the held-out quarter drops (KL of the output distributions at
  temperature 1 for models with logits, the relative MSE of the last hidden state for the others, as the
  ``kd`` stage measures them). Where the calibration batches carry token ``labels`` (B, N), the divergence
  is measured only at the positions that predict a labelled token (-100: none; a decoder's position t
  predicts label t + 1): the answers of a task, where a few attention heads matter most and the many
  other tokens would drown them out. Without token labels every real token counts.
- ``offset-fit``: the relative error of the best fit of a convolution's taps to the site's average attention
  by key-query offset (``seed_filters_from_attention``): attention that depends most on content, least on
  position, scores highest. At head level every group of a site has the site's score.
- ``uniform``: no score.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from m2convert.errors import ConfigError
from m2convert.passes.site import Site
from m2convert.recover.config import DistillConfig, StageConfig


@dataclass(eq=False)
class Unit:
    """One thing a budget may keep: an attention site, or (``group`` set) one KV group of its heads."""

    site: Site
    group: int | None = None


@dataclass
class Candidates:
    """What a scorer reads: the plan (with its model, the teacher), the candidate units in model order,
    the calibration data as the caller gave it, the tokenizer for files, and whether to show progress."""

    plan: Any
    units: list[Unit]
    calibration: Any
    tokenizer: Any = None
    progress: bool = True


@dataclass(frozen=True)
class Scorer:
    """A registered selection method: ``score(candidates) -> [score | None per site]``."""

    name: str
    score: Callable[[Candidates], list[float | None]]
    needs_data: bool


SCORERS: dict[str, Scorer] = {}

# Calibration batches read at most; a quarter of them (at least one) is held out for the kl scores.
MAX_BATCHES = 32


def register_scorer(name: str, needs_data: bool):
    """Register ``fn(candidates) -> list`` as the selection method ``name``."""
    def wrap(fn):
        SCORERS[name] = Scorer(name, fn, needs_data)
        return fn
    return wrap


def calibration_batches(calibration, tokenizer=None, limit: int = MAX_BATCHES) -> list[dict]:
    """Up to ``limit`` dict batches from a list of batches, an iterable of them, or a data file / dataset
    (read with :func:`m2convert.data.load_data`, in file order, 8 rows a batch).

    Example:
        >>> len(calibration_batches([{"input_ids": torch.ones(2, 8, dtype=torch.long)}] * 3))
        3
    """
    from m2convert.data import load_data

    if isinstance(calibration, (list, tuple)):
        batches = list(calibration[:limit])
    else:
        source = load_data(calibration, tokenizer, batch_size=8, shuffle=False)
        count = min(limit, getattr(source, "per_epoch", limit))
        batches = [source.batch(k) for k in range(count)] if hasattr(source, "per_epoch") else \
            list(itertools.islice(source, limit))
    if not batches or any("input_ids" not in b and "inputs_embeds" not in b for b in batches):
        raise ConfigError("calibration data gave no batches with input_ids; pass dicts of tensors "
                          "(input_ids (B, N), attention_mask (B, N)) or a text/TSV/JSONL file with tokenizer=")
    return batches


def _swap(model: torch.nn.Module, path: str, module: torch.nn.Module) -> torch.nn.Module:
    old = model.get_submodule(path)
    model.set_submodule(path, module)
    return old


def scored_positions(batch: dict, causal: bool) -> torch.Tensor | None:
    """(B, N) 0/1 of the positions whose outputs the kl score compares: those predicting a token label
    (label t + 1 for a decoder, label t otherwise) where ``batch`` has token ``labels`` (B, N) marking any,
    else its ``attention_mask`` (None: every position).

    Example:
        >>> ids = torch.ones(1, 5, dtype=torch.long)
        >>> scored_positions({"input_ids": ids, "labels": torch.tensor([[-100, -100, 7, -100, 9]])}, causal=True)
        tensor([[0, 1, 0, 1, 0]])
    """
    labels, ids = batch.get("labels"), batch.get("input_ids", batch.get("inputs_embeds"))
    if labels is None or ids is None or tuple(labels.shape) != tuple(ids.shape[:2]):
        return batch.get("attention_mask")
    marked = labels != -100
    if causal:
        marked = torch.nn.functional.pad(marked[:, 1:], (0, 1), value=False)
    return marked.long() if bool(marked.any()) else batch.get("attention_mask")


class _Divergence:
    """The student's divergence from the teacher on fixed batches, at their :func:`scored_positions`;
    the teacher runs once."""

    def __init__(self, teacher, batches: list[dict], causal: bool):
        from m2convert.recover.stages import teacher_forward

        self.batches = batches
        self.targets = [teacher_forward(teacher, b, hidden=False) for b in batches]
        self.masks = [scored_positions(b, causal) for b in batches]

    def __call__(self, student) -> float:
        from m2convert.recover.stages import output_divergence, teacher_forward

        total = sum(float(output_divergence(teacher_forward(student, batch, hidden=False), target, 1.0, mask))
                    for batch, target, mask in zip(self.batches, self.targets, self.masks))
        return total / len(self.batches)


@register_scorer("kl", needs_data=True)
def kl_scores(c: Candidates) -> list[float]:
    """The drop in the aligned student's divergence from the teacher when each site keeps its attention."""
    from m2convert.recover.distill import distill

    teacher = c.plan.model
    batches = calibration_batches(c.calibration, c.tokenizer)
    held = max(1, len(batches) // 4)
    train, held_out = (batches[:-held], batches[-held:]) if len(batches) > 1 else (batches, batches)
    student = c.plan.apply()                    # every candidate converted; a copy, the teacher stays as it is
    steps = c.plan.config.selection_steps
    was_training = teacher.training
    if steps:
        distill(student, teacher, train, DistillConfig(stages=[StageConfig("transfer", steps=steps)],
                                                       progress=False))
    student.eval()
    causal = any(u.site.causal for u in c.units)
    divergence = _Divergence(teacher.eval(), held_out, causal)
    base = divergence(student)
    scores = []
    for unit in tqdm(c.units, desc="kl selection", unit="candidate", disable=not c.progress):
        with _restored(student, teacher, unit):
            scores.append(base - divergence(student))
    teacher.train(was_training)
    return scores


@contextlib.contextmanager
def _restored(student, teacher, unit: Unit):
    """The student with ``unit``'s attention back: the teacher's module at the site, or that KV group's
    heads beside the student's own mixer (its aligned out_proj as the one output projection when dense)."""
    site = unit.site
    if unit.group is None:
        originals = {p: _swap(student, p, teacher.get_submodule(p)) for p in site.replaces}
        try:
            yield
        finally:
            for path, module in originals.items():
                _swap(student, path, module)
        return
    from m2convert.passes.apply import kept_heads

    adapter = student.get_submodule(site.fqn)
    out_proj = adapter.mixer.out_proj
    kept = kept_heads(site, teacher, [unit.group])
    if isinstance(out_proj, torch.nn.Linear) and out_proj.weight.shape == kept.o_proj.weight.shape:
        kept.o_proj.load_state_dict(out_proj.state_dict())
    adapter.keep_heads(kept)
    try:
        yield
    finally:
        adapter.kept, adapter.mixer.out_proj = None, out_proj


@register_scorer("offset-fit", needs_data=True)
def offset_fit_scores(c: Candidates) -> list[float]:
    """Each site's relative error of the best convolution fit to its average attention by offset."""
    from m2convert.recover.seed import seed_filters_from_attention

    student = c.plan.apply()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in calibration_batches(c.calibration, c.tokenizer)]
    report = seed_filters_from_attention(student, c.plan.model, batches, progress=c.progress)
    return [float(report["layers"][u.site.fqn]["fit_error_after"]) for u in c.units]


@register_scorer("uniform", needs_data=False)
def uniform_scores(c: Candidates) -> list[None]:
    """No measurement: the budget keeps evenly spaced sites."""
    return [None] * len(c.units)
