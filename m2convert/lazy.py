"""Package attributes that load on first use (PEP 562): a package lists where each public name lives and
imports that module only when the name is read, so importing the package (or running ``--help``) does not
import torch and transformers."""

from __future__ import annotations

import importlib
import importlib.util


def lazy_names(package: str, where: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package`` whose public names ``where`` maps to their modules
    (relative to the package, e.g. ``{"convert": "api"}``); ``None`` names a subpackage itself.

    Example:
        >>> getattr_, dir_ = lazy_names("m2convert", {"ConvertConfig": "config"})
        >>> getattr_("ConvertConfig").__name__
        'ConvertConfig'
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in where:
            if not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f".{name}", package)      # a subpackage: m2.layers, m2.passes
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f".{where[name] or name}", package)
        value = module if where[name] is None else getattr(module, name)
        namespace[name] = value                     # later lookups find it without this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
