"""``distill``: run the recovery stages (transfer, kd, task, or any registered one) on a converted student.

One loop serves every stage: fetch batch ``k`` of the (resumable) data source, run the teacher and take
the loss as the stage's registered entry says (:mod:`.registry`), stop on a non-finite loss, step AdamW
at the stage's scheduled learning rate, checkpoint every ``checkpoint_every`` steps. Under torchrun each
rank reads its own batches and DDP averages gradients; with ``distributed="fsdp"`` a sharded copy of the
student trains instead (FSDP2, :mod:`.fsdp`) and its full weights are loaded back into the student at the end.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import load_data
from ..data.batches import batch_items
from ..errors import CheckpointError, ConfigError, TrainingError
from ..wrappers import inner_model, unwrap
from . import checkpoint as ckpt
from .config import DistillConfig, StageConfig
from .fsdp import ShardedStudent
from .lora import add_lora, merge_lora
from .memory import autocast, gradient_checkpointing, held_bytes, optimizer_tensors
from .parallel import Group, setup
from .registry import stage_kind
from .stages import replaced_modules

log = logging.getLogger("m2convert.recover")


@dataclass
class StageResult:
    """What one stage did: optimizer steps, real tokens (all ranks), seconds and the per-step losses;
    the bytes of parameters (of the module that trains) and of AdamW state this process held at the
    end of the stage (its local shards under fsdp)."""

    name: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    param_bytes: int = 0
    optimizer_bytes: int = 0

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last 10 steps (None before the first step)."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None


@dataclass
class DistillResult:
    """Per-stage results, the last checkpoint folder and the data source's row report."""

    stages: list[StageResult]
    checkpoint_path: str | None = None
    data_report: dict | None = None
    world_size: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        for s, r in zip(d["stages"], self.stages):
            s["first_loss"], s["final_loss"] = r.first_loss, r.final_loss
        return d


def _trainable(student: nn.Module, stage: StageConfig) -> list[str]:
    names = [n for n, _ in student.named_parameters()]
    if stage.train == "all":
        return names
    if stage.train == "replaced":
        prefixes = [p + "." for p, _ in replaced_modules(student)]
        chosen = [n for n in names if any(n.startswith(p) for p in prefixes)]
    else:
        patterns = [re.compile(p) for p in stage.train]
        chosen = [n for n in names if any(p.search(n) for p in patterns)]
    if not chosen:
        raise ConfigError(f"stage {stage.name!r}: train={stage.train!r} selects no parameter of the student")
    return chosen


def _unwrap(student, teacher, tokenizer):
    """The Hugging Face models inside wrapped student / teacher (SentenceTransformers), and the wrapped
    teacher's tokenizer when none was given."""
    wrapped_teacher = unwrap(teacher)
    if tokenizer is None and wrapped_teacher is not None:
        tokenizer = wrapped_teacher.tokenizer
    return inner_model(student), inner_model(teacher), tokenizer


def _resolve_tokenizer(tokenizer, teacher, data):
    if tokenizer is not None or not isinstance(data, (str, Path)) and not hasattr(data, "column_names"):
        return tokenizer
    source = getattr(getattr(teacher, "config", None), "_name_or_path", "")
    if source and Path(source).is_dir():
        from ..loading import load_tokenizer
        return load_tokenizer(source)
    raise ConfigError("reading files needs the teacher's tokenizer: pass tokenizer= to distill "
                      "(the teacher's config does not name a local folder to load it from)")


def _load_source(data, tokenizer, teacher, config: DistillConfig, group: Group):
    """The batch source of ``data`` (this rank's shard under torchrun)."""
    tokenizer = _resolve_tokenizer(tokenizer, teacher, data)
    source = load_data(data, tokenizer, batch_size=config.batch_size, max_length=config.max_length,
                       block_size=config.block_size, on_bad=config.on_bad, seed=config.seed,
                       bucket=config.bucket_by_length, text_column=config.text_column,
                       label_column=config.label_column)
    return source.shard(group.rank, group.world) if group.active else source


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class _Run:
    """The state one distill call carries from stage to stage."""

    def __init__(self, student, teacher, source, config: DistillConfig, group: Group, device, on_step):
        self.student, self.teacher, self.source = student, teacher, source
        self.config, self.group, self.device, self.on_step = config, group, device, on_step
        self.ckpt_path = Path(config.checkpoint_dir) / "latest" if config.checkpoint_dir else None
        self.results: list[StageResult] = []
        self.stage_index, self.stage_step, self.data_pos = 0, 0, 0
        self.current = None
        self.resume_doc, self.resume_path = None, None    # the checkpoint resumed from, until the first stage loads it
        self.sharded: ShardedStudent | None = None      # fsdp: the sharded copy that trains
        self.opt_names: list[str] = []                   # the names of the optimizer's parameters, in order
        self.lora = None                                 # the current stage's LoRA adapters, until merged

    @property
    def model(self) -> nn.Module:
        """The module that trains: the student, or its sharded copy under fsdp."""
        return self.sharded.module if self.sharded is not None else self.student

    def state(self) -> dict:
        return {"stage_index": self.stage_index, "stage_step": self.stage_step, "data_position": self.data_pos,
                "completed": [asdict(r) for r in self.results],
                "current": asdict(self.current) if self.current is not None else None,
                "stages": [s.name for s in self.config.stages]}

    def save(self, optimizer) -> None:
        if self.ckpt_path is None:
            return
        if self.sharded is not None:               # gather full weights and AdamW state to rank 0's plain student
            self.sharded.copy_into(self.student, rank0_only=True)
            optimizer = self.sharded.optimizer_state(optimizer, self.opt_names) if optimizer.state else None
        ckpt.save_checkpoint(self.ckpt_path, self.student, optimizer, self.state(), rank=self.group.rank,
                             world=self.group.world, barrier=self.group.barrier)

    def try_resume(self) -> None:
        if not (self.config.resume and self.ckpt_path is not None):
            return
        folder = ckpt.find_checkpoint(self.ckpt_path)
        doc = ckpt.read_state(folder) if folder is not None else None
        if doc is None:
            log.warning("resume=True but %s holds no checkpoint; starting from the beginning",
                        self.config.checkpoint_dir)
            return
        st = doc["state"]
        if doc["world_size"] != self.group.world:
            raise CheckpointError(f"{folder} was written by {doc['world_size']} ranks; resume it with "
                                  f"the same number (this run has {self.group.world}) to continue exactly")
        if st["stages"] != [s.name for s in self.config.stages]:
            raise CheckpointError(f"{folder} belongs to a run with stages {st['stages']}, this config "
                                  f"has {[s.name for s in self.config.stages]}")
        ckpt.load_model_weights(folder, self.student)
        self.results = [StageResult(**r) for r in st["completed"]]
        self.stage_index, self.stage_step, self.data_pos = st["stage_index"], st["stage_step"], st["data_position"]
        self.current = StageResult(**st["current"]) if st["current"] else None
        self.resume_doc, self.resume_path = doc, folder
        log.info("resumed from %s at stage %d step %d", folder, self.stage_index, self.stage_step)

    def _build(self, stage: StageConfig):
        """The stage's objective (unwrapped, and as it runs: DDP / FSDP), AdamW and its parameters."""
        student = self.model
        # The objective comes first: its own checks (transfer: the student has M2 modules and the
        # teacher a module at each of their paths) say more than "train= selects nothing" would.
        objective = stage_kind(stage.name).objective(student, self.teacher, stage)
        chosen = set(_trainable(student, stage))
        if self.lora is not None:
            chosen = (chosen - self.lora.base_names) | self.lora.adapter_names
        for name, p in student.named_parameters():
            p.requires_grad_(name in chosen)
        trained = [(n, p) for n, p in student.named_parameters() if n in chosen]
        self.opt_names = [n for n, _ in trained]                   # optimizer order, for fsdp's state dicts
        params = [p for _, p in trained]
        if self.sharded is not None:
            model = self.sharded.bind(objective)
        elif stage.layerwise:                     # back-propagates inside the teacher's forward: no DDP hooks
            model = objective
            self.group.broadcast(objective)       # rank 0's weights, as DDP would start from
        else:
            model = self.group.wrap(objective, self.device)
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
        return objective, model, opt, params

    def _restore_optimizer(self, opt) -> None:
        """On the first stage after a resume: the optimizer state (mid-stage only) and the RNG states."""
        if self.resume_doc is None:
            return
        folder = self.resume_path
        if self.stage_step > 0 and self.sharded is not None:
            self.sharded.load_optimizer_state(opt, self.opt_names, ckpt.read_optimizer(
                folder, self.resume_doc), folder / "optimizer.safetensors")
        elif self.stage_step > 0:
            ckpt.load_optimizer(folder, opt, self.resume_doc)
        ckpt.load_rng(folder, self.resume_doc, self.group.rank)
        self.resume_doc, self.resume_path = None, None

    def _stop_on_non_finite(self, stage: StageConfig, mean_loss: float, opt) -> None:
        if math.isfinite(mean_loss):
            return
        if self.lora is None:                      # a LoRA stage checkpoints only once merged, at its end
            self.save(opt)
        if self.sharded is not None:               # the student keeps the last good weights, as without fsdp
            self.sharded.copy_into(self.student)
        where = f" (last good checkpoint: {self.ckpt_path})" if self.ckpt_path else ""
        raise TrainingError(f"non-finite loss ({mean_loss}) in stage {stage.name!r} at step "
                            f"{self.stage_step}{where}; lower the learning rate or check the data")

    def _step(self, stage: StageConfig, objective, model, opt, params) -> tuple[float, int]:
        """One optimizer step on the next batch: (loss averaged over ranks, real tokens over ranks)."""
        batch = _to(self.source.batch(self.data_pos), self.device)
        for g in opt.param_groups:
            g["lr"] = stage.lr * stage.lr_factor(self.stage_step)
        ntok = torch.tensor(batch_items(batch))                       # tokens, or images
        inputs = stage_kind(stage.name).inputs
        opt.zero_grad(set_to_none=True)
        with autocast(self.config.autocast, self.device):
            if stage.layerwise:                   # gradients accumulate as the teacher runs
                loss = inputs.layerwise(objective, self.teacher, batch, stage)
            else:
                loss = inputs.loss(model, objective, self.teacher, batch, stage)
        totals = self.group.sum(torch.stack([loss.detach().double().cpu(), ntok.double().cpu()]))
        mean_loss = totals[0].item() / self.group.world
        self._stop_on_non_finite(stage, mean_loss, opt)
        if stage.layerwise:
            self.group.average_gradients(params)
        else:
            loss.backward()
        if stage.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        opt.step()
        self.stage_step += 1
        self.data_pos += 1
        return mean_loss, int(totals[1].item())

    def run_all(self) -> None:
        """Every stage not done yet, then (fsdp) the full weights back into the student. Whatever
        happens, the student gets back its requires_grad flags, train/eval mode and device."""
        student = self.student
        flags = {n: p.requires_grad for n, p in student.named_parameters()}
        was_training = student.training
        try:
            if self.group.fsdp:
                self.sharded = ShardedStudent(student, self.device, self.group.rank, self.group.world)
            with gradient_checkpointing(self.model, self.config.gradient_checkpointing):
                for i, stage in enumerate(self.config.stages):
                    if i >= self.stage_index:
                        self.run_stage(stage)
            if self.sharded is not None:
                self.sharded.copy_into(student)                 # full weights on every rank
        finally:
            for n, p in student.named_parameters():
                p.requires_grad_(flags[n])
            student.train(was_training)
            student.to(self.device)

    def run_stage(self, stage: StageConfig) -> StageResult:
        """One stage; a LoRA stage adds its adapters first and merges them when it ends, however it ends."""
        if stage.lora_rank:
            self.lora = add_lora(self.model, stage.lora_rank, stage.lora_alpha)
        try:
            return self._train_stage(stage)
        finally:
            if self.lora is not None:
                merge_lora(self.model)
                self.lora = None

    def _train_stage(self, stage: StageConfig) -> StageResult:
        objective, model, opt, params = self._build(stage)
        result = self.current if self.current is not None else StageResult(stage.name)
        self._restore_optimizer(opt)
        self.current = result
        self.model.train()
        bar = tqdm(total=stage.steps or stage.tokens, initial=result.steps if stage.steps else result.tokens,
                   desc=stage.name, unit="step" if stage.steps else "tok", dynamic_ncols=True,
                   disable=not (self.config.progress and self.group.rank == 0))
        t0 = time.perf_counter() - result.seconds
        done = lambda: ((stage.steps is not None and result.steps >= stage.steps)
                        or (stage.tokens is not None and result.tokens >= stage.tokens))
        while not done():
            mean_loss, tokens = self._step(stage, objective, model, opt, params)
            result.steps += 1
            result.tokens += tokens
            result.losses.append(mean_loss)
            result.seconds = time.perf_counter() - t0
            bar.update(1 if stage.steps else tokens)
            bar.set_postfix(loss=f"{mean_loss:.4g}", tok_s=f"{result.tokens / max(result.seconds, 1e-9):.0f}")
            if self.config.checkpoint_every and self.stage_step % self.config.checkpoint_every == 0 and not done():
                self.save(opt)
            if self.on_step is not None:
                self.on_step(stage.name, self.stage_step, mean_loss)
        bar.close()
        result.param_bytes = held_bytes(self.model.parameters())
        result.optimizer_bytes = held_bytes(optimizer_tensors(opt))
        if self.lora is not None:
            merge_lora(self.model)
            self.lora = None
        self.results.append(result)
        self.current, self.stage_index, self.stage_step = None, self.stage_index + 1, 0
        self.save(opt)
        return result


def distill(student: nn.Module, teacher: nn.Module, data, config: DistillConfig | None = None, *,
            tokenizer=None, on_step: Callable[[str, int, float], None] | None = None) -> DistillResult:
    """Recover a converted ``student`` towards its ``teacher`` with the stages of ``config``, in place.

    Args:
        student: the converted model (m2convert.convert's output; M2 modules are ``M2Block``s). A
            SentenceTransformer trains the Hugging Face model inside it (the recovery objectives compare
            token states, before pooling).
        teacher: the original (or a fine-tuned) model, or a SentenceTransformer; only run forward, never changed.
        data: a file path (.tsv / .jsonl / text), a Hugging Face dataset, an iterable of dict batches
            (input_ids (B, N), attention_mask (B, N), labels), or a ``m2convert.data`` batch source.
        config: DistillConfig (default: transfer, kd, task of 100 steps each).
        tokenizer: the teacher's tokenizer (needed for files; default: a SentenceTransformer teacher's own,
            else loaded from the teacher's folder).
        on_step: called as on_step(stage, step, loss) after every optimizer step.

    Returns a DistillResult: per-stage steps, tokens, seconds and losses, and the checkpoint folder.
    Raises TrainingError on a non-finite loss (after saving the last good checkpoint).

    Example:
        >>> teacher = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
        >>> student = m2.convert(teacher, m2.ConvertConfig(filter_order=8))
        >>> batches = [{"input_ids": torch.randint(0, 100, (4, 16))} for _ in range(4)]
        >>> cfg = DistillConfig(stages=[StageConfig("transfer", steps=4), StageConfig("kd", steps=2)], progress=False)
        >>> result = m2.distill(student, teacher, batches, cfg)
        >>> [(s.name, s.steps) for s in result.stages]
        [('transfer', 4), ('kd', 2)]
    """
    config = config or DistillConfig()
    if not isinstance(config, DistillConfig):
        raise ConfigError(f"config must be a DistillConfig, got {type(config).__name__}")
    student, teacher, tokenizer = _unwrap(student, teacher, tokenizer)
    if student is teacher:
        raise ConfigError("student and teacher are the same object; pass the converted copy as the student")
    device = torch.device(config.device) if config.device else next(student.parameters()).device
    group = setup(config.distributed, device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())      # this rank's GPU under torchrun
    try:
        source = _load_source(data, tokenizer, teacher, config, group)
        student.to("cpu" if group.fsdp else device)     # fsdp: the caller's copy waits on CPU, whole
        teacher.to(device).eval()
        torch.manual_seed(config.seed * 1009 + group.rank)
        run = _Run(student, teacher, source, config, group, device, on_step)
        run.try_resume()
        run.run_all()
        report = source.report.to_dict() if getattr(source, "report", None) else None
        return DistillResult(run.results, str(run.ckpt_path) if run.ckpt_path else None, report, group.world)
    finally:
        group.close()
