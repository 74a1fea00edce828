"""What code around a replaced module may still ask of it, answered by its replacement.

Models call methods on their attention modules and read their attributes outside ``forward`` (BigBird's
``set_attention_type`` switches every layer between block-sparse and full attention before a short input).
:func:`inherit_interface` gives a replacement the replaced module's plain attributes (numbers, strings,
flags) it lacks, and its other public methods as :class:`InheritedMethod` no-ops that warn once: the mixer
has no block-sparse or full mode to switch, and the call would otherwise fail with an AttributeError.
"""

from __future__ import annotations

import inspect
import warnings

from torch import nn

PLAIN = (str, int, float, bool, type(None))


class InheritedMethod:
    """A public method of the replaced module, kept as a call that does nothing to the replacement (it warns
    once per method): ``owner.name(*args, **kwargs) -> None``."""

    def __init__(self, owner: str, name: str, replacement: str):
        self.owner, self.name, self.replacement = owner, name, replacement

    def __call__(self, *args, **kwargs) -> None:
        warnings.warn(f"{self.owner}.{self.name}() was called on a module m2convert replaced with {self.replacement}; "
                      "it has no counterpart there and does nothing", stacklevel=2)

    def __repr__(self) -> str:
        return f"InheritedMethod({self.owner}.{self.name})"


def inherit_interface(replacement: nn.Module, original: nn.Module) -> list[str]:
    """Give ``replacement`` the plain attributes and public methods of ``original`` that it lacks (see the
    module notes); returns the names added.

    Example:
        >>> class Old(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attention_type = "block_sparse"
        ...     def set_attention_type(self, value):
        ...         self.attention_type = value
        >>> new = nn.Identity()
        >>> inherit_interface(new, Old())
        ['attention_type', 'set_attention_type']
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     new.set_attention_type("original_full")
        >>> new.attention_type, "does nothing" in str(caught[0].message)
        ('block_sparse', True)
    """
    added = []
    for name, value in vars(original).items():
        if not name.startswith("_") and isinstance(value, PLAIN) and not hasattr(replacement, name):
            setattr(replacement, name, value)
            added.append(name)
    base = set(dir(nn.Module))
    for name, member in inspect.getmembers(type(original), inspect.isfunction):
        if name.startswith("_") or name in base or hasattr(replacement, name):
            continue
        setattr(replacement, name, InheritedMethod(type(original).__name__, name, type(replacement).__name__))
        added.append(name)
    return added
