"""Models that hold a Hugging Face model inside (a sentence-transformers ``SentenceTransformer``).

``m2.convert``, ``m2.plan``, ``m2.diff`` and ``m2.distill`` work on the Hugging Face model inside such a
wrapper: :func:`unwrap` finds it, and :meth:`Wrapped.rebuild` makes the wrapper again around a converted
copy (the tokenizer, pooling and normalization modules copied as they are). A new kind of wrapper is one
:class:`Wrapper` entry in :data:`WRAPPERS`, registered with :func:`register_wrapper` below its functions.

Example:
    >>> bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=32,
    ...                                                       num_attention_heads=2, intermediate_size=64))
    >>> unwrap(bert) is None                          # a plain model: nothing to unwrap
    True
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Wrapper:
    """One kind of wrapper: ``matches(obj)`` says whether ``obj`` is one (without importing its library),
    ``tokenizer(obj)`` returns its tokenizer (or None)."""

    name: str
    matches: Callable[[object], bool]
    tokenizer: Callable[[nn.Module], object]


WRAPPERS: list[Wrapper] = []


def register_wrapper(name: str, matches: Callable[[object], bool], tokenizer: Callable[[nn.Module], object]) -> None:
    """Add a kind of wrapper to :data:`WRAPPERS` (the first entry that matches a model wins)."""
    WRAPPERS.append(Wrapper(name, matches, tokenizer))


@dataclass(frozen=True)
class Wrapped:
    """A wrapper model and the Hugging Face model inside it (``inner``, its one outermost PreTrainedModel)."""

    outer: nn.Module
    inner: nn.Module
    kind: Wrapper

    @property
    def tokenizer(self):
        return self.kind.tokenizer(self.outer)

    def rebuild(self, converted: nn.Module) -> nn.Module:
        """The wrapper around ``converted`` instead of ``inner``: ``outer`` itself when ``converted`` is
        ``inner`` (converted in place), else a deep copy of ``outer`` whose every reference to ``inner``
        points at ``converted`` (the deep-copy memo maps one to the other, so ``inner`` is never copied
        and no attribute is set: sentence-transformers 6's ``Transformer.auto_model`` is a read-only
        property over ``.model``, and assigning a module to it would only add a stray submodule)."""
        if converted is self.inner:
            return self.outer
        return copy.deepcopy(self.outer, memo={id(self.inner): converted})


def _inner_model(outer: nn.Module, kind: Wrapper) -> nn.Module:
    """The one outermost transformers PreTrainedModel inside ``outer``."""
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for path, module in outer.named_modules():
        if isinstance(module, PreTrainedModel) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, module))
    if len(found) != 1:
        where = ", ".join(f"{p} ({type(m).__name__})" for p, m in found) or "none"
        raise UnsupportedModelError(
            f"this {kind.name} holds {len(found)} Hugging Face models ({where}); m2convert converts a "
            "wrapper holding exactly one: convert the Hugging Face model you mean directly (m2.convert(module))")
    return found[0][1]


def unwrap(model) -> Wrapped | None:
    """The registered wrapper ``model`` is, with the Hugging Face model inside; None for anything else.

    Raises:
        UnsupportedModelError: a wrapper holding no Hugging Face model, or more than one.
    """
    kind = next((w for w in WRAPPERS if w.matches(model)), None)
    if kind is None:
        return None
    return Wrapped(model, _inner_model(model, kind), kind)


def inner_model(model):
    """``model``'s Hugging Face model if it is a registered wrapper, else ``model`` itself."""
    wrapped = unwrap(model)
    return model if wrapped is None else wrapped.inner


def _is_sentence_transformer(obj) -> bool:
    # An object of a class from a library that was never imported cannot be an instance of it.
    library = sys.modules.get("sentence_transformers")
    cls = getattr(library, "SentenceTransformer", None)
    return cls is not None and isinstance(obj, cls)


def _sentence_transformer_tokenizer(model: nn.Module):
    return getattr(model, "tokenizer", None)


register_wrapper("SentenceTransformer", _is_sentence_transformer, _sentence_transformer_tokenizer)
