"""The package's shape, read from the source with ``ast`` (nothing is imported).

Layers, lowest first; a module may import its own rank or lower, never higher:

    0  m2convert.kernels.*                     Triton kernels and their PyTorch references
    1  m2convert.errors, .config, .hf          the foundation every layer may use
    2  m2convert.layers.*                      plain nn.Modules
    3  m2convert.passes.*                      capture, match, plan, apply, lower
    4  m2convert.recover.*, .data.*, .export, .serialize, .bench*, any other module
    5  m2convert.api                           the Python entry points
    6  m2convert.cli, .demo, .__main__, m2convert (the package __init__)

The kernels import nothing of m2convert outside m2convert.kernels; no two modules import each other
through any chain (file- or function-level imports alike; a package's ``__init__`` importing its own
submodules does not count); passes/ imports m2convert code only by absolute ``from m2convert...``.

Size: a source file holds at most 400 lines; a function at most 60 besides its docstring, unless a comment starting with
``# long:`` says why, on the line above its ``def`` (above its decorators, if any) or among its first
body lines (anywhere before the first statement that follows its docstring).

Files map to module names through pyproject.toml's ``[tool.setuptools.package-dir]``
(``passes/lower.py`` -> ``m2convert.passes.lower``). Every assertion lists all its offenders.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_MARK = re.compile(r"^\s*# long:\s*\S")

# (rank, module-name pattern), first match wins; a name matching none of these is rank 4.
RANKS = [
    (0, r"m2convert\.kernels(\..*)?"),
    (1, r"m2convert\.(errors|config|hf)"),
    (2, r"m2convert\.layers(\..*)?"),
    (3, r"m2convert\.passes(\..*)?"),
    (4, r"m2convert\.(recover|data|export)(\..*)?|m2convert\.(serialize|bench\w*)"),
    (5, r"m2convert\.api"),
    (6, r"m2convert(\.(cli(\..*)?|demo|__main__))?"),
]
OTHER_RANK = 4


@dataclass(frozen=True)
class Import:
    importer: str  # module name of the file holding the import
    target: str  # the m2convert module it names (the nearest module for `from M import name`)
    path: str  # file, relative to the repository root
    line: int
    relative: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _fail_listing(what: str, offenders: list[str]) -> None:
    if offenders:
        pytest.fail("\n  ".join([what, *sorted(offenders)]), pytrace=False)


def rank(module: str) -> int:
    return next((r for r, pattern in RANKS if re.fullmatch(pattern, module)), OTHER_RANK)


@cache
def modules() -> dict[str, Path]:
    """Module name -> source file, for every .py file of the installed package."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    found: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def is_package(module: str) -> bool:
    return modules()[module].name == "__init__.py"


def nearest_module(name: str) -> str | None:
    """The longest prefix of a dotted name that is an m2convert module (None outside m2convert)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules():
            return ".".join(parts)
        parts.pop()
    return None


@cache
def trees() -> dict[str, ast.Module]:
    return {m: ast.parse(p.read_text(), filename=str(p)) for m, p in modules().items()}


def targets(package: str, node: ast.AST) -> list[str]:
    """The m2convert modules an import statement names, read from inside ``package``."""
    if isinstance(node, ast.Import):
        names = [(a.name, None) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        names = [(source, a.name) for a in node.names]
    else:
        return []
    # `from P import X` names the submodule P.X when there is one, else P itself.
    found = [nearest_module(f"{s}.{n}" if n and f"{s}.{n}" in modules() else s) for s, n in names]
    return [t for t in found if t is not None]


def imports_of(module: str) -> list[Import]:
    """Every import of m2convert code in a module, at file level or inside functions."""
    path = str(modules()[module].relative_to(ROOT))
    package = module if is_package(module) else module.rpartition(".")[0]
    return [Import(module, target, path, node.lineno, bool(getattr(node, "level", 0)))
            for node in ast.walk(trees()[module]) for target in targets(package, node)]


@cache
def all_imports() -> list[Import]:
    return [imp for m in modules() for imp in imports_of(m)]


def test_the_module_map_covers_every_layer():
    names = set(modules())
    for expected in ["m2convert", "m2convert.api", "m2convert.passes.lower", "m2convert.kernels.ops",
                     "m2convert.layers.monarch", "m2convert.kernels.monarch.reference"]:
        assert expected in names
    assert {rank(m) for m in names} == set(range(7))
    assert rank("m2convert.kernels") == 0 and rank("m2convert.bench_report") == 4
    assert rank("m2convert.layers") == 2 and rank("m2convert") == 6


def test_import_resolution_handles_relative_and_package_imports():
    source = ("from ..api import plan\nfrom . import monarch\nimport m2convert.kernels.ops\n"
              "from m2convert import errors, convert\nfrom m2convert.layers.monarch import MonarchLinear\n"
              "import torch\n")
    found = [t for node in ast.parse(source).body for t in targets("m2convert.layers", node)]
    assert found == ["m2convert.api", "m2convert.layers.monarch", "m2convert.kernels.ops", "m2convert.errors",
                     "m2convert", "m2convert.layers.monarch"]
    assert [rank(t) for t in found] == [5, 2, 0, 1, 6, 2]
    by_file = {(i.importer, i.target) for i in all_imports()}
    assert ("m2convert.__main__", "m2convert.cli") in by_file                 # `from .cli import main`


def test_kernels_import_only_kernels():
    bad = [f"{i.where()}: {i.importer} imports {i.target}" for i in all_imports()
           if rank(i.importer) == 0 and rank(i.target) != 0]
    _fail_listing("the kernels import m2convert code outside m2convert.kernels:", bad)


def test_no_module_imports_a_higher_layer():
    bad = [f"{i.where()}: {i.importer} (layer {rank(i.importer)}) imports {i.target} (layer {rank(i.target)})"
           for i in all_imports() if rank(i.target) > rank(i.importer)]
    _fail_listing("imports against the layer order (see this file's docstring):", bad)


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for i in all_imports():
        own_submodule = is_package(i.importer) and i.target.startswith(i.importer + ".")
        if i.target != i.importer and not own_submodule and not graph.has_edge(i.importer, i.target):
            graph.add_edge(i.importer, i.target, where=i.where())
    return graph


def test_no_import_cycles():
    graph = import_graph()
    cycles = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            cycle = nx.find_cycle(graph.subgraph(component))
            cycles.append(" -> ".join(f"{a} ({graph.edges[a, b]['where']})" for a, b in cycle)
                          + f" -> {cycle[0][0]}")
    _fail_listing("import cycles (each module imports the next, at the line shown):", cycles)


def test_passes_import_m2convert_code_absolutely():
    bad = [f"{i.where()}: relative import of {i.target}" for i in all_imports()
           if i.relative and rank(i.importer) == 3]
    _fail_listing("passes/ must import m2convert code as `from m2convert...`:", bad)


def test_source_files_stay_short():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    _fail_listing(f"files over {MAX_FILE_LINES} lines (split each by idea):", long)


def _says_why_long(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    top = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
    body = fn.body
    has_docstring = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
    first = body[1] if has_docstring and len(body) > 1 else body[0]
    candidates = lines[top - 2:top - 1] + lines[fn.lineno - 1:first.lineno]
    return any(LONG_MARK.match(line) for line in candidates)


def test_a_long_comment_is_read_above_the_def_or_at_the_top_of_the_body():
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    sources = {
        "above": f"# long: one table of cases\ndef f():\n{body}\n",
        "above decorators": f"# long: one table of cases\n@cache\ndef f():\n{body}\n",
        "after docstring": f'def f():\n    """Doc."""\n    # long: one table of cases\n{body}\n',
        "none": f"def f():\n{body}\n",
        "too late": f"def f():\n{body}\n    # long: one table of cases\n",
    }
    said = {name: _says_why_long(ast.parse(src).body[0], src.splitlines()) for name, src in sources.items()}
    assert said == {"above": True, "above decorators": True, "after docstring": True, "none": False,
                    "too late": False}


def _docstring_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the function's docstring (its examples do not make the code long)."""
    first = fn.body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    return first.end_lineno - first.lineno + 1 if is_doc else 0


def test_functions_stay_short_or_say_why():
    long = []
    for module, tree in trees().items():
        lines = modules()[module].read_text().splitlines()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = fn.end_lineno - fn.lineno + 1 - _docstring_lines(fn)
                if n > MAX_FUNCTION_LINES and not _says_why_long(fn, lines):
                    long.append(f"{modules()[module].relative_to(ROOT)}:{fn.lineno} {fn.name} ({n} lines)")
    _fail_listing(f"functions over {MAX_FUNCTION_LINES} lines without a `# long: why` comment:", long)
