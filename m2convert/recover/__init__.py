"""Recovery: distillation and retraining that bring a converted model back to its teacher's quality.

    from m2convert.recover import distill, DistillConfig, StageConfig
    result = distill(student, teacher, "sst2/train.tsv", DistillConfig(stages=["transfer", "kd"]))

Stages come from one registry (:mod:`.registry`): ``register_stage`` adds one next to its objective.
"""

from .config import DistillConfig, StageConfig
from .distill import DistillResult, StageResult, distill
from .registry import StageKind, TeacherInputs, register_stage, stage_kind, stage_names, unregister_stage
from .seed import seed_filters_from_attention
from .stages import MODULE_IO, TEACHER_OUTPUTS, layer_pairs, record_module_io, replaced_modules

__all__ = ["DistillConfig", "DistillResult", "DistillTrainer", "MODULE_IO", "StageConfig", "StageKind", "StageResult",
           "TEACHER_OUTPUTS", "TeacherInputs", "distill", "layer_pairs", "record_module_io", "register_stage",
           "replaced_modules", "seed_filters_from_attention", "stage_kind", "stage_names", "unregister_stage"]


def __getattr__(name: str):
    # DistillTrainer subclasses transformers.Trainer, whose import costs seconds (accelerate and the
    # rest of the training stack); load it on first use rather than with every ``import m2convert``.
    if name == "DistillTrainer":
        from .trainer import DistillTrainer
        return DistillTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
