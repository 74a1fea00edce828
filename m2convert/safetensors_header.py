"""Reading the header of a safetensors file: every tensor's dtype, shape and byte span, checked against
the file's length, without reading any tensor data; and the content hashes m2convert saves record.

Loading m2convert saves (``serialize.from_pretrained``) and Hugging Face directories (``m2.load_model``)
both read it first, so a truncated or foreign file is named before anything else reads it. A save also
records the SHA-256 of the header bytes (:func:`header_sha256`) and of every tensor's bytes
(:func:`tensor_sha256`), which loading compares, so a changed byte anywhere in the file is named.

Example:
    >>> from safetensors.torch import save_file
    >>> save_file({"w": torch.zeros(3, 4)}, "w.safetensors")
    >>> read_safetensors_header(Path("w.safetensors"))["w"].shape
    (3, 4)
"""

from __future__ import annotations

import hashlib
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


HASH = "sha256"                 # the algorithm m2convert.json records; hashlib's name
AGAIN = "the file was changed or damaged after it was saved: copy or save the model again"


def header_length(path: Path) -> int:
    """Bytes before the first tensor's data: the 8-byte header size and the JSON header itself."""
    with path.open("rb") as f:
        raw = f.read(8)
    return 8 + struct.unpack("<Q", raw)[0] if len(raw) == 8 else len(raw)


def header_sha256(path: Path, nbytes: int) -> str:
    """Hex SHA-256 of the first ``nbytes`` bytes of ``path`` (its header, ``nbytes`` as recorded at save)."""
    with path.open("rb") as f:
        return hashlib.sha256(f.read(nbytes)).hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's bytes as safetensors stores them (row-major, little-endian).

    Example:
        >>> tensor_sha256(torch.zeros(2)) == hashlib.sha256(bytes(8)).hexdigest()
        True
    """
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)                 # (numel,)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()    # over numel * itemsize bytes


@dataclass(frozen=True)
class WeightHashes:
    """The hashes a save records for its weight file: of the header bytes and of each tensor's bytes.

    A changed byte in the header fails :meth:`check_header` (naming the file), one in a tensor's data
    fails :meth:`check_tensor` (naming the tensor); every byte of a safetensors file is one or the other.

    Example:
        >>> from safetensors.torch import save_file
        >>> tensors = {"w": torch.zeros(3, 4)}
        >>> save_file(tensors, "w.safetensors")
        >>> hashes = WeightHashes.of_file(Path("w.safetensors"), tensors)
        >>> hashes.check_header(Path("w.safetensors"))                  # no error: unchanged
        >>> WeightHashes.from_dict(hashes.to_dict(), "m2convert.json") == hashes
        True
    """

    header_bytes: int
    header: str
    tensors: dict[str, str]

    @classmethod
    def of_file(cls, path: Path, tensors: dict[str, torch.Tensor]) -> "WeightHashes":
        """Hashes of ``path``'s header and of ``tensors``, the tensors just written to it."""
        nbytes = header_length(path)
        return cls(nbytes, header_sha256(path, nbytes), {name: tensor_sha256(t) for name, t in tensors.items()})

    def to_dict(self) -> dict:
        return {"algorithm": HASH, "header_bytes": self.header_bytes, "header": self.header, "tensors": self.tensors}

    @classmethod
    def from_dict(cls, data, where) -> "WeightHashes":
        """Read :meth:`to_dict` output; ``where`` (the file it is in) names it in the CheckpointError raised
        for a malformed entry or an algorithm this version does not check."""
        if not (isinstance(data, dict) and isinstance(data.get("header_bytes"), int)
                and isinstance(data.get("header"), str) and isinstance(data.get("tensors"), dict)):
            raise CheckpointError(f"{where}: its 'hashes' entry is malformed; the file is corrupt: save the model "
                                  "again")
        if data.get("algorithm") != HASH:
            raise CheckpointError(f"{where} records {data.get('algorithm')!r} hashes but this m2convert checks "
                                  f"{HASH!r}: upgrade m2convert")
        return cls(data["header_bytes"], data["header"], dict(data["tensors"]))

    def check_header(self, path: Path) -> None:
        """Raise CheckpointError naming ``path`` if its header bytes differ from the recorded ones."""
        if header_sha256(path, self.header_bytes) != self.header:
            raise CheckpointError(f"{path}: its header (the first {self.header_bytes} bytes: tensor names, dtypes, "
                                  f"shapes and offsets) does not match the {HASH} recorded at save; {AGAIN}")

    def check_tensor(self, path: Path, name: str, tensor: torch.Tensor, entry: HeaderEntry) -> None:
        """Raise CheckpointError naming ``path`` and tensor ``name`` if the bytes read differ from the recorded ones."""
        if tensor_sha256(tensor) != self.tensors.get(name):
            raise CheckpointError(f"{path}: tensor '{name}' (data bytes {entry.start} to {entry.end}) does not match "
                                  f"the {HASH} recorded at save; {AGAIN}")
