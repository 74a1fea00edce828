"""The recovery objectives: layer-wise transfer, end-to-end KD and task fine-tuning, each registered
as a stage (:mod:`.registry`) at the end of this file.

Each objective is an nn.Module whose forward returns the scalar loss, so DDP can wrap it and
average the gradients of exactly the parameters it trains.

Layer pairs: the outermost M2Block modules of the student (what m2convert put in) and the module at
the same path in the teacher (what they replaced).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import primary_input
from ..errors import ConfigError, TrainingError
from ..layers import M2Block
from .registry import TeacherInputs, register_stage, stage_kind


def replaced_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost :class:`M2Block` modules of ``model`` as (path, module), in module order.

    Example:
        >>> teacher = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
        >>> student = m2.convert(teacher, m2.ConvertConfig(filter_order=8))
        >>> [p for p, _ in replaced_modules(student)]
        ['encoder.layer.0.attention', 'encoder.layer.0.intermediate.dense', 'encoder.layer.0.output.dense']
    """
    found = []
    for path, module in model.named_modules():
        if isinstance(module, M2Block) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, module))
    return found


def layer_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(path, student module, teacher module) for every replaced module of the student.

    Example:
        >>> teacher = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
        >>> student = m2.convert(teacher, m2.ConvertConfig(filter_order=8))
        >>> [(p, type(t).__name__) for p, _, t in layer_pairs(student, teacher)][:1]
        [('encoder.layer.0.attention', 'BertAttention')]
    """
    pairs = []
    for path, module in replaced_modules(student):
        try:
            original = teacher.get_submodule(path)
        except AttributeError:
            raise TrainingError(f"transfer: the teacher has no module at {path!r}, where the student has "
                                f"{type(module).__name__}; pass the model the student was converted from") from None
        pairs.append((path, module, original))
    if not pairs:
        raise TrainingError("transfer: the student has no M2 modules (nothing was converted); "
                            "convert it with m2convert.convert first or drop the transfer stage")
    return pairs


@contextmanager
def record_module_io(modules: dict[str, nn.Module], on_call=None):
    """Record every call of the given modules (forward hooks): ``calls[path]`` = list of (args, kwargs, output);
    with ``on_call(path, args, kwargs, output)`` each call goes to it instead and nothing is kept.

    Example:
        >>> teacher = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
        >>> attn = teacher.encoder.layer[0].attention
        >>> with torch.no_grad(), record_module_io({"encoder.layer.0.attention": attn}) as calls:
        ...     _ = teacher(input_ids=torch.randint(0, 100, (2, 7)))
        >>> args, kwargs, out = calls["encoder.layer.0.attention"][0]
        >>> args[0].shape                                        # the hidden states the attention saw
        torch.Size([2, 7, 32])
    """
    calls: dict[str, list] = {path: [] for path in modules}
    handles = []
    for path, module in modules.items():
        def hook(_module, args, kwargs, output, path=path):
            if on_call is None:
                calls[path].append((args, kwargs, output))
            else:
                on_call(path, args, kwargs, output)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def first_tensor(x) -> torch.Tensor:
    """The main output of a module: the tensor itself, or the first element of a tuple / ModelOutput."""
    if torch.is_tensor(x):
        return x
    if isinstance(x, (tuple, list)) and x and torch.is_tensor(x[0]):
        return x[0]
    if hasattr(x, "to_tuple"):
        return first_tensor(x.to_tuple())
    raise TrainingError(f"cannot find the output tensor of a module that returned {type(x).__name__}")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
               relative: bool = True) -> torch.Tensor:
    """MSE over real tokens; ``relative`` divides by the target's mean square (scale-free per layer).

    Shapes: pred, target (B, N, ...) or (B, ...); mask (B, N) of 0/1 applied when pred is (B, N, ...).

    Example:
        >>> t = torch.ones(2, 3, 4)
        >>> masked_mse(t * 0.5, t, torch.ones(2, 3)).item()
        0.25
    """
    diff = (pred.float() - target.float()) ** 2
    ref = target.float() ** 2
    if mask is not None and pred.dim() >= 2 and tuple(pred.shape[:2]) == tuple(mask.shape):
        m = mask.to(diff.dtype).reshape(*mask.shape, *([1] * (pred.dim() - 2)))   # (B, N, 1...)
        diff, ref = diff * m, ref * m
        count = m.sum() * (pred[0, 0].numel())
    else:
        count = torch.tensor(float(diff.numel()), device=diff.device)
    if relative:
        return diff.sum() / ref.sum().clamp_min(1e-12)
    return diff.sum() / count.clamp_min(1.0)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, times T^2 (Hinton et al.).

    Shapes: logits (B, C) for classifiers, (B, N, V) for LMs with mask (B, N); averaged over rows
    (real tokens only).

    Example:
        >>> logits = torch.randn(4, 2)
        >>> kd_kl(logits, logits, temperature=2.0).abs().item() < 1e-6
        True
    """
    t = temperature
    logp_s = F.log_softmax(student_logits.float() / t, dim=-1)
    logp_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)                          # (B,) or (B, N)
    if mask is not None and kl.dim() == 2 and tuple(kl.shape) == tuple(mask.shape):
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1.0) * t * t
    return kl.mean() * t * t


class TransferObjective(nn.Module):
    """Mean over replaced modules of the (relative) MSE between each module, fed the teacher's own
    inputs to that layer, and the teacher module's output.

    forward(calls, mask) with ``calls`` from :func:`record_module_io` on the teacher and mask (B, N).
    """

    def __init__(self, pairs: list[tuple[str, nn.Module, nn.Module]], loss: str = "relative-mse"):
        super().__init__()
        self.paths = [p for p, _, _ in pairs]
        self.layers = nn.ModuleList([s for _, s, _ in pairs])
        self.relative = loss == "relative-mse"

    def forward(self, calls: dict[str, list], mask: torch.Tensor | None) -> torch.Tensor:
        losses = []
        for path, layer in zip(self.paths, self.layers):
            if not calls[path]:
                raise TrainingError(f"transfer: the teacher never called {path!r} in its forward pass")
            for args, kwargs, output in calls[path]:
                pred = first_tensor(layer(*args, **kwargs))
                losses.append(masked_mse(pred, first_tensor(output), mask, self.relative))
        return torch.stack(losses).mean()


def model_inputs(batch: dict, labels: bool = False) -> dict:
    """The batch as model keyword arguments (``labels`` dropped unless asked for)."""
    return {k: v for k, v in batch.items() if labels or k != "labels"}


def teacher_forward(teacher: nn.Module, batch: dict, hidden: bool):
    """The teacher's outputs on ``batch`` (no labels, no cache, no grad)."""
    kwargs = {"output_hidden_states": True} if hidden else {}
    if getattr(getattr(teacher, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    with torch.no_grad():
        return teacher(**model_inputs(batch), **kwargs)


def _logits(out):
    return getattr(out, "logits", None) if not isinstance(out, dict) else out.get("logits")


def output_divergence(out, teacher_out, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    """The student's distance to the teacher's outputs: :func:`kd_kl` of the logits where both have them
    (``mask`` (B, N) of real tokens, for (B, N, V) logits), else :func:`masked_mse` of their main tensors."""
    s_logits, t_logits = _logits(out), _logits(teacher_out)
    if s_logits is not None and t_logits is not None:
        return kd_kl(s_logits, t_logits, temperature, mask)
    return masked_mse(first_tensor(out), first_tensor(teacher_out), mask)


class EndToEndObjective(nn.Module):
    """The ``kd`` / ``task`` loss of the whole student against the teacher's outputs.

        loss = task_weight * labels' loss      (stages registered with labels=True; the model's own loss)
             + kd_weight * T^2 KL(teacher || student) on logits (last-hidden-state relative MSE
               for models without logits)
             + hidden_weight * mean over layers of the hidden states' relative MSE

    forward(batch, teacher_out) -> scalar loss.
    """

    def __init__(self, student: nn.Module, stage):
        super().__init__()
        self.student = student
        self.stage = stage
        self.labels = stage_kind(stage.name).labels

    def forward(self, batch: dict, teacher_out) -> torch.Tensor:
        st = self.stage
        task = self.labels and st.task_weight > 0
        if task and "labels" not in batch:
            raise TrainingError(f"stage {st.name!r} needs labels in the batches (a labelled TSV/JSONL, or a "
                                "'labels' tensor); use stage 'kd' for unlabelled data")
        kwargs = {"output_hidden_states": True} if st.hidden_weight > 0 else {}
        out = self.student(**model_inputs(batch, labels=task), **kwargs)
        mask = batch.get("attention_mask")
        loss = torch.zeros((), device=primary_input(batch).device)
        if task:
            if getattr(out, "loss", None) is None:
                raise TrainingError(f"stage {st.name!r}: {type(self.student).__name__} returned no loss for the "
                                    "labels; use a model with a task head")
            loss = loss + st.task_weight * out.loss
        if st.kd_weight > 0:
            loss = loss + st.kd_weight * output_divergence(out, teacher_out, st.temperature, mask)
        if st.hidden_weight > 0:
            hs, ht = out.hidden_states, teacher_out.hidden_states
            terms = [masked_mse(a, b, mask) for a, b in zip(hs[1:], ht[1:])]
            loss = loss + st.hidden_weight * torch.stack(terms).mean()
        return loss


def _feed_module_io(model, objective: TransferObjective, teacher: nn.Module, batch: dict, stage) -> torch.Tensor:
    modules = {path: teacher.get_submodule(path) for path in objective.paths}
    with torch.no_grad(), record_module_io(modules) as calls:
        teacher_forward(teacher, batch, hidden=False)
    return model(calls, batch.get("attention_mask"))


def _feed_outputs(model, objective: nn.Module, teacher: nn.Module, batch: dict, stage) -> torch.Tensor:
    return model(batch, teacher_forward(teacher, batch, hidden=stage.hidden_weight > 0))


def transfer_layerwise(objective: TransferObjective, teacher: nn.Module, batch: dict, stage=None) -> torch.Tensor:
    """The ``transfer`` loss and its gradients, holding one layer's activations at a time.

    In the teacher's forward hook of each replaced module, the student's module at that path runs on
    the same inputs, its loss is back-propagated at once and its activations are freed; the
    teacher runs forward once (no grad). Each call's loss is scaled by 1 / (number of calls), so the
    gradients accumulated in ``objective``'s parameters equal those of ``objective(calls, mask)``
    after ``backward``. Returns the mean loss, detached. Shapes: batch tensors (B, N).

    Example:
        >>> teacher = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
        >>> student = m2.convert(teacher, m2.ConvertConfig(filter_order=8))
        >>> objective = TransferObjective(layer_pairs(student, teacher))
        >>> loss = transfer_layerwise(objective, teacher, {"input_ids": torch.randint(0, 100, (2, 7))})
        >>> loss.requires_grad, objective.layers[0].mixer.in_proj.weight.grad is not None
        (False, True)
    """
    layers = dict(zip(objective.paths, objective.layers))
    mask = batch.get("attention_mask")
    expected = len(layers)                             # one call per module, as models call them
    losses: list[torch.Tensor] = []
    seen: set[str] = set()

    def step(path, args, kwargs, output):
        with torch.enable_grad():
            pred = first_tensor(layers[path](*args, **kwargs))
            loss = masked_mse(pred, first_tensor(output), mask, objective.relative)
            with torch.autocast(pred.device.type, enabled=False):
                (loss / expected).backward()
        losses.append(loss.detach())
        seen.add(path)

    with record_module_io({path: teacher.get_submodule(path) for path in layers}, on_call=step):
        teacher_forward(teacher, batch, hidden=False)
    missing = [p for p in layers if p not in seen]
    if missing:
        raise TrainingError(f"transfer: the teacher never called {missing[0]!r} in its forward pass")
    if len(losses) != expected:                        # a module called more than once: mean over all calls
        for p in objective.parameters():
            if p.grad is not None:
                p.grad.mul_(expected / len(losses))
    return torch.stack(losses).mean()


# The objective's forward(calls, mask) gets the teacher's recorded inputs/outputs of the modules at
# ``objective.paths``; forward(batch, teacher_out) gets the teacher's end-to-end outputs.
MODULE_IO = TeacherInputs("module inputs/outputs", _feed_module_io, layerwise=transfer_layerwise)
TEACHER_OUTPUTS = TeacherInputs("end-to-end outputs", _feed_outputs)


def transfer_objective(student: nn.Module, teacher: nn.Module, stage) -> TransferObjective:
    """Every replaced module of ``student`` against the teacher module at its path (stage ``transfer``)."""
    return TransferObjective(layer_pairs(student, teacher), stage.loss)


def end_to_end_objective(student: nn.Module, teacher: nn.Module, stage) -> EndToEndObjective:
    """The whole ``student`` against the teacher's outputs (stages ``kd`` and ``task``)."""
    return EndToEndObjective(student, stage)


def _check_kd(stage) -> None:
    if stage.kd_weight == 0 and stage.hidden_weight == 0:
        raise ConfigError(f"stage {stage.name!r} has kd_weight=0 and hidden_weight=0: it would train on nothing")


def _check_task(stage) -> None:
    if stage.task_weight == 0 and stage.kd_weight == 0:
        raise ConfigError(f"stage {stage.name!r} has task_weight=0 and kd_weight=0: it would train on nothing")


# Defaults follow the SPEC section 7 calibration on all-MiniLM-L6-v2 / SST-2.
register_stage("transfer", transfer_objective, inputs=MODULE_IO, order=10, lr=1e-3, train="replaced")
register_stage("kd", end_to_end_objective, inputs=TEACHER_OUTPUTS, order=20, lr=1e-4, train="all", kd_weight=1.0,
               validate=_check_kd)
register_stage("task", end_to_end_objective, inputs=TEACHER_OUTPUTS, order=30, lr=1e-4, train="all", labels=True,
               validate=_check_task)
