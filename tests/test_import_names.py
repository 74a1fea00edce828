"""One import name per folder: from the repository root, `kernels` is the installed distribution, `passes`
is not importable, and models build and convert there (python -c, a REPL and python -m pytest all put
the root first on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run from the root as `python -c` runs it: sys.path[0] == "" (the working directory).
AT_ROOT = textwrap.dedent("""
    import importlib.util, os, sys
    assert sys.path[0] == "", sys.path[:2]
    import kernels
    assert not os.path.abspath(kernels.__file__).startswith(os.path.join(os.getcwd(), "kernels")), kernels.__file__
    print("kernels from", kernels.__file__)
    for name in ("passes", "kernels.monarch", "passes.attention_patterns"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"{name} imported from the root: {sys.modules[name].__file__}")
    import torch, transformers
    import m2convert as m2
    import m2convert.passes.attention_patterns as patterns
    assert "passes.attention_patterns" not in sys.modules
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    converted = m2.convert(model, example_inputs={"input_ids": torch.randint(0, 64, (1, 16))})
    mixers = [m for m in converted.modules() if isinstance(m, m2.M2SequenceMixer)]
    assert len(mixers) == 1, mixers
    print("converted", type(converted).__name__)
""")


# A `kernels` distribution that transformers accepts (its version in transformers' range): every name
# transformers imports from it is a stub that hands back what it decorates.
STAND_IN = textwrap.dedent("""
    class _Stub:
        def __call__(self, *args, **kwargs):
            if len(args) == 1 and not kwargs and callable(args[0]):
                return args[0]
            return self
        def __getattr__(self, name):
            return self
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def __or__(self, other):
            return self
    STAND_IN = True
    def __getattr__(name):
        return _Stub()
""")


def _stand_in(site: Path) -> Path:
    """Install the stand-in `kernels` distribution into the site dir ``site``."""
    from transformers.utils import import_utils

    version = getattr(import_utils, "KERNELS_MIN_VERSION", "0.0.1")
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(STAND_IN)
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "top_level.txt").write_text("kernels\n")
    return site


@pytest.mark.parametrize("kernels_dist", ["installed", "stand-in"])
def test_root_first_on_sys_path_builds_and_converts(tmp_path, kernels_dist):
    """The installed `kernels` (the lock installs it with transformers); and, always, a stand-in in a
    temporary site dir before site-packages (the only run where no `kernels` is installed)."""
    from importlib import metadata

    env = dict(os.environ)
    try:
        metadata.version("kernels")
        where = "site-packages"
    except metadata.PackageNotFoundError:
        kernels_dist = "stand-in"
    if kernels_dist == "stand-in":
        # sys.path[0] stays the root ("" with -c); PYTHONPATH entries come after it, before site-packages.
        where = str(_stand_in(tmp_path / "site"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [where, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", AT_ROOT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    found = next(line for line in run.stdout.splitlines() if line.startswith("kernels from "))
    assert where in found, found
    assert "converted BertModel" in run.stdout


def _fake_tree(tmp_path: Path, name: str, other: bool) -> Path:
    """A root holding a folder `name` whose __init__ hands over, and (if other) a site dir with the real one."""
    root = tmp_path / "root"
    (root / name).mkdir(parents=True)
    helper = ROOT / "kernels" / "_toplevel.py"
    (root / name / "__init__.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("_toplevel_under_test", {str(helper)!r})
        helper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(helper)
        helper.hand_over(__name__, __file__)
    """))
    (root / name / "inner.py").write_text("X = 'root'\n")
    if other:
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text("WHERE = 'site'\n")
        (tmp_path / "site" / name / "inner.py").write_text("X = 'site'\n")
    return root


@pytest.mark.parametrize("other", [True, False])
def test_hand_over_gives_the_next_module_or_none(tmp_path, other):
    name = "m2convert_handover_probe"
    root = _fake_tree(tmp_path, name, other)
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(root)!r}, {str(tmp_path / 'site')!r}]
        try:
            import {name}, {name}.inner as inner
        except ModuleNotFoundError as exc:
            assert exc.name == {name!r}, exc.name
            assert "{name}" not in sys.modules
            print("absent:", exc)
        else:
            print({name}.WHERE, inner.X)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("site site" if other else "absent: No module named"), run.stdout


LIGHT = textwrap.dedent("""
    import contextlib, io, sys
    import m2convert, m2convert.cli
    assert "torch" not in sys.modules and "transformers" not in sys.modules, "import m2convert loaded torch"
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        m2convert.cli.main(["--help"])
    assert "convert" in out.getvalue() and "torch" not in sys.modules, "m2convert --help loaded torch"
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        m2convert.cli.main(["convert", "--help"])
    assert "--keep-heads" in out.getvalue() and "torch" not in sys.modules, "convert --help loaded torch"
    assert callable(m2convert.export) and m2convert.export.export_onnx.__name__ == "export_onnx"
    assert m2convert.convert.__module__ == "m2convert.api" and "torch" in sys.modules
    assert m2convert.layers.monarch.MonarchLinear is m2convert.MonarchLinear        # subpackages as attributes
    assert "m2convert.bench" not in sys.modules and m2convert.bench.__name__ == "m2convert.bench"
    try:
        m2convert.no_such_name
    except AttributeError as exc:
        assert "no attribute 'no_such_name'" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
    print("light")
""")


def test_import_and_help_do_not_load_torch():
    """``import m2convert`` and ``m2convert --help`` stay quick: the public names load on first use."""
    done = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, cwd=ROOT / "tests")
    assert done.returncode == 0 and done.stdout.strip().endswith("light"), done.stderr[-2000:]
