"""Small helpers for Hugging Face models that several parts of m2convert use."""

from __future__ import annotations

from torch import nn


def attention_implementation(model: nn.Module) -> str | None:
    """The model's attention implementation ("sdpa", "eager", ...), or None without a HF config.

    Example:
        >>> config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        ...                                  num_attention_heads=2, intermediate_size=64)
        >>> attention_implementation(transformers.BertModel(config)), attention_implementation(nn.Linear(2, 2))
        ('sdpa', None)
    """
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def set_attention(model: nn.Module, impl: str) -> None:
    """Switch a Hugging Face model's attention implementation (e.g. to "eager", which returns probabilities).

    Example:
        >>> config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        ...                                  num_attention_heads=2, intermediate_size=64)
        >>> model = transformers.BertModel(config)
        >>> set_attention(model, "eager")
        >>> attention_implementation(model)
        'eager'
    """
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
