"""Example inputs for torch.export, shared by planning (``capture``), lowering (``lower``) and ``m2.export``.

    example_inputs_for   keyword inputs built from a Hugging Face config (input_ids + attention_mask, ...)
    split_inputs         a dict / tensor / tuple of example inputs -> (positional, keyword) for torch.export
    disable_cache        ``use_cache=False`` for a forward that takes it: a KV cache cannot be exported
    VARYING_DIMS         inputs that are not token sequences and the dims of theirs that may vary
    dynamic_shapes       the ``dynamic_shapes`` spec keeping the sequence (and batch) length symbolic
    sequence_dim         the sequence-length Dim, bounded by the model's table of learned positions
    unmarked             aliases of the input tensors, so marks torch.export leaves on them stay off the caller's
    export_dynamic       torch.export with batch and length dynamic, falling back to fewer dynamic dims
    (inputs described as ``NAME=SHAPE:DTYPE`` text or read from a file: see input_specs)
    bind_by_name         the inputs by the names of the forward's parameters
    signed               a module class whose forward names its inputs (torch.export binds by signature)

Example:
    >>> ids = torch.ones(2, 16, dtype=torch.long)                          # (B, N)
    >>> args, kwargs = split_inputs({"input_ids": ids, "attention_mask": ids})
    >>> dynamic_shapes(args, kwargs, torch.export.Dim.DYNAMIC)["input_ids"]
    {1: DimHint(DYNAMIC)}
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from m2convert.errors import CaptureError, M2Error

EXAMPLE_BATCH = 2
EXAMPLE_SEQ_LEN = 16


def example_inputs_for(model: nn.Module, seq_len: int = EXAMPLE_SEQ_LEN, batch: int = EXAMPLE_BATCH) -> dict:
    """Keyword inputs for ``model.forward`` built from its Hugging Face config.

    Text models get ``input_ids`` (B, N) and an all-ones ``attention_mask``; vision models get
    ``pixel_values`` (B, C, S, S); decoders get ``use_cache=False`` so no KV cache enters the graph.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> example_inputs_for(transformers.BertModel(config))["input_ids"].shape
        torch.Size([2, 16])
    """
    config = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    if config is None:
        raise CaptureError(
            f"cannot build example inputs for {type(model).__name__}: it has no Hugging Face `config`; "
            "pass example_inputs={'name': tensor, ...} (or a tuple of positional tensors) matching its forward")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    inputs: dict = {}
    if "input_ids" in params and getattr(text, "vocab_size", None):
        limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or seq_len
        n = max(1, min(seq_len, int(limit)))
        ids = torch.randint(0, int(text.vocab_size), (batch, n), generator=gen).to(device)
        inputs["input_ids"] = ids
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones_like(ids)
        if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids
    elif "pixel_values" in params and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        channels = getattr(config, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, size, size, generator=gen).to(device)
    else:
        raise CaptureError(
            f"cannot build example inputs for {type(model).__name__} from its config "
            f"({type(config).__name__}); pass example_inputs={{'name': tensor, ...}} matching its forward")
    return disable_cache(model, inputs)


def split_inputs(example_inputs, error: type[M2Error] = CaptureError) -> tuple[tuple, dict]:
    """(positional, keyword) inputs: a dict is keyword inputs; a tensor, tuple or list positional ones.

    Raises:
        ``error`` (CaptureError unless told): ``example_inputs`` is none of these.

    Example:
        >>> split_inputs(torch.zeros(2, 8))[0][0].shape                     # (B, N)
        torch.Size([2, 8])
        >>> split_inputs({"input_ids": torch.zeros(2, 8)})[1].keys()
        dict_keys(['input_ids'])
    """
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise error(f"example_inputs must be a dict of keyword tensors (e.g. {{'input_ids': ids}}) or a tuple of "
                f"positional tensors, got {type(example_inputs).__name__}")


def disable_cache(model: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` with ``use_cache=False`` added (in place) when ``model.forward`` takes ``use_cache`` and
    ``kwargs`` does not set it: a KV cache among the outputs cannot be exported.

    Example:
        >>> disable_cache(transformers.GPT2Model(transformers.GPT2Config(n_layer=1)), {})
        {'use_cache': False}
    """
    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor among the positional, then the keyword inputs (None if there is none)."""
    return next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)


# Inputs that are not token sequences, by name: the dims that may vary (negative: from the end). The
# sequence-length grouping of dynamic_shapes leaves them out; each of these dims is Dim.AUTO, dynamic where
# the model accepts other sizes and static where it fixes them (a ViT's patch grid, Whisper's 3000 frames).
VARYING_DIMS: dict[str, tuple[int, ...]] = {
    "pixel_values": (-2, -1),        # (B, C, H, W) images
    "input_features": (-1,),         # (B, mel bins, T) audio features (Whisper, Speech2Text)
    "input_values": (-1,),           # (B, T) raw audio (wav2vec2, HuBERT)
}


def dynamic_shapes(args: tuple, kwargs: dict, seq, batch=None):
    """The torch.export ``dynamic_shapes`` spec of these inputs, or None when they have no dimension to vary.

    The first tensor input not named in :data:`VARYING_DIMS` sets (B, N). Dim 1 of every such input of
    length N becomes ``seq``; with ``batch``, dim 0 of every input of B rows becomes ``batch``. Inputs
    named in VARYING_DIMS get ``Dim.AUTO`` on the dims it lists (dynamic only where the model allows).
    Non-tensor and 0-dim inputs stay static. None when no input can vary: no VARYING_DIMS input, and the
    first other tensor is not (B, N, ...) with N >= 2 (export cannot keep a length-1 axis symbolic).

    Args:
        seq: a ``torch.export.Dim`` (or ``Dim.DYNAMIC``, which lets export infer the range).
        batch: the same for the batch dimension, or None to keep it static.

    Example:
        >>> ids, pos = torch.ones(2, 16, dtype=torch.long), torch.zeros(16)         # (B, N), (N,)
        >>> dynamic_shapes((), {"input_ids": ids, "scale": pos}, "seq", "batch")     # labels for the Dims
        {'input_ids': {1: 'seq', 0: 'batch'}, 'scale': None}
        >>> dynamic_shapes((), {"pixel_values": torch.ones(2, 3, 16, 16)}, "seq")    # (B, C, H, W)
        {'pixel_values': {2: DimHint(AUTO), 3: DimHint(AUTO)}}
    """
    varying = {k for k, t in kwargs.items() if k in VARYING_DIMS and isinstance(t, torch.Tensor) and t.dim() >= 2}
    first = first_tensor(args, {k: t for k, t in kwargs.items() if k not in varying})
    if first is not None and (first.dim() < 2 or first.shape[1] < 2):
        first = None
    if first is None and not varying:
        return None
    ref = first if first is not None else kwargs[next(iter(varying))]
    b, n = ref.shape[0], (first.shape[1] if first is not None else None)

    def spec(name, t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        if name in varying:
            dims = {d % t.dim(): torch.export.Dim.AUTO for d in VARYING_DIMS[name]}
        else:
            dims = {1: seq} if n is not None and t.dim() >= 2 and t.shape[1] == n else {}
        return {**dims, 0: batch} if batch is not None and t.shape[0] == b else dims or None

    return {k: spec(k, t) for k, t in kwargs.items()} if kwargs else tuple(spec(None, t) for t in args)


def sequence_dim(model: nn.Module) -> torch.export.Dim:
    """Dim 'seq' from 2 up to the model's table of learned positions (``max_position_embeddings`` /
    ``n_positions`` of its Hugging Face config), unbounded above when it has none.

    Example:
        >>> sequence_dim(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_positions=64))).max
        64
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = next((v for k in ("max_position_embeddings", "n_positions")
                  if isinstance(v := getattr(text, k, None), int) and v > 2), None)
    return torch.export.Dim("seq", min=2, max=limit) if limit else torch.export.Dim("seq", min=2)


def unmarked(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs with every tensor replaced by a detached alias (same storage, a new tensor object).

    torch.export marks the tensors it is given as dynamic (``_dynamo_dynamic_indices`` and other
    attributes) and leaves the marks there when it fails, so a retry with other settings on the same
    tensors would fail too; exporting aliases keeps the caller's tensors as they were.

    Example:
        >>> ids = torch.ones(2, 16, dtype=torch.long)                                # (B, N)
        >>> (alias,), _ = unmarked((ids,), {})
        >>> alias is ids, alias.data_ptr() == ids.data_ptr()
        (False, True)
    """
    def alias(t):
        return t.detach() if isinstance(t, torch.Tensor) else t

    return tuple(alias(t) for t in args), {k: alias(t) for k, t in kwargs.items()}


def export_dynamic(model: nn.Module, example_inputs,
                   dynamic: bool = True) -> tuple[torch.export.ExportedProgram, list[str]]:
    """torch.export ``model`` (eval mode, non-strict) on ``example_inputs``, batch and sequence length
    dynamic, else the length only, else static shapes; (program, notes saying which, and why not more).

    Raises:
        CaptureError: not even static shapes could be captured (every attempt's reason is listed).

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> model = transformers.BertModel(config)
        >>> ep, notes = export_dynamic(model, {"input_ids": torch.ones(2, 16, dtype=torch.long)})  # (B, N)
        >>> notes
        []
        >>> _, notes = export_dynamic(model, {"input_ids": torch.ones(1, 16, dtype=torch.long)})   # B = 1
        >>> notes[0].split(" (")[0]
        'captured with dynamic length shapes'
    """
    args, kwargs = split_inputs(example_inputs)
    attempts = [("dynamic batch and length", True), ("dynamic length", False)] if dynamic else []
    attempts.append(("static", None))
    failures: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for what, batch in attempts:
            shapes = None if batch is None else dynamic_shapes(
                args, kwargs, sequence_dim(model), torch.export.Dim("batch", min=1) if batch else None)
            if batch is not None and shapes is None:
                continue
            try:                                          # fresh aliases: a failed attempt leaves marks on its own
                ep = torch.export.export(model, *unmarked(args, kwargs), dynamic_shapes=shapes, strict=False)
            except Exception as exc:                      # export raises many types; each attempt says why
                detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                failures.append(f"{what} shapes: {type(exc).__name__}: {detail}")
                continue
            return ep, [f"captured with {what} shapes ({'; '.join(failures)})"] if failures else []
    finally:
        model.train(was_training)
    raise CaptureError(f"torch.export could not capture {type(model).__name__} ("
                       + "; ".join(failures) + "). Pass example_inputs matching its forward")


def bind_by_name(model: nn.Module, args: tuple, kwargs: dict, defaults: dict | None = None):
    """(parameters, inputs by name): the named parameters of ``model.forward`` (``*args`` and ``**kwargs``
    left out, ``defaults`` replacing their defaults) and the inputs bound to them; None when they do not
    name every input, or a new default would precede a required parameter.

    Example:
        >>> class Model(nn.Module):
        ...     def forward(self, x, mask=None, flag=True, **kwargs):
        ...         return x
        >>> params, named = bind_by_name(Model(), (torch.ones(2, 8),), {"flag": False}, {"flag": False})
        >>> [str(p) for p in params], list(named)
        (['x', 'mask=None', 'flag=False'], ['x', 'flag'])
        >>> bind_by_name(Model(), (), {"x": torch.ones(2, 8), "scale": 2.0}) is None     # only **kwargs names it
        True
    """
    P = inspect.Parameter
    defaults = defaults or {}
    params = [p.replace(default=defaults[p.name]) if p.name in defaults else p
              for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    try:
        return params, dict(inspect.Signature(params).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):          # an input it does not name, or a default before a required one
        return None


def signed(base: type[nn.Module], params: list[inspect.Parameter], name: str) -> type[nn.Module]:
    """A subclass ``name`` of ``base`` whose ``forward`` (``base.forward``, taking ``*args, **kwargs``) has
    the signature ``params`` (``self`` first): torch.export and ``inspect`` bind inputs by that signature.

    Example:
        >>> class Echo(nn.Module):
        ...     def forward(self, *args, **kwargs):
        ...         return args
        >>> P = inspect.Parameter
        >>> cls = signed(Echo, [P(n, P.POSITIONAL_OR_KEYWORD) for n in ("self", "input_ids")], "NamedEcho")
        >>> inspect.signature(cls().forward)
        <Signature (input_ids)>
    """
    forward = lambda self, *a, **k: base.forward(self, *a, **k)                # noqa: E731
    forward.__signature__ = inspect.Signature(params)
    return type(name, (base,), {"forward": forward, "__doc__": base.__doc__, "__module__": base.__module__})

