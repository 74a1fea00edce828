"""m2convert: turn pretrained Transformers into Monarch Mixer (M2) models and recover their quality."""

from .api import convert, diff, load_model, plan
from .config import ConvertConfig
from .errors import M2Error
from .layers import M2SequenceMixer, MonarchLinear
from .passes.diff import RewriteDiff
from .passes.plan import RewritePlan

__all__ = ["ConvertConfig", "M2Error", "M2SequenceMixer", "MonarchLinear", "RewriteDiff", "RewritePlan", "convert", "diff", "load_model", "plan"]
__version__ = "0.1.0"
