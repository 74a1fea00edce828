"""The config.json of a saved m2convert folder, and the code file it sends transformers to.

A converted model keeps its class (a GPT2LMHeadModel with M2 mixers is still a GPT2LMHeadModel), so a
config.json naming that class would make every transformers loader build the unconverted model and fill
its attention and MLP weights at random. The saved config.json is an :class:`M2Config` instead: model
type ``"m2convert"``, which transformers does not know, and an ``auto_map`` that sends ``AutoConfig`` and
every Auto model class to ``m2convert_auto.py``, two lines written beside the weights that import the
loaders of the installed m2convert (:mod:`m2convert.auto_loaders`). transformers runs that file only under
``trust_remote_code=True``; without it, every Auto class raises instead of guessing.

Which Auto classes can load a folder is decided at save from transformers' own tables: those that map
the model's class (``AutoModelForCausalLM`` for a GPT2LMHeadModel), and those that map its base model's
class (``AutoModel`` gives the converted GPT2Model, as transformers does for a head checkpoint).

Example:
    >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    >>> served_auto_classes(model)["AutoModelForCausalLM"], served_auto_classes(model)["AutoModel"]
    ('model', 'base')
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PretrainedConfig

MODEL_TYPE = "m2convert"
CODE_FILE = "m2convert_auto.py"
CODE = ('"""Loads this m2convert folder through transformers\' Auto classes (trust_remote_code=True): the\n'
        'loaders come from the installed m2convert package; nothing else is defined here."""\n'
        "from m2convert.auto_loaders import *  # noqa: F401,F403\n")


class M2Config(PretrainedConfig):
    """config.json of an m2convert folder: no architecture transformers knows, only where to load it from.

    Attributes:
        m2convert: ``{"model_class": saved class name, "model_type": its config's model_type,
            "auto_classes": {Auto class name: "model" | "base"}}``; the model's own config is in m2convert.json.

    Example:
        >>> M2Config(m2convert={"model_class": "BertModel"}).model_type
        'm2convert'
    """

    model_type = MODEL_TYPE

    def __init__(self, m2convert: dict | None = None, **kwargs):
        self.m2convert = dict(m2convert or {})
        super().__init__(**kwargs)

    @property
    def auto_classes(self) -> dict[str, str]:
        """{Auto class name: "model" (loads the saved model) or "base" (loads its base model)}."""
        return dict(self.m2convert.get("auto_classes") or {})


def auto_model_classes() -> dict[str, type]:
    """{name: class} of every Auto model class of the installed transformers (AutoModel, AutoModelForCausalLM...)."""
    from transformers.models.auto import modeling_auto

    found = {}
    for name in dir(modeling_auto):
        cls = getattr(modeling_auto, name)
        if name.startswith("AutoModel") and isinstance(cls, type) and hasattr(cls, "_model_mapping"):
            found[name] = cls
    return found


def loader_name(auto_class: str) -> str:
    """The loader of :mod:`m2convert.auto_loaders` an Auto class calls (AutoModelForCausalLM -> M2ModelForCausalLM)."""
    return "M2" + auto_class.removeprefix("Auto")


def _mapped_names(auto_class: type, model_type: str) -> tuple[str, ...]:
    names = getattr(auto_class._model_mapping, "_model_mapping", {}).get(model_type)   # model_type -> class name(s)
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)


def served_auto_classes(model: nn.Module) -> dict[str, str]:
    """{Auto class name: "model" | "base"}: the Auto classes that load a folder saved from ``model``.

    "model": transformers maps the model's config type to its class for that Auto class; "base": it maps it
    to the class of ``model.base_model`` (a head model's body), which is what that Auto class then gets.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    base = getattr(model, "base_model", model)
    served = {}
    for name, auto_class in auto_model_classes().items():
        names = _mapped_names(auto_class, model_type)
        if type(model).__name__ in names:
            served[name] = "model"
        elif base is not model and type(base).__name__ in names:
            served[name] = "base"
    return served


def write_auto_files(model: nn.Module, out: Path) -> None:
    """Write ``out/config.json`` (an :class:`M2Config` for ``model``) and ``out/m2convert_auto.py``."""
    module = CODE_FILE.removesuffix(".py")
    served = served_auto_classes(model)
    auto_map = {"AutoConfig": f"{module}.M2Config"}
    auto_map.update({name: f"{module}.{loader_name(name)}" for name in auto_model_classes()})
    own = next((name for name, how in served.items() if how == "model"), "AutoModel")
    config = M2Config(m2convert={"model_class": type(model).__name__,
                                 "model_type": getattr(model.config, "model_type", ""), "auto_classes": served},
                      auto_map=auto_map, architectures=[loader_name(own)])
    config.to_json_file(str(out / "config.json"))
    (out / CODE_FILE).write_text(CODE, encoding="utf-8")
