"""The documentation's examples run as written: every ```python block of README.md and each docs/*.md page, in order, in
one namespace per page (like a notebook), in a scratch directory. Relative links point at files that exist
(a benchmark report, at the script that writes it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a markdown page, in order."""
    return BLOCK.findall(page.read_text(encoding="utf-8"))


def test_every_capability_has_a_page_with_an_example():
    names = {p.stem for p in PAGES}
    for capability in ("convert", "diff", "recover", "lower", "export", "bench"):
        assert capability in names
        assert python_blocks(DOCS / f"{capability}.md"), f"docs/{capability}.md has no python example"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.stem)
def test_page_examples_run(page, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    torch.manual_seed(0)
    for i, source in enumerate(python_blocks(page)):
        code = compile(source, f"{page.name} (python block {i + 1})", "exec")
        exec(code, namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_relative_links_resolve(page):
    # A benchmark report counts as present when the script that writes it is there.
    def present(target: str) -> bool:
        path = (page.parent / target).resolve()
        script = path.parent.parent / f"{path.stem}.py"
        return path.exists() or (path.parent.name == "results" and path.suffix == ".md" and script.exists())

    text = page.read_text(encoding="utf-8")
    missing = [t for t in LINK.findall(text) if "://" not in t and not present(t)]
    assert not missing, f"{page.name} links to missing files: {missing}"
