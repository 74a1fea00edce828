"""m2convert: turn pretrained Transformers into Monarch Mixer (M2) models and recover their quality.

The public names below load on first use (:mod:`m2convert.lazy`), so ``import m2convert`` and
``m2convert --help`` stay quick; the first use of one imports torch, transformers and its module.
"""

from __future__ import annotations

from .lazy import lazy_names
from .version import __version__

_WHERE = {
    "convert": "api", "diff": "api", "load_model": "api", "plan": "api", "to_recurrent": "api",
    "ConvertConfig": "config", "M2Error": "errors",
    "export": None,                             # the subpackage, which is callable: m2.export(model, ...)
    "decode_prefill": "export.decode", "export_decode_step": "export.decode",
    "M2SequenceMixer": "layers", "MonarchLinear": "layers", "quantize_int8": "layers",
    "RewriteDiff": "passes.diff", "lower": "passes.lower", "RewritePlan": "passes.plan",
    "DistillConfig": "recover", "DistillResult": "recover", "StageConfig": "recover", "distill": "recover",
    "from_pretrained": "serialize", "save_pretrained": "serialize",
}
__all__ = sorted([*_WHERE, "__version__"])
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
