"""Recovery: distillation and retraining that bring a converted model back to its teacher's quality.

    from m2convert.recover import distill, DistillConfig, StageConfig
    result = distill(student, teacher, "sst2/train.tsv", DistillConfig(stages=["transfer", "kd"]))
"""

from .config import DistillConfig, StageConfig
from .distill import DistillResult, StageResult, distill
from .seed import seed_filters_from_attention
from .stages import layer_pairs, replaced_modules

__all__ = ["DistillConfig", "DistillResult", "StageConfig", "StageResult", "distill", "layer_pairs",
           "replaced_modules", "seed_filters_from_attention"]
