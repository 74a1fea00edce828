"""The committed lock (constraints.txt) pins every dependency exactly, torch at the Makefile's version, and
the README's tested versions are the lock's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), f"not an exact pin: {line!r}"
        name, version = line.split("==")
        pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_pins_every_dependency_exactly():
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    lock = _lock()
    missing = sorted({_name(r) for r in wanted} - set(lock))
    assert not missing, f"constraints.txt has no pin for {missing}; run make lock"
    torch = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert lock["torch"] == torch


def test_readme_names_the_locked_versions():
    readme = (ROOT / "README.md").read_text()
    tested = readme[readme.index("Tested with"):].split("\n\n")[0]
    pairs = re.findall(r"([a-z][a-z0-9\-]*) (\d[\w.+]*?)[,.]?(?=\s|$)", tested.split(":", 1)[1])
    assert len(pairs) >= 5, tested
    lock = _lock()
    wrong = {name: (version, lock.get(name)) for name, version in pairs if lock.get(name) != version}
    assert not wrong, f"README's tested versions differ from constraints.txt (README, lock): {wrong}"
