"""Export converted models: torch.export programs (.pt2) and AOTInductor packages.

The exported program takes the example inputs' names (keyword tensors) or positions, with the sequence
dimension (dim 1 of token inputs) dynamic, and image/audio sizes dynamic where the model accepts other
sizes (else static: a ViT's patch grid, Whisper's frame count; see :func:`export`). It returns a flat
tuple of tensors: the model output's fields in order, ``None`` fields dropped (e.g. ``(last_hidden_state, pooler_output)`` for BertModel, ``(logits,)`` for a
causal LM, which is exported without a KV cache). A flat tuple needs no transformers at load time.

Loading:
    .pt2 program   ``torch.export.load(path).module()(**inputs)``; a program holding ``m2::`` ops (a
                   lowered model) needs ``import m2convert.kernels.ops`` first, which registers them.
    AOTInductor    ``torch._inductor.aoti_load_package(path)(**inputs)``: compiled C++, needs torch only,
                   also for lowered models (the ops' implementations are compiled in). It expects
                   contiguous inputs.

``torch.compile(model, fullgraph=True)`` also works on converted models: the M2 layers have no graph
breaks.

Example:
    >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
    ...                                  intermediate_size=64)
    >>> converted = m2.convert(transformers.BertModel(config))
    >>> ids = torch.randint(0, 1000, (1, 128))                                  # (B, N)
    >>> m2.export(converted, {"input_ids": ids}, "model.pt2")
    PosixPath('model.pt2')
    >>> # AOTInductor compiles C++ for a few minutes, so this line is not run with the examples:
    >>> m2.export(converted, {"input_ids": ids}, "model-aoti.pt2", aoti=True)   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..errors import CaptureError, ConfigError
from ..passes.inputs import VARYING_DIMS, disable_cache, first_tensor, signed, split_inputs, unmarked
from ..passes.inputs import dynamic_shapes as shape_spec        # export()'s parameter takes the plain name

aten = torch.ops.aten


def _flatten_output(out) -> tuple:
    if isinstance(out, torch.Tensor):
        return (out,)
    if hasattr(out, "to_tuple"):                                              # transformers ModelOutput
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        flat = []
        for item in out:
            if isinstance(item, torch.Tensor):
                flat.append(item)
            elif item is not None:
                flat.extend(_flatten_output(item))
        return tuple(flat)
    raise CaptureError(f"cannot export an output of type {type(out).__name__}; the model must return tensors, "
                       "tuples/dicts of tensors or a transformers ModelOutput")


class _Exported(nn.Module):
    """Calls ``model`` with the tensor inputs plus fixed non-tensor arguments; returns a flat tensor tuple.

    Tensor inputs arrive by the names of ``self.names``; ``self.keyword`` says whether the model takes
    them by keyword (dict example inputs) or by position (tuple example inputs).
    """

    def __init__(self, model: nn.Module, names: list[str], keyword: bool, constants: dict):
        super().__init__()
        self.model, self.names, self.keyword, self.constants = model, names, keyword, constants

    def forward(self, *args, **kwargs):
        kwargs.update(zip(self.names, args))
        if self.keyword:
            return _flatten_output(self.model(**kwargs, **self.constants))
        return _flatten_output(self.model(*(kwargs[n] for n in self.names), **self.constants))


def _exportable(model: nn.Module, example_inputs) -> tuple[nn.Module, tuple, dict]:
    """The module to export and its (args, kwargs); its forward's signature names every tensor input."""
    args, kwargs = split_inputs(example_inputs, ConfigError)
    keyword = isinstance(example_inputs, dict)
    if keyword:
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    elif all(isinstance(t, torch.Tensor) for t in args):
        tensors, constants = {f"input_{i}": t for i, t in enumerate(args)}, {}
    else:
        raise ConfigError(f"positional example_inputs must all be tensors, got "
                          f"{', '.join(type(t).__name__ for t in args)}; pass non-tensor values by keyword")
    disable_cache(model, constants)                                         # no KV cache in the graph
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in ["self", *tensors]]
    wrapper = signed(_Exported, params, "ExportedModel")(model, list(tensors), keyword, constants)
    return (wrapper, (), tensors) if keyword else (wrapper, tuple(tensors.values()), {})


def _dynamic_seq(args: tuple, kwargs: dict, batch: bool = False):
    """Dim 1 of every (B, N, ...) token input whose dim 1 equals the first token input's N is dynamic; the
    varying dims of image and audio inputs (see ``VARYING_DIMS``) are dynamic where the model allows.

    ``Dim.DYNAMIC`` lets export infer the range (e.g. N <= the table of learned positions) and the
    inputs' equal lengths, and fails if the model fixes N. ``Dim.AUTO`` (images, audio) stays static
    where the model fixes the size, e.g. a ViT's patch grid or Whisper's frame count.
    """
    shapes = shape_spec(args, kwargs, torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC if batch else None)
    if shapes is None:
        first = first_tensor(args, kwargs)
        shown = "no tensor" if first is None else f"shape {tuple(first.shape)}"
        raise ConfigError(f"dynamic_seq=True needs a first input of shape (B, N, ...) with N >= 2, got {shown}; "
                          "use N >= 2, or pass dynamic_seq=False to export static shapes")
    return shapes


def _without_varying(shapes):
    """``shapes`` with the image/audio inputs static: the fallback when their Dim.AUTO dims fail to export."""
    if not isinstance(shapes, dict) or not any(k in VARYING_DIMS and v for k, v in shapes.items()):
        return None
    return {k: None if k in VARYING_DIMS else v for k, v in shapes.items()}


def dynamic_inputs(program: torch.export.ExportedProgram) -> dict[str, dict[int, tuple[int, int | None]]]:
    """The dims each tensor input of ``program`` takes at any size: {input: {dim: (min, max or None)}}.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64, max_position_embeddings=64)
        >>> converted = m2.convert(transformers.BertModel(config))
        >>> dynamic_inputs(export_program(converted, {"input_ids": torch.randint(0, 100, (1, 16))}))  # (B, N)
        {'input_ids': {1: (2, 64)}}
    """
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    found: dict[str, dict[int, tuple[int, int | None]]] = {}
    for spec in program.graph_signature.input_specs:
        user = spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
        val = placeholders[spec.arg.name].meta.get("val") if user else None
        if not isinstance(val, torch.Tensor):
            continue
        dims = {}
        for d, size in enumerate(val.shape):            # a specialized size is a SymInt of a constant
            vr = program.range_constraints.get(size.node.expr) if isinstance(size, torch.SymInt) else None
            if vr is not None:
                dims[d] = (int(vr.lower), int(vr.upper) if vr.upper.is_Integer else None)   # else int_oo
        found[spec.arg.name] = dims
    return found


class _ComplexSubAsAdd(CustomGraphPass):
    """Inductor post-grad pass: complex ``a - b`` becomes ``a + (-b)``, exact in IEEE arithmetic.

    AOTInductor has no C shim for complex aten.sub (FFT long convolutions with reverse filters use it)
    and its fallback through the proxy executor fails on CPU (torch 2.13). It runs on the post-grad
    graph, where the fused ``m2::`` ops are already decomposed into aten ops.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            val = node.meta.get("val")
            if node.target is not aten.sub.Tensor or not isinstance(val, torch.Tensor) or not val.is_complex() \
                    or len(node.args) != 2 or node.kwargs:
                continue
            other = node.args[1]
            with graph.inserting_before(node):
                neg = graph.call_function(aten.neg.default, (other,))
            if isinstance(other, torch.fx.Node) and "val" in other.meta:
                neg.meta["val"] = other.meta["val"].neg()
            node.target, node.args = aten.add.Tensor, (node.args[0], neg)

    def uuid(self):
        return get_hash_for_files((__file__,))


def _export_advice(model: nn.Module, shapes) -> str:
    """What to do after a failed export: a dynamic length cannot pass a causal-monarch mixer, whose Monarch
    DFT is built for one length; otherwise check the inputs, or fix the shapes."""
    from ..layers.sequence import M2SequenceMixer

    monarch = any(isinstance(m, M2SequenceMixer) and m.mode == "causal-monarch" for m in model.modules())
    if monarch and shapes is not None:
        return ("Its causal-monarch mixers build their Monarch DFT for one sequence length, so the length cannot "
                "stay dynamic: export one program per length with dynamic_seq=False, or convert with "
                "causal_mode='causal' (FFT convolutions) for a program that takes any length")
    return ("Check that example_inputs match its forward; pass dynamic_seq=False if the model fixes the sequence "
            "length")


def export_program(model: nn.Module, example_inputs, dynamic_seq: bool = True,
                   dynamic_shapes=None, dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """torch.export ``model`` (in eval mode) on ``example_inputs``; see :func:`export`.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> converted = m2.convert(transformers.BertModel(config))
        >>> ep = export_program(converted, {"input_ids": torch.randint(0, 100, (1, 16))})
        >>> ep.module()(input_ids=torch.randint(0, 100, (1, 40)))[0].shape      # another N: (B, N, H)
        torch.Size([1, 40, 32])
    """
    wrapper, args, kwargs = _exportable(model, example_inputs)
    if dynamic_shapes is not None:
        attempts = [{k: v for k, v in dynamic_shapes.items() if k in kwargs}
                    if isinstance(dynamic_shapes, dict) else dynamic_shapes]
    elif dynamic_batch and not dynamic_seq:
        attempts = [shape_spec(args, kwargs, None, torch.export.Dim.DYNAMIC)]
    else:
        attempts = [_dynamic_seq(args, kwargs, dynamic_batch) if dynamic_seq else None]
        fallback = _without_varying(attempts[0])
        attempts += [fallback] if fallback is not None else []
    was_training = model.training
    model.eval()
    try:
        for i, shapes in enumerate(attempts):
            try:                              # aliases: a failed export leaves dynamic marks on its tensors
                return torch.export.export(wrapper, *unmarked(args, kwargs), dynamic_shapes=shapes, strict=False)
            except Exception as exc:
                if i + 1 < len(attempts):
                    continue
                detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise CaptureError(f"torch.export failed on {type(model).__name__}: {type(exc).__name__}: {detail}. "
                                   + _export_advice(model, shapes)) from exc
    finally:
        model.train(was_training)


def export(model: nn.Module, example_inputs, path, aoti: bool = False, dynamic_seq: bool = True, *,
           dynamic_shapes=None, dynamic_batch: bool = False) -> Path:
    """Export ``model`` to ``path``: a torch.export program (.pt2), or an AOTInductor package.

    Args:
        model: a converted (or any exportable) model; exported in eval mode, on its device.
        example_inputs: dict of keyword tensors (e.g. ``{"input_ids": ids}`` with ids (B, N)) or a tuple
            of positional tensors; non-tensor dict values are fixed into the graph.
        path: output file, ``*.pt2`` (required for AOTInductor; parent directories are created).
        aoti: compile with AOTInductor into a package that runs without Python model code.
        dynamic_seq: make the sequence dimension dynamic, from 2 to whatever the model allows (e.g. its
            table of learned positions); one artifact serves them all. Token inputs: dim 1 of every input
            of the first one's length N (export fails if the model fixes N). Image ``pixel_values``
            (B, C, H, W): H and W, audio ``input_features`` (B, mel, T) / ``input_values`` (B, T): T, each
            only where the model accepts other sizes, else static (a ViT's patch grid and Whisper's frame
            count are fixed: those export static). :func:`dynamic_inputs` of the program says which dims
            came out dynamic. False: every shape static.
        dynamic_shapes: a torch.export ``dynamic_shapes`` spec used as given instead (keyed by input
            name for dict inputs); ``dynamic_seq`` and ``dynamic_batch`` are then ignored.
        dynamic_batch: also make the batch dimension (dim 0 of every input of the example's batch size)
            dynamic; the example needs a batch of at least 2 (export keeps a size-1 dim static).

    Returns:
        ``path`` as a Path. The artifact takes the same inputs and returns a tuple of tensors (see the
        module docstring).

    Raises:
        CaptureError: torch.export failed (the message says why).  ConfigError: bad example_inputs.
        A failed export leaves the example tensors as they were (no dynamic marks), so a retry with other
        settings on the same tensors works.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> converted = m2.convert(transformers.BertModel(config))
        >>> ids = torch.randint(0, 1000, (2, 24))                                   # (B, N)
        >>> inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        >>> p = m2.export(converted, inputs, "bert-m2.pt2")          # aoti=True: runner = aoti_load_package(str(p))
        >>> torch.export.load(str(p)).module()(**inputs)[0].shape     # (B, N, H)
        torch.Size([2, 24, 32])
    """
    path = Path(path)
    if aoti and path.suffix != ".pt2":
        raise ConfigError(f"an AOTInductor package path must end in .pt2, got '{path}'")
    return write_program(export_program(model, example_inputs, dynamic_seq, dynamic_shapes, dynamic_batch), path, aoti)


def export_onnx(model: nn.Module, example_inputs, path, dynamic_seq: bool = True, dynamic_batch: bool = True) -> Path:
    """Export ``model`` to an ONNX file with torch's dynamo exporter (``torch.onnx.export(dynamo=True)``).

    The graph takes the tensor inputs by name (``input_ids``, ``attention_mask``, ...) and returns the same
    flat tuple of tensors as :func:`export`; ONNX Runtime runs it. The long convolutions export as full
    complex DFTs (ONNX Runtime mis-sizes the one-sided DFT of a dynamic length).

    Args:
        model, example_inputs: as in :func:`export`; ``dynamic_batch`` needs an example batch of at least 2.
        path: the ``.onnx`` file to write (parent directories are created).
        dynamic_seq, dynamic_batch: keep the sequence length / batch size dynamic.

    Raises:
        ConfigError: the onnx / onnxscript packages are missing, or bad example inputs.
        CaptureError: the export failed (the message says why).

    Example:
        >>> converted = m2.convert(transformers.GPT2Model(transformers.GPT2Config(vocab_size=96, n_embd=32,
        ...     n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)), filter_order=16)
        >>> path = export_onnx(converted, {"input_ids": torch.randint(0, 96, (2, 12))}, "gpt2-m2.onnx")
        >>> import onnxruntime
        >>> session = onnxruntime.InferenceSession(str(path))
        >>> session.run(None, {"input_ids": torch.randint(0, 96, (3, 20)).numpy()})[0].shape    # (B, N, H)
        (3, 20, 32)
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's op library)
    except ImportError:
        raise ConfigError("export_onnx needs the onnx and onnxscript packages: pip install onnx onnxscript "
                          "(and onnxruntime to run the file)") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper, args, kwargs = _exportable(model, example_inputs)
    dim = torch.export.Dim.DYNAMIC
    shapes = shape_spec(args, kwargs, dim if dynamic_seq else None, dim if dynamic_batch else None)
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(wrapper, args, str(path), kwargs=kwargs, dynamic_shapes=shapes, dynamo=True,
                          verbose=False)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"ONNX export failed on {type(model).__name__}: {type(exc).__name__}: {detail}") from exc
    finally:
        model.train(was_training)
    return path


def write_program(program: torch.export.ExportedProgram, path, aoti: bool = False) -> Path:
    """Save ``program`` to ``path`` (.pt2), or compile it into an AOTInductor package there; see :func:`export`.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> converted = m2.convert(transformers.BertModel(config))
        >>> write_program(export_program(converted, {"input_ids": torch.randint(0, 100, (1, 16))}), "b.pt2")
        PosixPath('b.pt2')
    """
    path = Path(path)
    if aoti and path.suffix != ".pt2":
        raise ConfigError(f"an AOTInductor package path must end in .pt2, got '{path}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not aoti:
        torch.export.save(program, str(path))
        return path
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs={"post_grad_custom_post_pass": _ComplexSubAsAdd()})
    return path
