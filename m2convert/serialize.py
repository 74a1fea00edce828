"""Saving and loading converted models: safetensors weights + one JSON; nothing is unpickled.

A saved directory holds

    m2convert.json      format + version, the model class, its Hugging Face config dict, the rewrite
                        plan (``RewritePlan.to_dict()``), weight aliases (tied weights) and versions
    model.safetensors   every parameter and persistent buffer, one copy per tied group
    config.json         a copy of the Hugging Face config, so AutoConfig/AutoTokenizer read the directory
    generation_config.json, tokenizer files    when the model has them

Loading rebuilds the original class from its config with every parameter on the ``meta`` device,
applies the plan's structure there (no projection, no teacher), and assigns the saved tensors
(``load_state_dict(assign=True)``); buffers that are not saved (non-persistent: rotary frequencies,
filter features) are recomputed by the constructors exactly as in the original.

The model's own ``save_pretrained(dir)`` writes config.json and model.safetensors with the same tensor
names and values, but not m2convert.json; load such a directory with
``from_pretrained(dir, plan=converted.m2convert_plan)``, or save with :func:`save_pretrained` to get a
self-contained directory.

Example:
    >>> m2.save_pretrained(m2.convert(model), "bert-m2")
    >>> model = m2.from_pretrained("bert-m2")
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, M2Error
from .safetensors_header import DTYPES, HeaderEntry, read_safetensors_header

FORMAT = "m2convert-model"
FORMAT_VERSION = 1
META_FILE = "m2convert.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (tied weights); singletons included."""
    groups: dict[tuple, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_meta or t.numel() == 0:
            key = (id(t),)
        else:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _versions() -> dict:
    import transformers

    from .version import __version__
    return {"m2convert": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _copy_known_tokenizer(model: nn.Module, out: Path) -> list[str]:
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    src = Path(source)
    if not source or not src.is_dir() or src.resolve() == out.resolve():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def save_pretrained(model: nn.Module, path, tokenizer=None) -> Path:
    """Save a converted Hugging Face model to directory ``path`` (created if needed).

    Args:
        model: a model returned by ``m2.convert`` / ``m2.from_pretrained`` (it carries ``m2convert_plan``).
        path: output directory; existing files of the same names are replaced.
        tokenizer: saved alongside when given; otherwise tokenizer files are copied from the directory
            the model was loaded from (``config._name_or_path``), when there are any.

    Returns:
        The directory, as a Path.

    Raises:
        CheckpointError: the model has no plan or no Hugging Face config, or ``path`` is a file.

    Example:
        >>> converted = m2.convert(GPT2LMHeadModel(GPT2Config(n_layer=2)))
        >>> m2.save_pretrained(converted, "gpt2-m2")
        PosixPath('gpt2-m2')
    """
    from safetensors.torch import save_file

    plan = getattr(model, "m2convert_plan", None)
    config = getattr(model, "config", None)
    if not isinstance(plan, dict):
        raise CheckpointError(f"{type(model).__name__} carries no m2convert_plan: only models converted by "
                              "m2.convert (or loaded by m2.from_pretrained) can be saved with m2.save_pretrained")
    if config is None or not hasattr(config, "to_dict"):
        raise CheckpointError(f"{type(model).__name__} has no Hugging Face config to rebuild it from; "
                              "save its state_dict with safetensors.torch.save_file instead")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save to '{out}': it is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    groups = _alias_groups(model)
    tensors = {g[0]: state[g[0]].detach().contiguous() for g in groups}         # one copy per tied group
    tmp = out / (WEIGHTS_FILE + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    config.to_json_file(str(out / "config.json"))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        tokenizer_files = sorted(n for n in TOKENIZER_FILES if (out / n).is_file())
    else:
        tokenizer_files = _copy_known_tokenizer(model, out)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_class": type(model).__name__,
            "hf_config": config.to_dict(), "plan": plan, "weights": WEIGHTS_FILE,
            "aliases": [g for g in groups if len(g) > 1], "tokenizer_files": tokenizer_files,
            "versions": _versions()}
    (out / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return out


def _read_meta(directory: Path, plan) -> dict:
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"'{directory}' is not a directory; m2.from_pretrained expects a directory "
                              "written by m2.save_pretrained")
    if not meta_path.is_file():
        if plan is None or not (directory / "config.json").is_file():
            raise CheckpointError(f"'{directory}' is not an m2convert save: it has no {META_FILE}. Save converted "
                                  "models with m2.save_pretrained; load a directory written by the model's own "
                                  "save_pretrained with m2.from_pretrained(dir, plan=converted.m2convert_plan)")
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "weights": WEIGHTS_FILE,
                "hf_config": _read_json(directory / "config.json"), "plan": None, "model_class": None}
    meta = _read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not an m2convert model file (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format_version {version!r}; this m2convert reads up to "
                              f"{FORMAT_VERSION}: upgrade m2convert")
    for key in ("model_class", "hf_config", "plan"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks the key '{key}'; the file is incomplete, save the model again")
    return meta


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


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


def _build_structure(meta: dict, plan_dict: dict, where: Path) -> nn.Module:
    import transformers

    from .passes.plan import RewritePlan

    hf_config = dict(meta["hf_config"])
    class_name = meta.get("model_class") or (hf_config.get("architectures") or [None])[0]
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
            return plan.apply(inplace=True, model=model, seed=False)
        except M2Error as exc:
            raise CheckpointError(f"{where}: the saved plan does not fit {class_name} built from the saved "
                                  f"config: {exc}") from exc


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Put ``tensor`` at state-dict ``name`` (as a Parameter where one was) and return what was stored."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
        owner._parameters[leaf] = tensor
    else:
        owner._buffers[leaf] = tensor
    return tensor


def from_pretrained(path, plan=None) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`: same class, same structure, same weights.

    Args:
        path: the saved directory.
        plan: only for a directory written by the model's own ``save_pretrained`` (no m2convert.json):
            the plan dict (``converted.m2convert_plan``) or RewritePlan it was converted with.

    Returns:
        The model in eval mode, on the CPU, with the saved dtypes; outputs equal the saved model's bit
        for bit on the same machine.

    Raises:
        CheckpointError: naming the file and tensor/key at fault: not an m2convert directory, a foreign or
            corrupt file, a truncated tensor, a missing or unexpected tensor, a shape mismatch.

    Example:
        >>> model = m2.from_pretrained("gpt2-m2")
        >>> model(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 50257])
    """
    directory = Path(path)
    meta = _read_meta(directory, plan)
    plan_dict = meta["plan"]
    if plan_dict is None:
        if not isinstance(plan, dict) and not hasattr(plan, "to_dict"):
            raise CheckpointError(f"plan must be a plan dict (model.m2convert_plan) or a RewritePlan, got "
                                  f"{type(plan).__name__}")
        plan_dict = plan if isinstance(plan, dict) else plan.to_dict()
    weights = directory / meta.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"'{directory}' has no weight file {weights.name}; the save is incomplete")
    header = read_safetensors_header(weights)
    model = _build_structure(meta, plan_dict, directory)
    groups = _alias_groups(model)
    _check_tensors(weights, header, model, groups)
    _load_tensors(weights, header, model, groups)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{weights} left {left[:5]} unset; the directory does not match the model")
    if (directory / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.m2convert_plan = plan_dict
    return model.eval()


def _check_tensors(weights: Path, header: dict[str, HeaderEntry], model: nn.Module, groups: list[list[str]]) -> None:
    """Raise CheckpointError unless ``header`` holds each tied group of ``model`` once or more, in the
    model's shapes and dtypes torch has, and nothing else."""
    expected = model.state_dict(keep_vars=True)
    known = set(expected)
    unexpected = sorted(set(header) - known)
    if unexpected:
        raise CheckpointError(f"{weights} holds tensors the model does not have: {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}; was it saved from another model or plan?")
    for group in groups:
        present = [n for n in group if n in header]
        if not present:
            raise CheckpointError(f"{weights} lacks tensor '{group[0]}' ({len(known - set(header))} of "
                                  f"{len(known)} missing); the file is incomplete or from another model")
        for name in present:
            want = tuple(expected[name].shape)
            if header[name].dtype not in DTYPES:
                raise CheckpointError(f"{weights}: tensor '{name}' has dtype {header[name].dtype}, which "
                                      "m2convert never saves; the file is corrupt or from elsewhere")
            if header[name].shape != want:
                raise CheckpointError(f"{weights}: tensor '{name}' has shape {header[name].shape} but the model "
                                      f"expects {want}; the file does not match this config/plan")


def _load_tensors(weights: Path, header: dict[str, HeaderEntry], model: nn.Module, groups: list[list[str]]) -> None:
    """Assign each tied group's saved tensor to every name of the group (one tensor, shared)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for group in groups:
                source = next(n for n in group if n in header)
                # A clone owns aligned memory: safetensors buffers may start at any offset, and BLAS
                # kernels round differently on unaligned data, which would break bit equality.
                loaded = _assign(model, source, f.get_tensor(source).clone())
                for alias in group:
                    if alias != source:
                        _assign(model, alias, loaded)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {weights}: {type(exc).__name__}: {exc}") from exc
