"""Reading the header of a safetensors file: every tensor's dtype, shape and byte span, checked against
the file's length, without reading any tensor data.

Loading m2convert saves (``serialize.from_pretrained``) and Hugging Face directories (``m2.load_model``)
both read it first, so a truncated or foreign file is named before anything else reads it.

Example:
    >>> from safetensors.torch import save_file
    >>> save_file({"w": torch.zeros(3, 4)}, "w.safetensors")
    >>> read_safetensors_header(Path("w.safetensors"))["w"].shape
    (3, 4)
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

# The file's dtype names that torch has.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header: dtype as the file names it ("F32"), shape, byte span in the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: Path) -> dict[str, HeaderEntry]:
    """{tensor name: HeaderEntry} of a safetensors file, checking that every tensor's bytes are there.

    Only the header is read. Any dtype is accepted (Hugging Face checkpoints may use ones m2convert's own
    saves never write); for the dtypes torch has (``DTYPES``) the byte span must also match the shape.

    Raises:
        CheckpointError: naming the file and, for a truncated file, the first tensor cut off.

    Example:
        >>> from safetensors.torch import save_file
        >>> save_file({"w": torch.zeros(3, 4)}, "w.safetensors")
        >>> read_safetensors_header(Path("w.safetensors"))["w"]
        HeaderEntry(dtype='F32', shape=(3, 4), start=0, end=48)
    """
    again = "download or save the model again"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if n < 2 or n > min(size - 8, 100_000_000):              # 100 MB: safetensors' own header limit
                raise CheckpointError(f"{path} is not a safetensors file (bad header length); the file is "
                                      f"corrupt or of another format: {again}")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has an unreadable safetensors header ({type(exc).__name__}: {exc}); "
                              f"the file is corrupt: {again}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a malformed safetensors header: {again}")
    data_bytes = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            entry = HeaderEntry(str(info["dtype"]), tuple(int(d) for d in info["shape"]),
                                *(int(o) for o in info["data_offsets"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry {info!r}") from None
        if entry.end > data_bytes:
            raise CheckpointError(f"{path} is truncated: tensor '{name}' needs bytes up to {entry.end} but the "
                                  f"file holds {data_bytes} data bytes; {again}")
        dtype = DTYPES.get(entry.dtype)
        if dtype is not None and entry.end - entry.start != math.prod(entry.shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor '{name}' has {entry.end - entry.start} bytes for shape "
                                  f"{entry.shape} {entry.dtype}; the file is corrupt: {again}")
        out[name] = entry
    return out
