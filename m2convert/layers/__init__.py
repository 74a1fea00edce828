"""The M2 layers: Monarch matrices, the sequence mixer, and the attention adapters that put a mixer in
an HF attention module's place (with its decoding cache and the recurrent form of causal filters).
Plain nn.Modules; they import no passes."""

from .attention import ADAPTERS, M2Attention, M2PostNormAttention, padding_mask
from .base import M2Block
from .cache import M2CacheLayer
from .decode import RecurrentState
from .experts import MonarchExperts
from .filters import ImplicitFilter
from .monarch import MonarchLinear, monarch_shape
from .quantized import Int8MonarchLinear, quantize_int8
from .recurrent import RecurrentFilter, RecurrentReport, to_recurrent
from .sequence import M2SequenceMixer

__all__ = ["ADAPTERS", "ImplicitFilter", "Int8MonarchLinear", "M2Attention", "M2Block", "M2CacheLayer", "M2PostNormAttention",
           "M2SequenceMixer", "MonarchExperts", "MonarchLinear", "RecurrentFilter", "RecurrentReport", "RecurrentState",
           "monarch_shape", "padding_mask", "quantize_int8", "to_recurrent"]
