"""The exceptions m2convert raises. Every one is an :class:`M2Error`.

Messages name the module path, file or value at fault and say what to do about it. Subclasses also
derive from the matching builtin (``ValueError``, ``RuntimeError``...) so generic handlers still work.
"""

from __future__ import annotations

from m2convert.kernels.errors import KernelError, M2Error

__all__ = ["M2Error", "ConfigError", "ShapeError", "UnsupportedModelError", "CaptureError", "ConversionError",
           "CheckpointError", "DataError", "TrainingError", "KernelError", "ModelLoadError", "check_int",
           "check_choice"]


class ConfigError(M2Error, ValueError):
    """A configuration value or argument is out of its valid range."""


class ShapeError(M2Error, ValueError):
    """A tensor or dimension has a shape the operation cannot work with."""


class UnsupportedModelError(M2Error, TypeError):
    """The object handed over is not a model m2convert can work with."""


class CaptureError(M2Error, RuntimeError):
    """torch.export could not capture the model."""


class ConversionError(M2Error, RuntimeError):
    """A site could not be converted (raised for skips under ``strict=True`` and failed applies)."""


class CheckpointError(M2Error, ValueError):
    """A checkpoint or saved directory is corrupt, foreign or does not match the model."""


class DataError(M2Error, ValueError):
    """A data file or batch is malformed."""


class TrainingError(M2Error, RuntimeError):
    """Recovery training cannot go on (non-finite loss, bad stage setup)."""


class ModelLoadError(M2Error, OSError):
    """A model id or directory could not be loaded."""


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """Validate an integer argument and return it; raise :class:`ConfigError` naming the range.

    Example:
        >>> check_int("nblocks", 4, low=1)
        4
        >>> check_int("nblocks", 0, low=1, high=64)
        Traceback (most recent call last):
        m2convert.errors.ConfigError: nblocks=0 is out of range; valid range is [1, 64]
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ConfigError(f"{name}={value} is out of range; valid range is [{lo}, {hi}]")
    return value


def check_choice(name: str, value, choices) -> str:
    """Validate that ``value`` is one of ``choices``; raise :class:`ConfigError` listing them.

    Example:
        >>> check_choice("mode", "causal", ("causal", "bidirectional"))
        'causal'
        >>> check_choice("mode", "both", ("causal", "bidirectional"))
        Traceback (most recent call last):
        m2convert.errors.ConfigError: mode='both' is not valid; choose one of ['bidirectional', 'causal']
    """
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {sorted(choices)}")
    return value
