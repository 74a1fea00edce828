"""The M2 layers: Monarch matrices and the sequence mixer. Framework-neutral nn.Modules."""

from .base import M2Block
from .filters import ImplicitFilter
from .monarch import MonarchLinear, monarch_shape
from .sequence import M2SequenceMixer

__all__ = ["ImplicitFilter", "M2Block", "M2SequenceMixer", "MonarchLinear", "monarch_shape"]
