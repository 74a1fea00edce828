"""One import name per folder: what ``kernels/`` and ``passes/`` do when loaded as top-level packages.

Both folders sit at the repository root and install as ``m2convert.kernels`` / ``m2convert.passes``. Where
the root is on ``sys.path`` (``python -m pytest``, a REPL, ``python -c`` or a notebook started there),
``import kernels`` would otherwise find this folder instead of the ``kernels`` distribution that
transformers imports, and ``passes.x`` would be a second copy of ``m2convert.passes.x``. Each folder's
``__init__`` calls :func:`hand_over` first when its ``__name__`` is not the installed one: the import then
gives whatever else on the path has that name, or fails as if the folder were not there.

This module imports only the standard library: it runs before anything of m2convert is importable.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _same_dir(entry: str, folder: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), folder)
    except OSError:                                   # a path entry that does not exist, or a zip file
        return False


def hand_over(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, loaded under a top-level name) with the next module of
    that name on the path, skipping the repository root; raise ModuleNotFoundError when there is none.

    name: the top-level name being imported ("kernels").  init_file: the folder's ``__init__.py``.
    Python's import returns ``sys.modules[name]`` after the package body runs, so the caller's
    ``import kernels`` receives the module found here.
    """
    folder = os.path.dirname(os.path.abspath(init_file))
    root = os.path.dirname(folder)
    for sub in [m for m in sys.modules if m.startswith(name + ".")]:
        if os.path.dirname(os.path.abspath(getattr(sys.modules[sub], "__file__", "") or "")) == folder:
            del sys.modules[sub]                      # this helper, loaded as name._toplevel
    path = [p for p in sys.path if not _same_dir(p, root)]
    for finder in sys.meta_path:
        if isinstance(finder, type) and issubclass(finder, importlib.machinery.PathFinder):
            spec = finder.find_spec(name, path)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
        else:
            continue
        if spec is not None and not (spec.origin and os.path.dirname(os.path.abspath(spec.origin)) == folder):
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return
    raise ModuleNotFoundError(
        f"No module named {name!r} (the folder {folder} is m2convert.{name}: import it by that name)",
        name=name)
