"""m2convert: turn pretrained Transformers into Monarch Mixer (M2) models and recover their quality."""

from .errors import M2Error
from .layers import M2SequenceMixer, MonarchLinear

__all__ = ["M2Error", "M2SequenceMixer", "MonarchLinear"]
__version__ = "0.1.0"
