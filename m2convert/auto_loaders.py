"""What transformers' Auto classes call for a saved m2convert folder (under ``trust_remote_code=True``).

A folder's config.json (:mod:`m2convert.auto_config`) sends each Auto model class to one loader here:
``AutoModelForCausalLM`` -> ``M2ModelForCausalLM``, ``AutoModel`` -> ``M2Model`` (``M2`` + the Auto
class's name without ``Auto``; one class per Auto class, generated from transformers' list). A loader
reads the folder with :func:`m2convert.serialize.from_pretrained` (hash-checked, outputs bit-equal to the
saved model) and returns the saved model, or its base model where transformers would (``AutoModel`` on a
GPT2LMHeadModel folder gives the converted GPT2Model); an Auto class the folder cannot serve is a
CheckpointError that lists those it can. pipeline, SentenceTransformer and lm-eval load through these.

Example:
    >>> import tempfile
    >>> config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                  intermediate_size=64)
    >>> folder = m2.save_pretrained(m2.convert(transformers.BertForMaskedLM(config).eval(), filter_order=16),
    ...                             tempfile.mkdtemp())
    >>> type(M2Model.from_pretrained(folder)).__name__                 # what AutoModel gives
    'BertModel'
    >>> M2ModelForCausalLM.from_pretrained(folder)
    Traceback (most recent call last):
    m2convert.errors.CheckpointError: '...' holds a converted BertForMaskedLM; transformers.AutoModelForCausalLM
    cannot load it; it loads with ['AutoModel', 'AutoModelForMaskedLM', 'AutoModelForTextEncoding'] and with
    m2convert.from_pretrained
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .auto_config import M2Config, auto_model_classes, loader_name
from .errors import CheckpointError, ConfigError
from .passes.plan import RewritePlan
from .serialize import check_options, from_pretrained, install_save_pretrained

# from_pretrained arguments without use for a local m2convert folder: where to download from, the
# remote-code bookkeeping of the Auto classes and pipeline, and switches whose effect a whole load on one
# device has anyway. accelerate's placement (max_memory, offload_folder, offload_state_dict) is not
# applied, so it is refused when set (check_options), never dropped.
LOAD_IGNORED = frozenset({"cache_dir", "force_download", "local_files_only", "proxies", "revision", "token",
                          "code_revision", "trust_remote_code", "_from_auto", "_from_pipeline", "_commit_hash",
                          "use_safetensors", "low_cpu_mem_usage", "resume_download"})
# device_map values that mean "wherever fits": one device here, the first accelerator if there is one.
AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# The plan's keys that hold module paths (site paths, replaced modules, role and norm paths).
PATH_KEYS = ("fqn", "path", "replaces", "fold_module")


def _dtype(value, where: str) -> torch.dtype | None:
    if value is None or value == "auto":
        return None                                          # the saved dtypes
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise ConfigError(f"{where}: dtype={value!r} is not a torch dtype; pass e.g. torch.bfloat16, 'float16' or 'auto'")


def _device(value, where: str) -> torch.device | None:
    if isinstance(value, dict):
        devices = {str(d) for d in value.values()}
        if len(devices) != 1:
            raise ConfigError(f"{where}: device_map={value!r} spreads the model over {sorted(devices)}; an m2convert "
                              "folder loads onto one device: pass one (device_map='cuda:0') or dispatch it afterwards")
        value = next(iter(value.values()))
    if value is None:
        return None
    if value in AUTO_DEVICE_MAPS:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{where}: device_map={value!r} is not a device; pass 'cpu', 'cuda:0', 'auto' or "
                          "{'': device}") from None


def _saved_config(path: Path, where: str) -> M2Config:
    """The folder's config.json, read as an M2Config."""
    if not path.is_dir():
        raise CheckpointError(f"{where}: '{path}' is not a local directory; download the folder first "
                              "(huggingface_hub.snapshot_download) and pass its path")
    try:
        config = M2Config.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{where}: cannot read {path / 'config.json'}: {type(exc).__name__}: {exc}") from exc
    if not config.m2convert:
        raise CheckpointError(f"{where}: {path / 'config.json'} is not the config of an m2convert folder; "
                              "load the folder with m2convert.from_pretrained")
    return config


def _overrides(config, saved: M2Config) -> dict:
    """Settings the caller put into ``config`` (``AutoModel.from_pretrained(dir, num_labels=5)`` does) that
    differ from the folder's own; dtype is taken as an argument, not from here."""
    if config is None:
        return {}
    if not isinstance(config, M2Config):
        return {"config": type(config).__name__}
    given, own = config.to_dict(), saved.to_dict()
    changed = {k: given.get(k) for k in set(given) | set(own)
               if given.get(k) != own.get(k) and k not in ("_name_or_path", "dtype", "torch_dtype")}
    if getattr(config, "_attn_implementation", None) is not None:
        changed["attn_implementation"] = config._attn_implementation
    return changed


def _placement(where: str, options: dict) -> tuple[torch.dtype | None, torch.device | None]:
    """(dtype, device) from transformers' arguments; every other argument must be ignorable or unset."""
    dtype, legacy = options.pop("dtype", None), options.pop("torch_dtype", None)     # legacy: transformers 4 name
    dtype = _dtype(legacy if dtype in (None, "auto") else dtype, where)
    device = _device(options.pop("device_map", None), where)
    if "_adapter_model_path" in (options.pop("adapter_kwargs", None) or {}):
        raise ConfigError(f"{where}: the folder holds a PEFT adapter; load the model with m2convert, then "
                          "peft.PeftModel.from_pretrained(model, adapter_folder)")
    check_options(where, options, LOAD_IGNORED, "the converted model loads as saved, whole, on one device; "
                  "supported: dtype, device_map (one device), subfolder. To spread or offload it, load it, then "
                  "accelerate.dispatch_model(model, device_map) / cpu_offload(model)")
    return dtype, device


def _strip_paths(value, prefix: str):
    """``value`` (a plan's site dict) with ``prefix.`` taken off every module path under PATH_KEYS."""
    if isinstance(value, dict):
        return {k: (_strip_paths(v, prefix) if k not in PATH_KEYS else _relative(v, prefix)) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_paths(v, prefix) for v in value]
    return value


def _relative(value, prefix: str):
    if isinstance(value, list):
        return [_relative(v, prefix) for v in value]
    return value.removeprefix(prefix + ".") if isinstance(value, str) else value


def base_model_of(model: nn.Module) -> nn.Module:
    """``model.base_model`` (a head model's body), carrying its part of the plan, saveable on its own.

    Raises:
        CheckpointError: the plan's paths do not lead to the base model's modules.
    """
    prefix, base = model.base_model_prefix, model.base_model
    plan = model.m2convert_plan
    sites = [_strip_paths(s, prefix) for s in plan["sites"] if s["fqn"].startswith(prefix + ".")]
    for path in (p for site in sites if site.get("status") == "convert" for p in site["replaces"]):
        try:
            same = base.get_submodule(path) is model.get_submodule(f"{prefix}.{path}")
        except AttributeError:
            same = False
        if not same:
            raise CheckpointError(f"the plan of {type(model).__name__} does not map onto its base model at "
                                  f"'{path}'; load the whole model with m2convert.from_pretrained")
    below = RewritePlan.from_dict({**plan, "model_class": type(base).__name__, "sites": sites})
    # Parameters of the base before conversion: now, plus what its converted sites saved.
    below.model_params = (sum(p.numel() for p in base.parameters())
                          + sum(s.params_before - s.params_after for s in below.converted))
    base.m2convert_plan = below.to_dict()
    install_save_pretrained(base)
    return base


class M2Loader:
    """Base of the loader classes: ``from_pretrained(folder, dtype=..., device_map=...)``.

    ``dtype`` (or ``torch_dtype``; "auto" or none: the saved dtypes) and a one-device ``device_map`` are
    honoured; download and remote-code arguments are ignored (the folder is local); any other argument
    that is set is refused with a ConfigError.
    """

    config_class = M2Config
    auto_class = "AutoModel"                                 # the transformers Auto class this loader serves

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """Called by transformers after importing the class; there is nothing to record."""

    @classmethod
    def _from_config(cls, config, **kwargs) -> nn.Module:
        """What ``transformers.AutoModel.from_config`` calls: refused, with what to do instead. The config of
        an m2convert folder names no architecture by itself (the model's config and the rewrite plan live in
        the folder's m2convert.json), and a converted model without its weights is not what it was saved as."""
        folder = getattr(config, "_name_or_path", "") or "FOLDER"
        model_class = getattr(config, "m2convert", {}).get("model_class", "the original class")
        raise ConfigError(f"transformers.{cls.auto_class}.from_config cannot build a converted model from its "
                          f"config alone: load the saved model with {cls.auto_class}.from_pretrained('{folder}', "
                          f"trust_remote_code=True) or m2convert.from_pretrained('{folder}'); for fresh weights, "
                          f"convert an untrained model: m2.convert({model_class}(original_config))")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs) -> nn.Module:
        """The converted model saved in folder ``pretrained_model_name_or_path`` (or the base model of it, for
        an Auto class that gets the base), on ``device_map``'s device in ``dtype``; see the class."""
        where = f"{cls.__name__}.from_pretrained (transformers.{cls.auto_class})"
        path = Path(pretrained_model_name_or_path) / (kwargs.pop("subfolder", None) or "")
        saved = _saved_config(path, where)
        changed = _overrides(config, saved)
        if model_args or changed:
            raise ConfigError(f"{where} applies no model arguments or config changes ({changed or model_args}): "
                              f"the folder '{path}' defines the model; load it, then change model.config")
        dtype, device = _placement(where, kwargs)
        served = saved.auto_classes
        if cls.auto_class not in served:
            raise CheckpointError(f"'{path}' holds a converted {saved.m2convert.get('model_class', 'model')}; "
                                  f"transformers.{cls.auto_class} cannot load it; it loads with "
                                  f"{sorted(served) or 'none of the Auto classes'} and with m2convert.from_pretrained")
        model = from_pretrained(path)
        if served[cls.auto_class] == "base":
            model = base_model_of(model)
        return model.to(dtype=dtype, device=device) if dtype or device else model


def _loader(auto_class: str) -> type:
    return type(loader_name(auto_class), (M2Loader,), {
        "auto_class": auto_class, "__module__": __name__,
        "__doc__": f"What transformers.{auto_class}.from_pretrained calls for an m2convert folder."})


LOADERS = {name: _loader(name) for name in auto_model_classes()}
globals().update({cls.__name__: cls for cls in LOADERS.values()})
__all__ = ["M2Config", "M2Loader", *(cls.__name__ for cls in LOADERS.values())]
