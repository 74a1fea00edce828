"""Small helpers for Hugging Face models that several parts of m2convert use."""

from __future__ import annotations

from torch import nn


def attention_implementation(model: nn.Module) -> str | None:
    """The model's attention implementation ("sdpa", "eager", ...), or None without a HF config."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def set_attention(model: nn.Module, impl: str) -> None:
    """Switch a Hugging Face model's attention implementation (e.g. to "eager", which returns probabilities)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
