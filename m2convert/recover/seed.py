"""Seed the mixers' long-convolution filters from the teacher's average attention pattern by offset.

A converted attention site starts with Q/K/V/O copied into its mixer (passes/apply.py) but with a
random filter, so at first it mixes no tokens (the skip D = 1 passes each token through). Seeding sets
the filter to what the teacher's attention does on average at each relative offset:

    1. run the teacher (eager attention, so its attention modules return probabilities
       P (B, heads, N, N)) on some batches and, per replaced attention module, accumulate over real
       (query, key) pairs
           A[h, d] = sum P[b, h, q, q + d] / #pairs at offset d,      d = key - query in (-N, N)
       the mean probability a query gives the key d tokens away, given such a key exists (so a long
       offset, which only long sequences have, is not diluted by the queries that lack it);
    2. lay A out as the filter's taps: forward head k[c, j] <- A[c // head_dim, -j] (keys j tokens
       back, j = 0..L-1) and, bidirectional only, reverse head k_rev[c, j] <- A[c // head_dim, +j];
       channel c of the mixer's v rows holds teacher head c // head_dim (the layout apply.py copies V
       in), so each channel gets its head's profile;
    3. fit the ImplicitFilter parameters (only those) by Adam on the MSE between its taps and that
       target, each offset weighted by its pair count: the filter's taps then match the teacher's
       position-averaged attention matrix over the (query, key) pairs that occur, which is where a tap
       is ever used. The reverse tap 0 is not fitted (the convolution counts offset 0 once, by k).

Scale: the taps are probabilities, so the gated branch conv(v * x1, k) is the teacher's average
attention operator applied to v * x1, the same magnitude as attention's sum_d A[d] v[t + d]. By
default the skip D (1 after conversion, so the response at offset 0 is D + A[0]) and the gates x1, x2
(seeded from Q and K) are left as conversion set them. ``open_gates=True`` also sets x1 = x2 = 1 (their
in_proj rows to weight 0, bias 1; the short conv starts as the identity) and D = 0, so the branch is
exactly out_proj(conv(V x, k)): the teacher's attention with every query's pattern replaced by the
average one. On the SST-2 MiniLM teacher that start is the one that pays (see the recovery docs):
with Q/K gates the seeded filter raises the first transfer loss, with open gates it lowers it.
The residual filter is left alone (it convolves the raw input; attention has no counterpart).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, ShapeError, TrainingError, UnsupportedModelError, check_int
from ..hf import attention_implementation, set_attention
from ..layers import M2SequenceMixer
from .stages import layer_pairs, model_inputs, record_module_io, replaced_modules


def _mixer_of(module: nn.Module) -> M2SequenceMixer | None:
    if isinstance(module, M2SequenceMixer):
        return module
    return next((m for m in module.modules() if isinstance(m, M2SequenceMixer)), None)


@contextmanager
def _eager_attention(teacher: nn.Module):
    """Run HF models with eager attention (the only kind that materialises probabilities), then restore."""
    old = attention_implementation(teacher)
    switch = old not in (None, "eager")
    if switch:
        set_attention(teacher, "eager")
    try:
        yield
    finally:
        if switch:
            set_attention(teacher, old)


def _probabilities(output, pair: torch.Tensor) -> torch.Tensor | None:
    """The attention probabilities among a module's outputs, (B, heads, N, N) float64 on the CPU with
    pairs that are not both real tokens (``pair`` (B, N, N) == 0) zeroed; None when there are none.
    """
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    if not isinstance(items, (tuple, list)):
        return None
    b, n, _ = pair.shape
    for t in items:
        if not (torch.is_tensor(t) and t.dim() == 4 and t.shape[0] == b and t.shape[-2:] == (n, n)):
            continue
        probs = torch.where(pair[:, None] > 0, t.detach().cpu().double(), 0.0)                   # (B, heads, N, N)
        rows = probs.sum(-1)[pair.sum(-1)[:, None].expand_as(probs[..., 0]) > 0]               # real queries
        if bool((probs >= 0).all()) and bool(((rows - 1).abs() < 1e-3).all()):               # softmax rows
            return probs
    return None


def attention_by_offset(teacher: nn.Module, paths: list[str], batches, progress: bool = False):
    """Per path, (sums (heads, 2L - 1), pair counts (2L - 1,)) of attention probability by offset.

    Index i holds offset d = i - (L - 1) = key - query; L is the longest sequence in ``batches``.
    Only pairs of real tokens (attention_mask 1 at both ends) count.
    """
    modules = {p: teacher.get_submodule(p) for p in paths}
    longest = max(b["input_ids"].shape[1] for b in batches)
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(2 * longest - 1, dtype=torch.float64)
    kwargs = {"output_attentions": True}
    if getattr(getattr(teacher, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad(), _eager_attention(teacher):
            for batch in tqdm(batches, desc="attention", disable=not progress):
                batch = {k: v.to(device) for k, v in batch.items()}
                b, n = batch["input_ids"].shape
                mask = batch.get("attention_mask")
                mask = torch.ones(b, n, dtype=torch.float64) if mask is None else mask.detach().cpu().double()
                pair = mask[:, :, None] * mask[:, None, :]                                      # (B, N, N) q, k
                pos = torch.arange(n)
                rel = (pos[None, :] - pos[:, None] + longest - 1).reshape(-1)                  # (N*N,) key - query
                counts.index_add_(0, rel, pair.sum(0).reshape(-1))
                with record_module_io(modules) as calls:
                    teacher(**model_inputs(batch), **kwargs)
                for path in paths:
                    if not calls[path]:
                        raise TrainingError(f"seed_filters_from_attention: the teacher never called {path!r}")
                    probs = _probabilities(calls[path][0][2], pair)
                    if probs is None:
                        raise UnsupportedModelError(
                            f"seed_filters_from_attention: the teacher's {type(modules[path]).__name__} at "
                            f"{path!r} returns no attention probabilities (B, heads, N, N) even with eager "
                            "attention and output_attentions=True; seed from a Hugging Face model whose "
                            "attention supports attn_implementation='eager'")
                    heads = probs.shape[1]
                    acc = sums.setdefault(path, torch.zeros(heads, 2 * longest - 1, dtype=torch.float64))
                    if acc.shape[0] != heads:
                        raise TrainingError(f"seed_filters_from_attention: {path!r} returned {acc.shape[0]} "
                                            f"attention heads in one batch and {heads} in another")
                    acc.index_add_(1, rel, probs.sum(0).reshape(heads, -1))                   # by key - query
    finally:
        teacher.train(was_training)
    return {p: (sums[p], counts) for p in paths}


def filter_target(sums: torch.Tensor, counts: torch.Tensor, mixer: M2SequenceMixer, length: int):
    """(target taps (heads_f, H, L), offset weights (heads_f, 1, L)) for ``mixer``'s gated filter.

    Teacher head h's profile goes to channels [h * head_dim, (h + 1) * head_dim); weights are pair
    counts normalised to mean 1 over the fitted taps (0 for reverse tap 0, which the conv ignores).
    """
    heads, width = sums.shape
    longest = (width + 1) // 2
    h = mixer.d_inner
    if h % heads:
        raise ShapeError(f"seed_filters_from_attention: the teacher has {heads} attention heads, which do "
                         f"not divide the mixer width {h}")
    profile = sums / counts.clamp_min(1.0)                                                      # (heads, 2L' - 1)
    zero = longest - 1
    j = torch.arange(length)
    back, ahead = zero - j, zero + j                                                            # d = -j, +j
    valid = j < longest
    back, ahead = back.clamp(0, width - 1), ahead.clamp(0, width - 1)
    directions = [back] if mixer.mode != "bidirectional" else [back, ahead]
    target = torch.stack([profile[:, idx] * valid for idx in directions])                      # (heads_f, heads, L)
    weight = torch.stack([counts[idx] * valid for idx in directions])                          # (heads_f, L)
    if len(directions) == 2:
        weight[1, 0] = 0.0
    weight = weight / weight[weight > 0].mean()
    target = target.repeat_interleave(h // heads, dim=1)                                       # (heads_f, H, L)
    return target.float(), weight[:, None, :].float()


def seed_filters_from_attention(student: nn.Module, teacher: nn.Module, batches, *, steps: int = 300,
                                lr: float = 1e-2, max_offset: int | None = None, open_gates: bool = False,
                                progress: bool = True) -> dict:
    """Fit every M2SequenceMixer's gated filter to the teacher's average attention by relative offset.

    Args:
        student: a converted model (m2convert.convert's output), changed in place: only the
            parameters of each mixer's ``filter`` change (and, with ``open_gates``, D and the x1/x2
            rows of in_proj); the residual filter and everything else stay bit-equal.
        teacher: the model the student was converted from (a Hugging Face model: it is run once per
            batch with eager attention and ``output_attentions=True``; restored afterwards).
        batches: dicts with input_ids (B, N) and optionally attention_mask (B, N) (labels are
            dropped); a few hundred sentences are plenty.
        steps, lr: Adam steps and learning rate of each filter's fit.
        max_offset: fit taps 0..max_offset - 1 (default: the longest sequence in ``batches``);
            offsets the data never shows get weight 0.
        open_gates: also set x1 = x2 = 1 and D = 0 (needs a dense nn.Linear in_proj), so each mixer
            starts as out_proj(conv(V x, k)), the teacher's position-averaged attention.

    Returns ``{"offsets": L, "longest_sequence", "batches", "token_pairs", "gates": "open" | "kept",
    "seconds", "layers": {path: {"mode", "teacher_heads", "fit_error_before", "fit_error_after",
    "corr_before", "corr_after"}}}``: fit error is the pair-weighted relative MSE of the taps
    (filter heads, H, L) against the target, corr the mean weighted Pearson correlation over
    (filter head, channel) rows.

    Raises TrainingError when the student has no M2SequenceMixer (or the teacher lacks a module at
    a mixer's path), UnsupportedModelError when the teacher's attention returns no probabilities,
    ShapeError when its head count does not divide the mixer width, ConfigError for bad arguments
    (and ``open_gates`` on a Monarch in_proj). Every check runs before the student is changed.

    Example:
        >>> teacher = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
        >>> student = m2.convert(teacher, m2.ConvertConfig(filter_order=16))
        >>> batches = [{"input_ids": torch.randint(0, 100, (2, 24))} for _ in range(2)]
        >>> rep = seed_filters_from_attention(student, teacher, batches, steps=20, progress=False)
        >>> layer = rep["layers"]["encoder.layer.0.attention"]
        >>> bool(layer["fit_error_after"] < layer["fit_error_before"])
        True
    """
    _check_arguments(student, teacher, steps, lr, max_offset)
    batches = list(batches)
    if not batches:
        raise ConfigError("seed_filters_from_attention needs at least one batch of teacher inputs")
    start = time.perf_counter()
    mixers = _seedable_mixers(student, teacher, open_gates)
    pairs = list(mixers)
    stats = attention_by_offset(teacher, pairs, batches, progress)
    longest = max(b["input_ids"].shape[1] for b in batches)
    length = max_offset or longest
    report = {"offsets": length, "longest_sequence": longest, "batches": len(batches),
              "token_pairs": int(stats[pairs[0]][1].sum().item()), "gates": "open" if open_gates else "kept",
              "layers": {}}
    targets = {p: filter_target(*stats[p], mixers[p], length) for p in pairs}   # every check before any change
    for path in tqdm(pairs, desc="fit filters", disable=not progress):
        mixer = mixers[path]
        report["layers"][path] = _fit(mixer, *targets[path], steps, lr)
        report["layers"][path]["teacher_heads"] = stats[path][0].shape[0]
        if open_gates:
            _open_gates(mixer)
    report["seconds"] = time.perf_counter() - start
    return report


def _check_arguments(student: nn.Module, teacher: nn.Module, steps, lr, max_offset) -> None:
    check_int("steps", steps, low=1)
    if not lr > 0:
        raise ConfigError(f"lr={lr!r} must be > 0")
    if max_offset is not None:
        check_int("max_offset", max_offset, low=1)
    if student is teacher:
        raise ConfigError("student and teacher are the same object; pass the converted copy as the student")


def _seedable_mixers(student: nn.Module, teacher: nn.Module, open_gates: bool) -> dict[str, M2SequenceMixer]:
    """{path: mixer} of the student's replaced modules that hold an M2SequenceMixer, in module order,
    each with a module at the same path in the teacher; raises before anything is changed."""
    mixers = {p: m for p, m in ((p, _mixer_of(b)) for p, b in replaced_modules(student)) if m is not None}
    if not mixers:
        raise TrainingError("seed_filters_from_attention: the student has no M2SequenceMixer (no attention was "
                            "converted); convert attention with m2convert.convert(..., sequence=True)")
    paired = [p for p, _, _ in layer_pairs(student, teacher) if p in mixers]      # same path in the teacher
    structured = [p for p in paired if type(mixers[p].in_proj) is not nn.Linear or mixers[p].in_proj.bias is None]
    if open_gates and structured:
        raise ConfigError(f"open_gates=True resets the gate rows of a dense, biased in_proj; {structured[0]!r} has "
                          f"{mixers[structured[0]].in_proj!r}; convert with dense mixer projections or pass "
                          "open_gates=False")
    return {p: mixers[p] for p in paired}


def _open_gates(mixer: M2SequenceMixer) -> None:
    """x1 = x2 = 1 and D = 0: the gated branch becomes conv(v, k) with v = V x."""
    h = mixer.d_inner
    with torch.no_grad():
        mixer.in_proj.weight[:2 * h].zero_()                                    # rows x1 | x2 of (3D, H)
        mixer.in_proj.bias[:2 * h].fill_(1.0)
        mixer.D.zero_()


def _fit(mixer: M2SequenceMixer, target: torch.Tensor, weight: torch.Tensor, steps: int, lr: float) -> dict:
    return {"mode": mixer.mode, **mixer.filter.fit_taps(target, weight, steps, lr)}
