"""The read-only dense view a :class:`~m2convert.layers.monarch.MonarchLinear` gives as its ``weight``."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from ..errors import ConversionError


class DenseView(torch.Tensor):
    """The dense (out, in) matrix of a :class:`MonarchLinear`, read-only: what ``layer.weight`` returns.

    Shape, dtype and device come without computing anything; an op that reads the values gets the
    matrix built from the layer's current factors (``MonarchLinear.to_dense``, out * in * rho
    multiply-adds) and returns a plain tensor. The matrix is never stored, so a write could not reach the
    layer: writes (in-place ops, ``out=`` it, ``.data = ...``) raise ConversionError instead of being lost.
    """

    # transformers' weight init skips tensors flagged initialized; the layer initializes its own factors
    # (MonarchLinear.reset_parameters), so there is nothing here to initialize.
    _is_hf_initialized = True

    @staticmethod
    def __new__(cls, layer: "MonarchLinear"):
        # Metadata only (no storage): the values are made when an op needs them.
        view = torch.Tensor._make_wrapper_subclass(cls, (layer.out_features, layer.in_features),
                                                   dtype=layer.w1.dtype, device=layer.w1.device)
        view._layer = layer
        return view

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # ``.data`` is a Python-level accessor, seen here and not by __torch_dispatch__.
        if _is_data(func, "__set__"):
            _refuse(".data = ...", args[0])
        if _is_data(func, "__get__"):
            return args[0]                              # ``weight.data`` is the same read-only view
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):               # arguments the op writes into
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = kwargs.get(arg.name, args[i] if i < len(args) else None)
                if isinstance(value, DenseView):
                    _refuse(func.overloadpacket.__name__, value)      # "add_", not "add_.Tensor"
        with torch.no_grad():
            args, kwargs = tree_map(_values, (args, kwargs))
        return func(*args, **kwargs)


def _values(t):
    """A DenseView's (out, in) matrix from its layer's current factors; anything else as it is."""
    return t._layer.to_dense() if isinstance(t, DenseView) else t


def _is_data(func, accessor: str) -> bool:
    """``func`` is the getter (``"__get__"``) or setter (``"__set__"``) of ``Tensor.data``."""
    return getattr(func, "__name__", "") == accessor and getattr(func, "__self__", None) is torch.Tensor.data


def _refuse(what: str, view: DenseView):
    raise ConversionError(
        f"MonarchLinear.weight is a read-only dense view {tuple(view.shape)} of the Monarch factors w1, w2; "
        f"{what} cannot change the layer. A dense or low-rank update (a LoRA merge_and_unload, a weight init) "
        "is not Monarch-structured in general, so it has no exact MonarchLinear form: keep the adapter unmerged "
        "(the PeftModel runs and saves as is), or project the updated matrix with "
        "MonarchLinear.from_weight(weight, bias, nblocks) (approximate)")
