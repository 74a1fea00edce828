"""m2convert: turn pretrained Transformers into Monarch Mixer (M2) models and recover their quality."""

from .api import convert, diff, load_model, plan, to_recurrent
from .config import ConvertConfig
from .errors import M2Error
from .export import export
from .export_decode import decode_prefill, export_decode_step
from .layers import M2SequenceMixer, MonarchLinear
from .passes.diff import RewriteDiff
from .passes.lower import lower
from .passes.plan import RewritePlan
from .recover import DistillConfig, DistillResult, StageConfig, distill
from .serialize import from_pretrained, save_pretrained
from .version import __version__

__all__ = ["ConvertConfig", "DistillConfig", "DistillResult", "M2Error", "M2SequenceMixer", "MonarchLinear",
           "RewriteDiff", "RewritePlan", "StageConfig", "__version__", "convert", "decode_prefill", "diff", "distill",
           "export", "export_decode_step", "from_pretrained", "load_model", "lower", "plan", "save_pretrained",
           "to_recurrent"]
