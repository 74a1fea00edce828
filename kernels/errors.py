"""The base of m2convert's exceptions, kept in the lowest layer so the kernels can raise without
importing the rest of the package. :mod:`m2convert.errors` re-exports both classes with the others."""

from __future__ import annotations


class M2Error(Exception):
    """Base class of every error m2convert raises."""


class KernelError(M2Error, RuntimeError):
    """A fused kernel cannot run on the given inputs or device."""
