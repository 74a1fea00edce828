"""Saving and loading converted models: safetensors weights + one JSON; nothing is unpickled.

A saved directory holds

    m2convert.json      format + version, the model class, its Hugging Face config dict, the rewrite
                        plan (``RewritePlan.to_dict()``), weight aliases (tied weights), versions, the
                        SHA-256 of the weight file's header and of every tensor, and ``recurrent``: the
                        state size, horizon and fit errors of each mixer ``m2.to_recurrent`` made recurrent
    model.safetensors   every parameter and persistent buffer, one copy per tied group
    config.json         an ``M2Config`` (:mod:`m2convert.auto_config`): a model type transformers does not
                        know and an ``auto_map`` to m2convert_auto.py, so that transformers' Auto classes,
                        pipeline, SentenceTransformer and lm-eval load the converted model under
                        ``trust_remote_code=True`` and refuse without it, never building the unconverted one
    m2convert_auto.py   two lines importing the loaders of the installed m2convert (:mod:`m2convert.auto_loaders`)
    generation_config.json, tokenizer files    when the model has them

:func:`save_pretrained`, the converted model's own ``model.save_pretrained(dir)`` (set on every model
``m2.convert`` returns, so ``transformers.Trainer.save_model`` and SentenceTransformer's ``save`` use it)
all write this layout.

Loading rebuilds the original class from its config with every parameter on the ``meta`` device,
applies the plan's structure there (no projection, no teacher), and assigns the saved tensors
(``load_state_dict(assign=True)``); buffers that are not saved (non-persistent: rotary frequencies,
filter features) are recomputed by the constructors exactly as in the original. Every tensor read is
checked against its recorded hash (saves made before hashes were recorded load unchecked). A folder
written by transformers alone (``type(model).save_pretrained(model, dir)``: config.json and weights, no
m2convert.json) loads with ``from_pretrained(dir, plan=converted.m2convert_plan)``.

Example:
    >>> import tempfile
    >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64))
    >>> folder = save_pretrained(m2.convert(model, filter_order=16), tempfile.mkdtemp())
    >>> type(from_pretrained(folder)).__name__
    'BertModel'
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .auto_config import write_auto_files
from .errors import CheckpointError, ConfigError
from .layers.gemv import lay_out_for_decode
from .layers.quantized import quantized_modules
from .layers.recurrent import recurrent_fits
from .passes.apply import CONVERTED_MODEL_HOOKS
from .passes.plan import recurrent_plan
from .safetensors_header import DTYPES, HeaderEntry, WeightHashes, read_safetensors_header
from .structure import build_structure, parameters_on_meta  # noqa: F401  (parameters_on_meta: re-exported)

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

    ``model.save_pretrained(path)`` on a converted model does the same.

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
        >>> import tempfile
        >>> converted = m2.convert(transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_layer=2,
        ...     n_embd=32, n_head=2, bos_token_id=0, eos_token_id=0)).eval(), filter_order=16)
        >>> folder = m2.save_pretrained(converted, Path(tempfile.mkdtemp()) / "gpt2-m2")
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'generation_config.json', 'm2convert.json', 'm2convert_auto.py', 'model.safetensors']
    """
    return _save(model, path, tokenizer)


def _tensors_to_save(model: nn.Module, groups: list[list[str]], state: dict | None) -> dict[str, torch.Tensor]:
    """{name: tensor}, one per tied group, from ``state`` (default: the model's state dict)."""
    own = model.state_dict()
    if state is None:
        state = own
    elif set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise CheckpointError(f"the state_dict given to save {type(model).__name__} does not match the model: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}; pass model.state_dict() or none")
    return {g[0]: state[g[0]].detach().contiguous() for g in groups}


def _save(model: nn.Module, path, tokenizer=None, state: dict | None = None) -> Path:
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
    if quantized := quantized_modules(model):
        raise CheckpointError(f"{quantized[0]} is quantized: save the float model, quantize after loading")
    out.mkdir(parents=True, exist_ok=True)
    groups = _alias_groups(model)
    tensors = _tensors_to_save(model, groups, state)
    tmp = out / (WEIGHTS_FILE + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    hashes = WeightHashes.of_file(tmp, tensors)
    tmp.replace(out / WEIGHTS_FILE)
    write_auto_files(model, out)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        tokenizer_files = sorted(n for n in TOKENIZER_FILES if (out / n).is_file())
    else:
        tokenizer_files = _copy_known_tokenizer(model, out)
    fits = recurrent_fits(model)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_class": type(model).__name__,
            "hf_config": config.to_dict(), "plan": recurrent_plan(plan, fits), "recurrent": fits,
            "weights": WEIGHTS_FILE,
            "aliases": [g for g in groups if len(g) > 1], "tokenizer_files": tokenizer_files,
            "hashes": hashes.to_dict(), "versions": _versions()}
    (out / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return out


def check_options(where: str, options: dict, ignored: frozenset[str], advice: str) -> None:
    """Raise ConfigError naming every keyword argument in ``options`` that is set (not None, False or
    empty) and not in ``ignored``: an option m2convert cannot honour is refused, never dropped.

    Example:
        >>> check_options("load", {"revision": "main", "gguf_file": None}, frozenset({"revision"}), "...")
        >>> check_options("load", {"variant": "fp16"}, frozenset(), "one file only")
        Traceback (most recent call last):
        m2convert.errors.ConfigError: load does not take variant='fp16': one file only
    """
    def unset(value) -> bool:
        return value is None or value is False or (isinstance(value, (str, dict, list, tuple)) and not value)

    refused = [f"{k}={v!r}" for k, v in options.items() if k not in ignored and not unset(v)]
    if refused:
        raise ConfigError(f"{where} does not take {', '.join(refused)}: {advice}")


# transformers' save_pretrained arguments without effect on a local single-file save.
SAVE_IGNORED = frozenset({"max_shard_size", "token", "save_peft_format", "save_original_format"})


class ConvertedSavePretrained:
    """``save_pretrained`` of a converted model, set on the instance by :func:`install_save_pretrained`.

    Writes the m2convert folder (see :func:`save_pretrained`) and takes transformers' arguments:
    ``is_main_process`` (False: write nothing), ``state_dict`` (saved instead of the model's, same names),
    ``safe_serialization`` (always safetensors), ``max_shard_size``/``token`` (one file, no upload: ignored);
    ``push_to_hub``, ``variant`` and other set options are refused. ``copy.deepcopy`` of the model rebinds
    it to the copy.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                 safe_serialization: bool | None = True, **options) -> Path | None:
        where = f"{type(self.model).__name__}.save_pretrained (a converted model)"
        if safe_serialization is False:
            raise ConfigError(f"{where} writes safetensors only; drop safe_serialization=False")
        check_options(where, options, SAVE_IGNORED, "it writes the m2convert folder to a local directory; "
                      "upload that folder with huggingface_hub.upload_folder")
        if not is_main_process:
            return None
        return _save(self.model, save_directory, state=state_dict)


def install_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained(dir)`` write an m2convert folder; run on every model m2.convert returns.

    Example:
        >>> converted = m2.convert(transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)), filter_order=16)
        >>> type(converted.save_pretrained).__name__
        'ConvertedSavePretrained'
    """
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = ConvertedSavePretrained(model)


CONVERTED_MODEL_HOOKS.append(install_save_pretrained)


def _read_meta(directory: Path, plan) -> dict:
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"'{directory}' is not a directory; m2.from_pretrained expects a directory "
                              "written by m2.save_pretrained")
    if not meta_path.is_file():
        if plan is None or not (directory / "config.json").is_file():
            raise CheckpointError(f"'{directory}' is not an m2convert save: it has no {META_FILE}. Save converted "
                                  "models with m2.save_pretrained or their own save_pretrained; load a directory "
                                  "that transformers wrote alone with m2.from_pretrained(dir, "
                                  "plan=converted.m2convert_plan)")
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
        plan: only for a directory transformers wrote without m2convert (no m2convert.json, e.g.
            ``type(model).save_pretrained(model, dir)``): the plan dict (``converted.m2convert_plan``) or
            RewritePlan it was converted with.

    Returns:
        The model in eval mode, on the CPU, with the saved dtypes; outputs equal the saved model's bit
        for bit on the same machine.

    Raises:
        CheckpointError: naming the file and tensor/key at fault: not an m2convert directory, a foreign or
            corrupt file, a truncated tensor, a missing or unexpected tensor, a shape mismatch, bytes that
            differ from the hashes recorded at save (the header: the file is named; a tensor: it is named).

    Example:
        >>> import tempfile
        >>> converted = m2.convert(transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_layer=2,
        ...     n_embd=32, n_head=2, bos_token_id=0, eos_token_id=0)).eval(), filter_order=16)
        >>> model = m2.from_pretrained(m2.save_pretrained(converted, tempfile.mkdtemp()))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> with torch.no_grad():
        ...     torch.equal(model(ids).logits, converted(ids).logits)
        True
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
    hashes = None if meta.get("hashes") is None else WeightHashes.from_dict(meta["hashes"], directory / META_FILE)
    header = read_safetensors_header(weights)
    model = build_structure(meta.get("model_class"), meta["hf_config"], plan_dict, directory, meta.get("recurrent"))
    groups = _alias_groups(model)
    _check_tensors(weights, header, model, groups)       # a named structural fault first, then any changed byte
    if hashes is not None:                               # saves made before hashes were recorded have none
        hashes.check_header(weights)
    _load_tensors(weights, header, model, groups, hashes)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{weights} left {left[:5]} unset; the directory does not match the model")
    if meta.get("recurrent"):
        lay_out_for_decode(model)                        # as m2.to_recurrent stored them: bit-equal outputs
    if (directory / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.m2convert_plan = plan_dict
    model.config._name_or_path = str(directory)          # as transformers does: where the model came from
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


def _load_tensors(weights: Path, header: dict[str, HeaderEntry], model: nn.Module, groups: list[list[str]],
                  hashes: WeightHashes | None = None) -> None:
    """Assign each tied group's saved tensor to every name of the group (one tensor, shared), checking its
    bytes against ``hashes`` when the save recorded them."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for group in groups:
                source = next(n for n in group if n in header)
                # A clone owns aligned memory: safetensors buffers may start at any offset, and BLAS
                # kernels round differently on unaligned data, which would break bit equality.
                tensor = f.get_tensor(source).clone()
                if hashes is not None:
                    hashes.check_tensor(weights, source, tensor, header[source])
                loaded = _assign(model, source, tensor)
                for alias in group:
                    if alias != source:
                        _assign(model, alias, loaded)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {weights}: {type(exc).__name__}: {exc}") from exc
