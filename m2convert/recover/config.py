"""DistillConfig and StageConfig: the settings of a recovery run, validated and JSON round-trippable.

Defaults follow the SPEC section 7 calibration on all-MiniLM-L6-v2 / SST-2: layer-wise ``transfer``
at lr 1e-3 with a masked relative-MSE loss, then ``kd`` at temperature 2 and ``task`` at lr 1e-4.
Stage names, their defaults, their own checks and their order come from the stage registry
(:mod:`.registry`); the built-in stages register in :mod:`.stages`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from ..errors import ConfigError, check_choice, check_int
from . import stages as _builtin_stages  # noqa: F401  (registers transfer, kd and task)
from .registry import TRAIN_CHOICES, stage_kind, stage_names

SCHEDULES = ("constant", "linear", "cosine")
TRANSFER_LOSSES = ("relative-mse", "mse")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
AUTOCAST = ("bf16",)                         # or None: full precision


def _check_float(name: str, value, *, low: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise ConfigError(f"{name}={value} must be {'>' if strict else '>='} {low}")
    return float(value)


@dataclass
class StageConfig:
    """One recovery stage.

    Args:
        name: a registered stage (:func:`~.registry.stage_names`); built in: "transfer" (layer-wise
            MSE of each replaced module to the teacher module at the same path, fed the teacher's own
            inputs), "kd" (KL on logits at ``temperature``, plus ``hidden_weight`` x hidden-state MSE)
            or "task" (labels' loss, plus ``kd_weight`` x KL).
        lr: peak learning rate (AdamW); default: the stage's registered lr.
        steps: optimizer steps; ``tokens``: a token budget (real tokens, all ranks). At least one;
            the stage ends at whichever is reached first.
        train: which student parameters train: "replaced" (only the M2 modules m2convert put in),
            "all", or a list of regular expressions matched against parameter names; default: the
            stage's registered choice.
        schedule: "constant" | "linear" | "cosine" decay after ``warmup_steps`` of linear warmup.
        weight_decay, grad_clip: AdamW weight decay; max gradient norm (0 = no clipping).
        loss: transfer loss, "relative-mse" (per layer, ||s - t||^2 / ||t||^2 over real tokens) or "mse".
        temperature: KD temperature. kd_weight: weight of the KD term (default: the stage's
            registered weight, kd 1, task 0).
        hidden_weight: weight of the hidden-state MSE (all layers' hidden states, real tokens only).
        task_weight: weight of the labels' loss in ``task``.
        layerwise: hold one layer's activations at a time (stages fed the teacher's module inputs,
            such as ``transfer``): each replaced module runs and back-propagates inside the teacher's
            forward hook of the module it replaces, so one teacher forward per step and the same
            gradients as the all-at-once default.
        lora_rank: rank of a LoRA adapter on every dense ``nn.Linear`` the conversion left (not inside
            an M2 module, weight not tied to another module); 0: none. The adapters and the modules
            chosen by ``train`` (default "replaced" when lora_rank > 0) train, the adapted linears'
            own weights do not, and the adapters are merged back into plain linears when the stage
            ends. Needs ``peft``. lora_alpha: LoRA scaling numerator (update x alpha / rank).

    Example:
        >>> StageConfig("transfer", steps=600).lr
        0.001
    """

    name: str
    lr: float | None = None
    steps: int | None = None
    tokens: int | None = None
    train: str | list[str] | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss: str = "relative-mse"
    temperature: float = 2.0
    kd_weight: float | None = None
    hidden_weight: float = 0.0
    task_weight: float = 1.0
    layerwise: bool = False
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def __post_init__(self):
        kind = stage_kind(self.name)
        if self.lr is None:
            self.lr = kind.lr
        check_int(f"{self.name}.lora_rank", self.lora_rank, low=0)
        if self.train is None:
            self.train = "replaced" if self.lora_rank else kind.train
        if self.kd_weight is None:
            self.kd_weight = kind.kd_weight
        _check_float(f"{self.name}.lr", self.lr, strict=True)
        if self.steps is None and self.tokens is None:
            raise ConfigError(f"stage {self.name!r} needs steps= or tokens= (a token budget)")
        if self.steps is not None:
            check_int(f"{self.name}.steps", self.steps, low=1)
        if self.tokens is not None:
            check_int(f"{self.name}.tokens", self.tokens, low=1)
        if isinstance(self.train, str):
            if self.train not in TRAIN_CHOICES:
                raise ConfigError(f"{self.name}.train={self.train!r}: use 'replaced', 'all' or a list of regexes")
        elif isinstance(self.train, (list, tuple)) and self.train and all(isinstance(t, str) for t in self.train):
            self.train = list(self.train)
        else:
            raise ConfigError(f"{self.name}.train={self.train!r}: use 'replaced', 'all' or a list of regexes")
        check_choice(f"{self.name}.schedule", self.schedule, SCHEDULES)
        check_int(f"{self.name}.warmup_steps", self.warmup_steps, low=0)
        check_choice(f"{self.name}.loss", self.loss, TRANSFER_LOSSES)
        _check_float(f"{self.name}.weight_decay", self.weight_decay)
        _check_float(f"{self.name}.grad_clip", self.grad_clip)
        _check_float(f"{self.name}.temperature", self.temperature, strict=True)
        for name in ("kd_weight", "hidden_weight", "task_weight"):
            _check_float(f"{self.name}.{name}", getattr(self, name))
        _check_float(f"{self.name}.lora_alpha", self.lora_alpha, strict=True)
        if not isinstance(self.layerwise, bool):
            raise ConfigError(f"{self.name}.layerwise={self.layerwise!r} must be True or False")
        if self.layerwise and kind.inputs.layerwise is None:
            raise ConfigError(f"stage {self.name!r} is fed the teacher's {kind.inputs.name}, which has no "
                              "layer-at-a-time form; layerwise=True applies to stages such as 'transfer'")
        if kind.validate is not None:
            kind.validate(self)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based) under this schedule."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant" or self.steps is None:
            return 1.0
        span = max(1, self.steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class DistillConfig:
    """Settings of :func:`m2convert.distill`.

    Args:
        stages: StageConfigs (or stage names, taking defaults and ``steps``) run in order; any subset
            of the registered stages (transfer, kd, task), in their registered order.
        steps: default steps of stages given by name.
        batch_size: examples per batch per rank. max_length: truncation of each row's text (TSV, CSV,
            JSONL, datasets); plain text is packed into blocks of min(block_size, max_length) tokens.
        block_size: tokens per block for plain-text (LM) data and unlabelled rows.
        text_column, label_column: the columns (keys) of TSV / CSV / JSONL rows holding the text (default:
            the first column that is not the label) and the label (default "label"; rows without it are
            unlabelled, enough for transfer and kd).
        bucket_by_length: batch file examples of similar length together (less padding, faster).
        seed: seeds the student's RNG (dropout) and the data order.
        checkpoint_dir: where checkpoints go (None: no checkpoints). checkpoint_every: steps between
            checkpoints (0: only at the end of each stage).
        resume: continue from the checkpoint in ``checkpoint_dir`` (exactly: weights, optimizer,
            scheduler, RNG and data position).
        on_bad: "skip" or "raise" for bad data rows.
        distributed: "auto" (DDP when launched by torchrun with WORLD_SIZE > 1), "none", "ddp", or
            "fsdp" (FSDP2: parameters, gradients and AdamW state sharded over the ranks; needs
            torchrun with more than one process; the student ends whole on every rank).
        progress: show a tqdm bar (rank 0) with loss and tokens/s.
        device: "cpu", "cuda", ... (None: the student's device).
        autocast: "bf16" runs the teacher's and the student's forward passes under
            ``torch.autocast(device.type, torch.bfloat16)`` (CPU or CUDA); weights, gradients and AdamW
            state stay fp32. None: full precision.
        gradient_checkpointing: recompute each transformer block's activations in the backward pass
            instead of keeping them (Hugging Face models: ``gradient_checkpointing_enable``; others:
            ``torch.utils.checkpoint`` around each element of their layer lists). Same gradients,
            less memory, about one more forward pass of time.

    Example:
        >>> cfg = DistillConfig(stages=["transfer", "kd"], steps=100)
        >>> DistillConfig.from_json(cfg.to_json()) == cfg
        True
    """

    stages: list = field(default_factory=lambda: ["transfer", "kd", "task"])
    steps: int = 100
    batch_size: int = 32
    max_length: int = 128
    block_size: int = 128
    text_column: str | None = None
    label_column: str = "label"
    bucket_by_length: bool = False
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    on_bad: str = "skip"
    distributed: str = "auto"
    progress: bool = True
    device: str | None = None
    autocast: str | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self):
        check_int("steps", self.steps, low=1)
        if isinstance(self.stages, str):
            self.stages = [s.strip() for s in self.stages.split(",") if s.strip()]
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ConfigError(f"stages={self.stages!r}: give a non-empty list of stage names or StageConfigs")
        stages = []
        for s in self.stages:
            if isinstance(s, str):
                s = StageConfig(s, steps=self.steps)
            elif isinstance(s, dict):
                try:
                    s = StageConfig(**s)
                except TypeError as e:
                    raise ConfigError(f"stage {s!r}: {e}") from None
            elif not isinstance(s, StageConfig):
                raise ConfigError(f"stage {s!r} is not a stage name, dict or StageConfig")
            stages.append(s)
        order = [stage_kind(s.name).order for s in stages]
        if order != sorted(order):
            raise ConfigError(f"stages {[s.name for s in stages]} are out of order; run them as "
                              f"{', '.join(stage_names())}")
        self.stages = stages
        for name in ("batch_size", "max_length", "block_size"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        check_int("checkpoint_every", self.checkpoint_every, low=0)
        check_choice("on_bad", self.on_bad, ("skip", "raise"))
        check_choice("distributed", self.distributed, DISTRIBUTED)
        if self.autocast is not None:
            check_choice("autocast", self.autocast, AUTOCAST)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"gradient_checkpointing={self.gradient_checkpointing!r} must be True or False")
        self._check_scale_options()
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("resume=True needs checkpoint_dir= (where the checkpoint to continue from lies)")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)

    def _check_scale_options(self) -> None:
        lora = [s.name for s in self.stages if s.lora_rank]
        if lora and self.checkpoint_every:
            raise ConfigError(f"stages {lora} use LoRA, whose adapters merge into the weights only when the stage "
                              "ends; use checkpoint_every=0 (a checkpoint at the end of each stage)")
        if lora and self.distributed == "fsdp":
            raise ConfigError(f"stages {lora} use LoRA, which distributed='fsdp' cannot add to an already "
                              "sharded student; use distributed='ddp' or lora_rank=0")
        layerwise = [s.name for s in self.stages if s.layerwise]
        if layerwise and self.distributed == "fsdp":
            raise ConfigError(f"stages {layerwise} are layerwise, which runs each module outside the FSDP root; "
                              "use distributed='ddp' or layerwise=False")

    def to_dict(self) -> dict:
        """A JSON-able dict (stages as dicts)."""
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown DistillConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "DistillConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"DistillConfig JSON is malformed: {e}") from None
