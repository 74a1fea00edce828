"""The one-call public API: plan, convert, diff, and loading a model by directory or id (``load_model``,
from :mod:`m2convert.loading`).

Each takes a transformers model, or a wrapper holding one (a sentence-transformers ``SentenceTransformer``,
see :mod:`m2convert.wrappers`): plan and diff look at the model inside, convert returns the wrapper around
the converted model.

Example:
    >>> import m2convert as m2
    >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
    ...                                  intermediate_size=64)
    >>> model = transformers.BertModel(config)
    >>> plan = m2.plan(model)                       # capture + analysis, nothing modified; print(plan): the table
    >>> converted = m2.convert(model, nblocks=8)    # = m2.plan(model, config).apply()
    >>> print(m2.diff(model, converted))
    3 module(s) replaced; ...
"""

from __future__ import annotations

from torch import nn

from . import serialize  # noqa: F401  (its hook gives each converted model an m2convert save_pretrained)
from .config import ConvertConfig
from .layers.recurrent import to_recurrent
from .loading import load_model
from .passes.capture import check_model
from .passes.diff import RewriteDiff
from .passes.diff import diff as _diff
from .passes.pipeline import as_config, plan_model
from .passes.plan import RewritePlan
from .selection import select_attention
from .wrappers import inner_model, unwrap

__all__ = ["convert", "diff", "load_model", "plan", "to_recurrent"]


def plan(model: nn.Module, config: ConvertConfig | dict | None = None, example_inputs=None, *,
         calibration=None, tokenizer=None, progress: bool = True) -> RewritePlan:
    """Capture ``model`` with torch.export and return its rewrite plan; the model is not modified.

    Args:
        model: an nn.Module, typically a transformers PreTrainedModel; for a SentenceTransformer, the
            plan of its Hugging Face model (``plan.apply()`` returns that model converted; ``m2.convert``
            returns the SentenceTransformer).
        config: ConvertConfig (or its dict form); defaults to ConvertConfig().
        example_inputs: dict of keyword tensors (e.g. ``{"input_ids": ids}``, shapes (B, N)) or a tuple
            of positional tensors; built from ``model.config`` when None.
        calibration: batches that measure which attention layers to keep when the config sets a budget
            (``keep_layers`` / ``keep_kv_bytes``): a list of dicts (input_ids (B, N), attention_mask
            (B, N)), or a text / TSV / JSONL file or dataset with ``tokenizer``. With them the default
            selection is "kl"; without, "uniform" (see :mod:`m2convert.selection`).
        tokenizer: the model's tokenizer, for calibration files.
        progress: a progress bar while the selection measures each layer.

    Raises:
        UnsupportedModelError: ``model`` is not an nn.Module.  CaptureError: export failed.
        ConfigError: invalid config.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> plan = m2.plan(transformers.BertModel(config))
        >>> [s.fqn for s in plan.converted][:2]
        ['encoder.layer.0.attention', 'encoder.layer.0']
    """
    result = plan_model(inner_model(model), config, example_inputs)
    if result.config.keeps_attention:
        select_attention(result, calibration, tokenizer=tokenizer, progress=progress)
    return result


def convert(model: nn.Module, config: ConvertConfig | dict | None = None, *, example_inputs=None,
            inplace: bool = False, calibration=None, tokenizer=None, progress: bool = True,
            **overrides) -> nn.Module:
    """``plan(model, config).apply()``: the converted model, same class; the original is untouched.

    Keyword ``overrides`` change ConvertConfig fields (``m2.convert(model, nblocks=8, dimension=False)``);
    ``calibration``, ``tokenizer`` and ``progress`` are :func:`plan`'s (the attention a budget keeps).
    A SentenceTransformer comes back as a SentenceTransformer around the converted Hugging Face model (a
    copy unless ``inplace``; its tokenizer, pooling and normalization as they were).

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> model = transformers.BertModel(config)
        >>> converted = m2.convert(model)
        >>> type(converted) is type(model)
        True
    """
    check_model(model, "m2.convert")
    config = as_config(config)
    if overrides:
        config = config.replace(**overrides)
    wrapped = unwrap(model)
    inner = model if wrapped is None else wrapped.inner
    converted = plan(inner, config, example_inputs, calibration=calibration, tokenizer=tokenizer,
                     progress=progress).apply(inplace=inplace)
    return converted if wrapped is None else wrapped.rebuild(converted)


def diff(original: nn.Module, converted: nn.Module, example_inputs=None) -> RewriteDiff:
    """Module- and graph-level comparison of ``original`` and ``converted`` (see RewriteDiff).

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> model = transformers.BertModel(config)
        >>> len(m2.diff(model, m2.convert(model)).changes)          # print(...) lists them
        3
    """
    return _diff(inner_model(original), inner_model(converted), example_inputs)
