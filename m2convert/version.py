"""The m2convert version, written into saved models and printed by the CLI."""

__version__ = "0.1.0"
