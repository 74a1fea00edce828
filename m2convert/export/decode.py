"""One decode step of a recurrent converted decoder as a torch.export program with explicit states.

A decoder made recurrent by ``m2.to_recurrent`` carries a fixed-size state per causal mixer
(:class:`~m2convert.layers.decode.RecurrentState`), so one generated token is a pure function

    (input_ids (B, 1), position (B,) or (), *states) -> (logits (B, 1, V), *new states)

with every shape static. :func:`export_decode_step` exports it (a ``.pt2`` program, or an AOTInductor
package with ``aoti=True``); :func:`decode_prefill` runs a prompt eagerly and returns the states after
it in the same flat layout, so that a runtime with torch alone (no m2convert, no transformers) decodes:

    logits, position, states = decode_prefill(model, prompt)           # eager, once
    step = torch.export.load("step.pt2").module()                      # or aoti_load_package
    loop: token = logits[:, -1].argmax(-1, keepdim=True)
          logits, *states = step(token, position, *states); position = position + 1

State layout, per recurrent mixer in the order of its cache slot (``layer_idx``), B sequences:

    z_tail     (B, 3H, kernel - 1)   the short conv's window, model dtype
    modes      (B, H, S, 2)          the gated filter's modal state as (real, imag) pairs
    res_modes  (B, H, S, 2)          the residual filter's, when the mixer has one

The modal states are complex inside the step; the interface carries them as real pairs (float32 for
float32 models), which safetensors, AOTInductor and any runtime take. :func:`state_names` names them.

Example:
    >>> config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    >>> converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), filter_order=16)
    >>> recurrent = m2.to_recurrent(converted, state_size=4, horizon=256).model
    >>> path = m2.export_decode_step(recurrent, "step.pt2")
    >>> logits, position, states = decode_prefill(recurrent, torch.tensor([[5, 6, 7]]))
    >>> token = logits[:, -1].argmax(-1, keepdim=True)                            # (B, 1)
    >>> logits, *states = torch.export.load(str(path)).module()(token, position, *states)
    >>> logits.shape, len(states)                                                 # 2 layers x 3 tensors
    (torch.Size([1, 1, 96]), 6)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import CaptureError, ConfigError
from ..layers.attention import M2Attention
from ..layers.cache import M2CacheLayer
from ..layers.decode import RecurrentState, is_recurrent
from ..passes.inputs import signed
from .program import write_program


@dataclass(frozen=True)
class _Slot:
    """One recurrent mixer: its adapter's path and cache slot, sizes, and whether it has a residual filter."""

    path: str
    layer_idx: int
    channels: int
    state_size: int
    kernel: int
    residual: bool

    def names(self) -> list[str]:
        base = f"layer{self.layer_idx}"
        return [f"{base}_z_tail", f"{base}_modes"] + ([f"{base}_res_modes"] if self.residual else [])


def _slots(model: nn.Module) -> list[_Slot]:
    """The recurrent mixers of ``model`` in cache-slot order; ConfigError when it cannot decode by state."""
    where = type(model).__name__
    plan = getattr(model, "m2convert_plan", None)
    if isinstance(plan, dict):
        kept = [s["fqn"] for s in plan.get("sites", [])
                if s.get("kind") == "sequence" and s.get("status") != "convert"]
        if kept:
            raise ConfigError(f"{where} keeps attention at {kept[:3]}, which decodes from a KV cache that grows "
                              "with the context; export_decode_step needs every attention site converted")
    slots, plain = [], []
    for path, module in model.named_modules():
        if not isinstance(module, M2Attention) or module.mixer.mode == "bidirectional":
            continue
        mixer = module.mixer
        if getattr(mixer.filter, "window", None) is not None and not is_recurrent(mixer):
            raise ConfigError(f"{where}: the local mixer at '{path}' decodes exactly from its last "
                              f"{mixer.filter.window} inputs (to_recurrent keeps it so), a state "
                              "export_decode_step does not lay out; export the model with m2.export instead")
        if mixer.window_attention is not None:
            raise ConfigError(f"{where}: the mixer at '{path}' attends over a window of its last "
                              f"{mixer.window_attention.window} tokens (softmax_window), a ring of keys and values "
                              "export_decode_step does not lay out; export the model with m2.export instead")
        if not is_recurrent(mixer) or module.layer_idx is None:
            plain.append(path)
            continue
        slots.append(_Slot(path, module.layer_idx, mixer.d_inner, mixer.filter.state_size, mixer.short_kernel,
                           mixer.residual_filter is not None))
    if plain or not slots:
        raise ConfigError(f"{where} has {'no causal M2 mixer' if not slots else f'mixers at {plain[:3]}'} in "
                          "recurrent form; convert a decoder with m2.convert, then make it recurrent with "
                          "m2.to_recurrent(model) before exporting its decode step")
    if len({s.layer_idx for s in slots}) != len(slots):
        raise ConfigError(f"{where}: two M2 mixers share a cache slot (layer_idx); cannot lay out their states")
    return sorted(slots, key=lambda s: s.layer_idx)


def state_names(model: nn.Module) -> list[str]:
    """Names of the flat state tensors of ``model`` (see the module notes), in order.

    Example:
        >>> config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4)
        >>> converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), filter_order=16)
        >>> state_names(m2.to_recurrent(converted, state_size=4, horizon=256).model)
        ['layer0_z_tail', 'layer0_modes', 'layer0_res_modes']
    """
    return [name for slot in _slots(model) for name in slot.names()]


class _StepLayer(M2CacheLayer):
    """A cache slot holding an explicit recurrent state; its sequence length is a constant, so that
    nothing in the exported graph depends on the tokens seen (the mixers ignore the mask while decoding)."""

    def get_seq_length(self) -> int:
        return 1


def _cache_of(slots: list[_Slot], states) -> DynamicCache:
    """A transformers cache whose M2 slots hold ``states`` (flat, real pairs) as RecurrentStates."""
    cache, it = DynamicCache(), iter(states)
    cache.layers = [M2CacheLayer() for _ in range(slots[-1].layer_idx + 1)]
    for slot in slots:
        z_tail, modes = next(it), torch.view_as_complex(next(it))
        res = torch.view_as_complex(next(it)) if slot.residual else None
        layer = cache.layers[slot.layer_idx] = _StepLayer()
        layer.state = RecurrentState(z_tail, modes, res, torch.zeros((), dtype=torch.int64, device=z_tail.device))
        layer.is_initialized = True
    return cache


def _flat_states(slots: list[_Slot], cache) -> list[torch.Tensor]:
    out = []
    for slot in slots:
        state = cache.layers[slot.layer_idx].state
        out += [state.z_tail, torch.view_as_real(state.modes)]
        out += [torch.view_as_real(state.res_modes)] if slot.residual else []
    return out


def _cache_keyword(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class DecodeStep(nn.Module):
    """``forward(input_ids (B, 1), position (B,) or (), *states) -> (logits (B, 1, V), *new states)``: one
    token through a recurrent converted decoder with its states explicit (see the module notes).

    The model runs as in ``generate()``, from a transformers cache built from the state tensors inside
    ``forward``, so the exported graph holds only tensor operations.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.slots = _slots(model)
        self.cache_keyword = _cache_keyword(model)

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *states: torch.Tensor):
        cache = _cache_of(self.slots, states)
        position_ids = position.reshape(-1, 1).expand(input_ids.shape[0], 1)       # (B, 1)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                         **{self.cache_keyword: cache})
        return (out.logits, *_flat_states(self.slots, cache))


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N) position ids as ``generate()`` makes them: real tokens count from 0, padding gets 1."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def decode_prefill(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Run a prompt through a recurrent converted decoder: (logits (B, N, V), next position (B,), states).

    ``states`` is the flat list :class:`DecodeStep` and :func:`export_decode_step`'s program take
    (see the module notes); ``position`` the position id of the next token. Left padding (mask 0)
    contributes nothing to the states, as in ``generate()``.

    Example:
        >>> config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4)
        >>> converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), filter_order=16)
        >>> recurrent = m2.to_recurrent(converted, state_size=4, horizon=256).model
        >>> logits, position, states = decode_prefill(recurrent, torch.tensor([[5, 6, 7]]))
        >>> logits.shape, position, [tuple(s.shape) for s in states]
        (torch.Size([1, 3, 96]), tensor([3]), [(1, 96, 2), (1, 32, 4, 2), (1, 32, 4, 2)])
    """
    slots = _slots(model)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                    position_ids=_positions(input_ids, attention_mask), **{_cache_keyword(model): cache})
    position = _positions(input_ids, attention_mask)[:, -1] + 1                  # (B,)
    return out.logits, position, [t.contiguous() for t in _flat_states(slots, cache)]


def decode_step_program(model: nn.Module, batch: int = 1) -> torch.export.ExportedProgram:
    """torch.export :class:`DecodeStep` of ``model`` for ``batch`` sequences, every shape static.

    Example:
        >>> config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4)
        >>> converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), filter_order=16)
        >>> program = decode_step_program(m2.to_recurrent(converted, state_size=4, horizon=256).model)
        >>> [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
        ['input_ids', 'position', 'layer0_z_tail', 'layer0_modes', 'layer0_res_modes']
    """
    step = DecodeStep(model)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=_device(model))
    _, _, states = decode_prefill(model, ids.expand(batch, 2).contiguous())
    names = ["self", "input_ids", "position", *(n for s in step.slots for n in s.names())]
    P = inspect.Parameter
    named = signed(_Unpack, [P(n, P.POSITIONAL_OR_KEYWORD) for n in names], "DecodeStepProgram")(step)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(named, (ids, torch.full((batch,), 2, device=ids.device), *states), strict=False)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export of the decode step of {type(model).__name__} failed: "
                           f"{type(exc).__name__}: {detail}") from exc
    finally:
        model.train(was_training)


class _Unpack(nn.Module):
    """Calls a :class:`DecodeStep` with positional tensors (its signature names them; see ``signed``)."""

    def __init__(self, step: DecodeStep):
        super().__init__()
        self.step = step

    def forward(self, *args):
        return self.step(*args)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def export_decode_step(model: nn.Module, path, batch: int = 1, aoti: bool = False) -> Path:
    """Export one decode step of a recurrent converted decoder to ``path``: a ``.pt2`` torch.export program,
    or with ``aoti=True`` an AOTInductor package (compiled C++; needs torch only to run).

    The artifact takes ``(input_ids (B, 1) int64, position (B,) int64, *states)`` and returns
    ``(logits (B, 1, V), *new states)``, B = ``batch``, states as laid out in the module notes (start
    from :func:`decode_prefill`). No transformers cache object and no dynamic shape is in the graph.

    Raises:
        ConfigError: the model has no recurrent mixers (``m2.to_recurrent`` it first), keeps an attention
            site unconverted, or ``path`` does not end in .pt2 with ``aoti``.
        CaptureError: torch.export failed (the message says why).

    Example:
        >>> config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4)
        >>> converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), filter_order=16)
        >>> m2.export_decode_step(m2.to_recurrent(converted, state_size=4, horizon=256).model, "step.pt2")
        PosixPath('step.pt2')
    """
    if aoti and Path(path).suffix != ".pt2":
        raise ConfigError(f"an AOTInductor package path must end in .pt2, got '{path}'")
    return write_program(decode_step_program(model, batch), path, aoti)
