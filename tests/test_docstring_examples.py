"""Every ``>>>`` example in a docstring of the installed package runs and prints what it shows.

Modules are found by import name (``pkgutil.walk_packages`` over ``m2convert``, ``m2convert.passes`` and
``m2convert.kernels``), so each file is imported once, under the name it is installed as (pytest's
--doctest-modules would import passes/ and kernels/ a second time under other names and register the
torch.library ops twice). A module that fails to import is a failing test, never a skipped one. Each
docstring is its own test, named by its qualified name (``m2convert.layers.monarch.MonarchLinear``).

Examples see their module's globals plus :data:`NAMESPACE`, and run with ELLIPSIS and
NORMALIZE_WHITESPACE after ``torch.manual_seed(0)``. The Triton kernel modules run under the interpreter
(conftest.py sets TRITON_INTERPRET=1 before anything imports triton).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# Names every example may use without importing them (``m2`` is ``m2convert``, added once it imports).
NAMESPACE = {"torch": torch, "nn": nn, "transformers": transformers}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def module_names() -> list[str]:
    """Every module of the package. passes/ and kernels/ install as m2convert.passes and m2convert.kernels
    (pyproject's package-dir); an editable install's ``m2convert.__path__`` does not reach them, so each
    package-dir root is walked too."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        roots = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    names = set(roots)
    for root in roots:
        try:  # found without importing the modules, so that one that fails to import is still listed
            path = importlib.util.find_spec(root).submodule_search_locations
        except Exception:  # noqa: BLE001  the import failure is reported by its test
            continue
        for info in pkgutil.walk_packages(path, prefix=f"{root}.", onerror=names.add):
            names.add(info.name)
    return sorted(names - {"m2convert.__main__"})  # importing __main__ runs the command line


def collect() -> list:
    """One pytest param per docstring with examples; a module that fails to import (or whose docstrings
    do not parse) is a param that fails."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    params = []
    for name in module_names():
        try:
            # The finder keeps to objects defined in the module, so a re-exported function is tested once.
            tests = finder.find(importlib.import_module(name), name)
        except Exception as exc:  # noqa: BLE001  an import or docstring parse failure: reported by the test
            params.append(pytest.param(name, exc, id=f"collect {name}"))
            continue
        params += [pytest.param(name, test, id=test.name) for test in tests if test.examples]
    return params


EXAMPLES = collect()


def test_examples_were_found():
    assert len(EXAMPLES) > 30


@pytest.mark.parametrize("module, example", EXAMPLES)
def test_docstring_example(module, example, tmp_path, monkeypatch):
    if isinstance(example, Exception):
        pytest.fail(f"{module}: its examples cannot be collected: {type(example).__name__}: {example}",
                    pytrace=False)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    example.globs = {**NAMESPACE, "m2": importlib.import_module("m2convert"), **example.globs}
    torch.manual_seed(0)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(example, out=report.append, clear_globs=True)
    if result.failed:
        pytest.fail("".join(report), pytrace=False)
