"""Building a converted model's structure without its weights, from its class, config and plan.

Loading a save (:func:`m2convert.serialize.from_pretrained`) builds the original class with every
parameter on the ``meta`` device (:func:`parameters_on_meta`), applies the plan's structure there (no
projection, no teacher) and then assigns the saved tensors; non-persistent buffers (rotary frequencies,
filter features) are computed by the constructors exactly as in the original.

Example:
    >>> with parameters_on_meta():
    ...     layer = nn.Linear(4, 4)
    >>> layer.weight.is_meta, layer.weight.shape
    (True, torch.Size([4, 4]))
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, M2Error
from .layers.recurrent import recurrent_fits, restore_recurrent_layout  # noqa: F401  (recurrent_fits: doctest)


@contextlib.contextmanager
def parameters_on_meta():
    """Inside, new parameters live on the ``meta`` device while buffers are computed for real.

    Parameters are moved to ``meta`` as they are registered, and ``Module.to``/``_apply`` never moves a
    tensor to or from ``meta`` (constructors that call ``.to(device)`` keep real buffers). This builds a
    model's structure without allocating or initialising weights, yet with the exact non-persistent
    buffers its constructor computes.

    Example:
        >>> with parameters_on_meta():
        ...     layer = nn.Linear(4, 4)
        >>> layer.weight.is_meta
        True
    """
    register, apply_ = nn.Module.register_parameter, nn.Module._apply

    def register_parameter(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    def _apply(self, fn, recurse=True):
        def keep_device(t):
            if t.is_meta:
                return t
            out = fn(t)
            return t if out.is_meta else out
        return apply_(self, keep_device, recurse)

    nn.Module.register_parameter, nn.Module._apply = register_parameter, _apply
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module._apply = register, apply_


def build_structure(model_class: str | None, hf_config: dict, plan_dict: dict, where: Path,
                    recurrent: dict | None = None) -> nn.Module:
    """The converted model's structure: class ``model_class`` (default: the config's first architecture)
    built from ``hf_config`` with its parameters on ``meta``, the plan applied without seeding, and the
    mixers named in ``recurrent`` (:func:`~m2convert.layers.recurrent.recurrent_fits` of a recurrent
    model; none in saves of other models or made before it was recorded) given their modal filters.

    Raises:
        CheckpointError: naming ``where``: the class is not a transformers model class, or the config,
            plan or recurrent layout does not rebuild it.

    Example:
        >>> config = transformers.GPT2Config(vocab_size=96, n_layer=1, n_embd=32, n_head=2)
        >>> converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), filter_order=16)
        >>> recurrent = m2.to_recurrent(converted, state_size=4, horizon=256).model
        >>> layout = recurrent_fits(recurrent)
        >>> model = build_structure("GPT2LMHeadModel", config.to_dict(), recurrent.m2convert_plan, Path("."), layout)
        >>> model.transformer.h[0].attn.mixer.filter
        RecurrentFilter(channels=32, state_size=4, horizon=256)
    """
    import transformers

    from .passes.plan import RewritePlan

    hf_config = dict(hf_config)
    class_name = model_class or (hf_config.get("architectures") or [None])[0]
    cls = getattr(transformers, class_name, None) if class_name else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise CheckpointError(f"{where}: model class {class_name!r} is not a transformers model class "
                              f"(transformers {transformers.__version__}); upgrade transformers or re-save")
    try:
        config = cls.config_class.from_dict(hf_config)
        plan = RewritePlan.from_dict(plan_dict)
    except Exception as exc:
        raise CheckpointError(f"{where}: cannot rebuild the config/plan of {class_name}: "
                              f"{type(exc).__name__}: {exc}") from exc
    with parameters_on_meta(), torch.no_grad():
        model = cls(config)
        try:
            model = plan.apply(inplace=True, model=model, seed=False)
        except M2Error as exc:
            raise CheckpointError(f"{where}: the saved plan does not fit {class_name} built from the saved "
                                  f"config: {exc}") from exc
        return _restore_recurrent(model, recurrent, where)


def _restore_recurrent(model: nn.Module, recurrent, where: Path) -> nn.Module:
    """``model`` with the modal filters the saved ``recurrent`` layout names (None or {}: unchanged)."""
    if not recurrent:
        return model
    try:
        if not isinstance(recurrent, dict) or not all(isinstance(v, dict) for v in recurrent.values()):
            raise ValueError(f"expected {{mixer name: {{state_size, horizon, ...}}}}, got {str(recurrent)[:80]}")
        return restore_recurrent_layout(model, recurrent)
    except (M2Error, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: the saved recurrent layout does not fit the converted "
                              f"{type(model).__name__}: {type(exc).__name__}: {exc}") from exc
