"""Exporting converted models: torch.export programs and AOTInductor packages (:mod:`.program`), ONNX
(:func:`export_onnx`), and the recurrent decoding step with explicit states (:mod:`.decode`).

The package is callable: ``m2.export(model, example_inputs, path)`` is :func:`.program.export`, and
``m2convert.export.export_onnx`` and the others are its attributes.
"""

from __future__ import annotations

import sys
import types

from .decode import DecodeStep, decode_prefill, decode_step_program, export_decode_step, state_names
from .program import dynamic_inputs, export, export_onnx, export_program, write_program

__all__ = ["DecodeStep", "decode_prefill", "decode_step_program", "dynamic_inputs", "export", "export_decode_step",
           "export_onnx", "export_program", "state_names", "write_program"]


class _CallableModule(types.ModuleType):
    """This package, which ``m2.export(...)`` calls as :func:`.program.export`."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
