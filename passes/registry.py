"""One ordered registry of named matchers, shared by the attention and the MLP patterns.

A :class:`PatternRegistry` is a sequence of :class:`Pattern` (``name``, ``match``) in registration order; the
pass that runs it tries each in turn. Registering a name twice is an error, so a plug-in cannot shadow a
built-in silently.

Example:
    >>> reg = PatternRegistry("toy pattern")
    >>> @reg.register("first")
    ... def first(x):
    ...     return x
    >>> with reg.registered("second", lambda x: -x):
    ...     [p.name for p in reg]
    ['first', 'second']
    >>> [p.name for p in reg]
    ['first']
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Pattern:
    """A registered matcher: its ``name`` (shown in plans) and the callable ``match``."""

    name: str
    match: Callable


class PatternRegistry:
    """Named matchers in the order they were registered; ``kind`` names them in errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._patterns: list[Pattern] = []

    def __iter__(self) -> Iterator[Pattern]:
        return iter(list(self._patterns))

    def __len__(self) -> int:
        return len(self._patterns)

    def __getitem__(self, i):
        return self._patterns[i]

    def names(self) -> list[str]:
        return [p.name for p in self._patterns]

    def register(self, name: str):
        """Decorator adding ``match`` as ``name`` at the end of the order."""
        def add(match):
            if name in self.names():
                raise ValueError(f"{self.kind} {name!r} is already registered; unregister it first")
            self._patterns.append(Pattern(name, match))
            return match
        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a no-op when it is not there)."""
        self._patterns[:] = [p for p in self._patterns if p.name != name]

    @contextlib.contextmanager
    def registered(self, name: str, match):
        """``match`` registered as ``name`` for the duration of a ``with`` block."""
        self.register(name)(match)
        try:
            yield
        finally:
            self.unregister(name)
