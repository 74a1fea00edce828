"""Example inputs described as text (the CLI's ``--input NAME=SHAPE:DTYPE``) or read from a safetensors file.

    parse_input_spec     ``NAME=SHAPE:DTYPE`` -> InputSpec
    FILLS                how a described input is filled, by its name and dtype
    example_inputs_from  keyword inputs for a model from such specs and/or given tensors
    read_inputs_file     the named tensors of a safetensors file

Example:
    >>> parse_input_spec("input_ids=2x16:int64").shape                                  # (B, N)
    (2, 16)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from m2convert.errors import ConfigError


INPUT_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
_SPEC = re.compile(r"([A-Za-z_]\w*)=(\d+(?:x\d+)*):(\w+)")
INPUT_SPEC_FORM = "NAME=SHAPE:DTYPE, e.g. input_ids=1x128:int64 or input_features=1x80x3000:float32"


@dataclass(frozen=True)
class InputSpec:
    """One example input described as text: its name, shape and dtype (see :func:`parse_input_spec`)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def parse_input_spec(text: str) -> InputSpec:
    """``NAME=SHAPE:DTYPE`` -> InputSpec; SHAPE is sizes joined by ``x``, DTYPE a torch dtype name.

    Raises:
        ConfigError: naming the text and the expected form.

    Example:
        >>> parse_input_spec("input_features=1x80x3000:float32")                   # (B, mel bins, T)
        InputSpec(name='input_features', shape=(1, 80, 3000), dtype=torch.float32)
    """
    found = _SPEC.fullmatch(text.strip())
    if found is None:
        raise ConfigError(f"input '{text}' is not of the form {INPUT_SPEC_FORM}")
    name, sizes, dtype = found.groups()
    shape = tuple(int(s) for s in sizes.split("x"))
    if dtype not in INPUT_DTYPES:
        raise ConfigError(f"input '{text}': unknown DTYPE '{dtype}'; use one of {', '.join(INPUT_DTYPES)}")
    if min(shape) < 1:
        raise ConfigError(f"input '{text}': every size in SHAPE must be at least 1 (form {INPUT_SPEC_FORM})")
    return InputSpec(name, shape, INPUT_DTYPES[dtype])


# How a described input is filled, first match wins: (what, applies(name, dtype), fill(shape, dtype, vocab, gen)).
# Random token ids stay below the config's vocab_size; integer inputs of a model without one get 0 or 1.
FILLS = [
    ("ones (a mask)", lambda name, dtype: name.endswith("mask") or dtype == torch.bool,
     lambda shape, dtype, vocab, gen: torch.ones(shape, dtype=dtype)),
    ("zeros (one segment)", lambda name, dtype: name == "token_type_ids",
     lambda shape, dtype, vocab, gen: torch.zeros(shape, dtype=dtype)),
    ("positions 0..N-1", lambda name, dtype: name == "position_ids",
     lambda shape, dtype, vocab, gen: torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()),
    ("standard normal", lambda name, dtype: dtype.is_floating_point,
     lambda shape, dtype, vocab, gen: torch.randn(shape, generator=gen).to(dtype)),
    ("random ids", lambda name, dtype: True,
     lambda shape, dtype, vocab, gen: torch.randint(0, vocab or 2, shape, generator=gen).to(dtype)),
]


def example_inputs_from(model: nn.Module, specs=(), tensors: dict | None = None) -> dict:
    """Keyword inputs for ``model``: ``tensors`` (e.g. from :func:`read_inputs_file`) and ``specs``
    (``NAME=SHAPE:DTYPE`` texts or InputSpecs; a spec replaces a tensor of its name), on the model's
    device. Specs are filled by :data:`FILLS`: masks with ones, floats with randn, token ids with random
    ids below the config's ``vocab_size`` (seeded: the same specs give the same tensors).

    Raises:
        ConfigError: a bad spec, or no input at all.

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64, vocab_size=100)
        >>> inputs = example_inputs_from(transformers.BertModel(config),
        ...                              ["input_ids=2x24:int64", "attention_mask=2x24:int64"])   # (B, N)
        >>> inputs["input_ids"].shape, int(inputs["input_ids"].max()) < 100, int(inputs["attention_mask"].min())
        (torch.Size([2, 24]), True, 1)
    """
    inputs = dict(tensors or {})
    parsed = [s if isinstance(s, InputSpec) else parse_input_spec(s) for s in specs]
    if not inputs and not parsed:
        raise ConfigError(f"no example inputs given: describe each as {INPUT_SPEC_FORM}, or give tensors")
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    gen = torch.Generator().manual_seed(0)
    for spec in parsed:
        fill = next(f for _, applies, f in FILLS if applies(spec.name, spec.dtype))
        inputs[spec.name] = fill(spec.shape, spec.dtype, vocab if isinstance(vocab, int) else None, gen)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return {k: t.to(device) for k, t in inputs.items()}


def read_inputs_file(file) -> dict:
    """The named tensors of a safetensors file (``safetensors.torch.save_file({name: tensor})``).

    Raises:
        ConfigError: the file is missing, unreadable or empty.

    Example:
        >>> from safetensors.torch import save_file
        >>> save_file({"input_ids": torch.ones(1, 8, dtype=torch.long)}, "inputs.safetensors")   # (B, N)
        >>> read_inputs_file("inputs.safetensors")["input_ids"].shape
        torch.Size([1, 8])
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"inputs file '{file}' {'is a directory' if path.is_dir() else 'does not exist'}; "
                          "give a safetensors file of named tensors (safetensors.torch.save_file({name: tensor}))")
    try:
        inputs = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"inputs file '{file}' is not a readable safetensors file ({exc}); write it with "
                          "safetensors.torch.save_file({name: tensor, ...})") from exc
    if not inputs:
        raise ConfigError(f"inputs file '{file}' holds no tensors")
    return inputs
