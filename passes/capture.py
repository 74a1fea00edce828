"""Capture: torch.export (non-strict) of a model on example inputs, keeping the module path of every node.

Every call_function node of the captured graph carries ``meta["nn_module_stack"]``, which maps it back
to the module path that ran it; the analysis passes read sites from that. Forward hooks record, per
module path, how often it ran and what it returned, which the attention adapters reproduce. Each hook
carries its paths in a closure rather than looking modules up by ``id()``: torch.export may run the
forward on a copy of the model (it does when one module object sits at two paths), and a copy has new ids.

Module objects reachable by more than one path (``model.b = model.a``) are listed in
``Captured.shared``: the plan skips every site that involves one, since replacing it at one path
would either change the other use or silently split the two.

Example:
    >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
    ...                                  intermediate_size=64)
    >>> captured = capture(transformers.BertModel(config))   # example inputs built from model.config
    >>> captured.kwargs["input_ids"].shape                    # (B, N); captured.graph: the aten FX graph
    torch.Size([2, 16])
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from m2convert.errors import CaptureError, UnsupportedModelError
from m2convert.passes.inputs import EXAMPLE_SEQ_LEN, disable_cache, example_inputs_for, split_inputs

# Sliding windows narrower than this are captured on window + SHOW_WINDOW tokens, so that the attention
# mask in the graph itself shows each query's window; wider ones are read from the config.
CHEAP_WINDOW = 256
SHOW_WINDOW = 8


@dataclass
class Captured:
    """A captured model: the exported program plus what hooks saw while it was traced."""

    model: nn.Module
    exported: torch.export.ExportedProgram
    args: tuple
    kwargs: dict
    modules: dict[str, nn.Module]                               # every path, aliases included
    calls: dict[str, int] = field(default_factory=dict)         # fqn -> times the module ran
    outputs: dict[str, dict] = field(default_factory=dict)      # fqn -> structure of what it returned
    shared: dict[str, tuple[str, ...]] = field(default_factory=dict)   # fqn -> every path of its object
    _inputs: dict[str, dict] = field(default_factory=dict, repr=False)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.exported.graph

    def module_inputs(self, fqn: str) -> dict:
        """{forward parameter name: value} the module at ``fqn`` receives on the example inputs.

        The graph holds values but not which forward parameter each one was passed as; one eager run
        of the model (eval mode, no gradients) with a hook on that module tells. Cached per path; {}
        when the module did not run.

        Example:
            >>> captured = capture(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))
            >>> captured.module_inputs("h.0.attn")["hidden_states"].shape        # (B, N, H)
            torch.Size([2, 16, 32])
        """
        if fqn not in self._inputs:
            self._inputs[fqn] = _record_inputs(self.model, self.modules[fqn], self.args, self.kwargs)
        return self._inputs[fqn]


def _record_inputs(model: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The first call's inputs of ``module`` while ``model(*args, **kwargs)`` runs, bound by name."""
    seen: dict = {}

    def hook(_module, call_args, call_kwargs):
        if not seen:
            signature = inspect.signature(module.forward)
            try:
                bound = signature.bind(*call_args, **call_kwargs)
            except TypeError:
                return
            for name, value in bound.arguments.items():
                extra = signature.parameters[name].kind == inspect.Parameter.VAR_KEYWORD
                seen.update(value if extra else {name: value})

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    return seen


def check_model(model, what: str = "m2.plan") -> nn.Module:
    """Raise UnsupportedModelError unless ``model`` is an nn.Module."""
    if not isinstance(model, nn.Module):
        shown = repr(model) if isinstance(model, str) else type(model).__name__
        raise UnsupportedModelError(
            f"{what} expects a torch.nn.Module (e.g. a transformers PreTrainedModel), got {shown}; "
            "load the model first (transformers.AutoModel.from_pretrained(...)), or run "
            "`m2convert plan MODEL` to load a directory or Hugging Face id")
    return model


def module_paths(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """Each module object of ``model`` once, with every path that reaches it (first path first).

    Example:
        >>> model = nn.ModuleDict({"a": nn.Linear(2, 2)})
        >>> model.b = model.a
        >>> [paths for _, paths in module_paths(model) if len(paths) > 1]
        [('a', 'b')]
    """
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        found.setdefault(id(module), (module, []))[1].append(name)
    return [(module, tuple(paths)) for module, paths in found.values()]


def shared_modules(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """{path: all paths of the module object at path} for every object reachable by two or more paths.

    Submodules of a shared module are reachable by several paths too, so they are listed as well.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> model[1] = model[0]
        >>> shared_modules(model)["1"]
        ('0', '1')
    """
    return {path: paths for _, paths in module_paths(model) if len(paths) > 1 for path in paths}


def check_device(model: nn.Module, what: str = "m2convert") -> nn.Module:
    """Raise UnsupportedModelError if any parameter or buffer of ``model`` is on the ``meta`` device.

    Tracing runs the model and reads attention masks by evaluating them, which needs real values.
    """
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    meta = [name for name, t in tensors if t is not None and t.is_meta]
    if meta:
        raise UnsupportedModelError(
            f"{what} cannot trace {type(model).__name__}: {len(meta)} of its parameters/buffers are on the "
            f"'meta' device (e.g. '{meta[0]}'), which holds shapes but no values; materialise the model first "
            "(model.to_empty(device='cpu') and then load_state_dict(...)), or pass a model loaded on CPU "
            "(e.g. from_pretrained without device_map='meta')")
    return model


def describe_output(value) -> dict:
    """The structure of a module's return value: {'type': 'tensor'} or {'type': 'tuple', 'len': n}."""
    if isinstance(value, torch.Tensor):
        return {"type": "tensor"}
    if isinstance(value, tuple) and type(value) is tuple:
        return {"type": "tuple", "len": len(value)}
    return {"type": type(value).__name__}


def capture_length(model: nn.Module) -> int:
    """Tokens of the example inputs built for ``model``: EXAMPLE_SEQ_LEN, or more when a sliding window
    (``sliding_window`` of the config or of a module) is narrower than CHEAP_WINDOW tokens.

    Example:
        >>> config = transformers.MistralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                     num_key_value_heads=1, intermediate_size=64, sliding_window=16)
        >>> capture_length(transformers.MistralModel(config))                  # window + SHOW_WINDOW
        24
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    windows = [getattr(m, "sliding_window", None) for m in (text, *model.modules())]
    small = [w for w in windows if isinstance(w, int) and not isinstance(w, bool) and 0 < w < CHEAP_WINDOW]
    return max(EXAMPLE_SEQ_LEN, min(small) + SHOW_WINDOW) if small else EXAMPLE_SEQ_LEN


def capture(model: nn.Module, example_inputs=None) -> Captured:
    """Export ``model`` with torch.export (non-strict) and return the graph and hook records.

    Args:
        model: any nn.Module; Hugging Face models need no example inputs.
        example_inputs: dict of keyword tensors or tuple of positional tensors; built from
            ``model.config`` when None (see :func:`example_inputs_for`), :func:`capture_length` tokens
            long. ``use_cache=False`` is added for models whose forward takes it.

    Raises:
        CaptureError: naming the module that was running when export failed and how to fall back.

    Example:
        >>> captured = capture(transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2)))
        >>> captured.calls["h.0.attn"]
        1
    """
    check_model(model)
    check_device(model)
    built = example_inputs is None
    if built:
        example_inputs = example_inputs_for(model, seq_len=capture_length(model))
    args, kwargs = split_inputs(example_inputs)
    disable_cache(model, kwargs)                          # a KV cache in the outputs cannot be exported
    # Each module's own flag, not just the top-level one: model.train(mode) afterwards would reset
    # submodules the user had put in another mode (e.g. a frozen encoder layer in eval mode).
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    config, use_cache = getattr(model, "config", None), getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache:                 # a forward without use_cache (GraniteMoE's LM) reads the config's
        config.use_cache = False
    try:
        try:
            hooks = _Hooks(model)
            exported = _export_quietly(model, args, kwargs)
        except Exception as exc:
            hooks.remove()
            retry = _without_grad_inputs(model, kwargs, built)
            if retry is None:
                raise CaptureError(_explain_failure(model, hooks.running, exc)) from exc
            hooks, kwargs = _Hooks(model), retry
            try:
                with _frozen(model):
                    exported = _export_quietly(model, args, kwargs)
            except Exception:
                raise CaptureError(_explain_failure(model, hooks.running, exc)) from exc
    finally:
        hooks.remove()
        for module, mode in modes:
            module.training = mode
        if use_cache:
            config.use_cache = use_cache
    modules = dict(model.named_modules(remove_duplicate=False))
    return Captured(model, exported, args, kwargs, modules, hooks.calls, hooks.outputs, shared_modules(model))


def _without_grad_inputs(model: nn.Module, kwargs: dict, built: bool) -> dict | None:
    """The keyword inputs of a second export attempt, or None when there is none to make.

    Some attention kernels (flex-attention on the CPU) trace only with parameters that need no
    gradient, and transformers reads an all-ones ``attention_mask`` with a data-dependent check that
    export cannot trace; the retry freezes the parameters and leaves out an all-ones mask it built
    (a mask of ones means no padding, as no mask does).
    """
    if not any(p.requires_grad for p in model.parameters()) and not built:
        return None
    mask = kwargs.get("attention_mask")
    drop = built and isinstance(mask, torch.Tensor) and bool((mask == 1).all())
    return {k: v for k, v in kwargs.items() if not (drop and k == "attention_mask")}


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Parameters with requires_grad False for the duration (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Hooks:
    """Forward hooks on every module object of a model, recording per path how often it ran
    (``calls``), what it returned (``outputs``) and which modules are running now (``running``)."""

    def __init__(self, model: nn.Module):
        self.calls: dict[str, int] = {}
        self.outputs: dict[str, dict] = {}
        self.running: list[str] = []
        self.handles = []
        for module, paths in module_paths(model):
            pre_hook, post_hook = self._hooks_for(paths)
            self.handles.append(module.register_forward_pre_hook(pre_hook))
            self.handles.append(module.register_forward_hook(post_hook))

    def _hooks_for(self, paths: tuple[str, ...]):
        # One pre/post pair per module object, knowing all its paths: the hooks also run on the copy
        # torch.export may make of the model, so they must not identify the module by id().
        def pre_hook(_module, _args):
            self.running.append(paths[0])

        def post_hook(_module, _args, out):
            for fqn in paths:
                self.calls[fqn] = self.calls.get(fqn, 0) + 1
                self.outputs.setdefault(fqn, describe_output(out))
            if self.running and self.running[-1] == paths[0]:
                self.running.pop()

        return pre_hook, post_hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _export_quietly(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """torch.export (non-strict), passing on what torch printed only when export succeeds: torch prints
    the partial graph of a failed export to stderr and warns about unbacked symbols, while the
    CaptureError already says what failed."""
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level, printed = shapes_log.level, io.StringIO()
    shapes_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(printed):
            exported = torch.export.export(model, args, kwargs, strict=False)
    finally:
        shapes_log.setLevel(level)
    sys.stderr.write(printed.getvalue())
    return exported


def _explain_failure(model: nn.Module, running: list[str], exc: Exception) -> str:
    inner = next((p for p in reversed(running) if p not in ("", "?")), None)
    where = "at the top level of the model"
    if inner is not None:
        where = f"in module '{inner}' ({type(model.get_submodule(inner)).__name__})"
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return (f"torch.export could not capture {type(model).__name__} {where}: {type(exc).__name__}: {detail}. "
            "Fall back: pass example_inputs matching the model's forward; or plan a submodule that "
            "exports (m2.plan(model.<submodule>, example_inputs=...)) with filter_fn/overrides to choose "
            "the sites; or build layers directly with MonarchLinear.from_dense / M2SequenceMixer")
