"""Every script in examples/ runs at its smoke budget (``--smoke``) in a fresh interpreter, offline, and prints
the lines that show its result. The scripts run two at a time, one thread each (two cores)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NUMBER = r"(-?\d+\.\d+(?:e[-+]\d+)?)"
# Script -> the lines its output must have; a number captured by a pattern must be within the bound given.
EXPECTED: dict[str, list[tuple[str, float | None]]] = {
    "01_convert_and_diff.py": [(r"converted: BertModel", None),
                               (r"18 module\(s\) replaced", None),
                               (rf"embedding cosine to the teacher before recovery: {NUMBER} over 2 sentences", None)],
    "02_recover_on_sample.py": [(rf"transfer: 2 steps, loss {NUMBER} -> ", None),
                                (r"embedding cosine to the teacher on 8 held-out sentences: ", None)],
    "03_decoder_generate.py": [(r"converted: GPT2LMHeadModel", None),
                               (r"same tokens with and without the cache: True", None)],
    "04_lower_and_export.py": [(r"lowering: 8 sites fused, 0 left unfused", None),
                               (rf"lowered vs eager: max \|diff\| {NUMBER}", 1e-4),
                               (rf"bert-m2\.pt2: ran without m2convert, max \|diff\| {NUMBER}", 1e-4),
                               (rf"bert-m2-fused\.pt2: ran with m2convert, max \|diff\| {NUMBER}", 1e-4)],
    "05_vit.py": [(r"test accuracy on 447 images: teacher ", None)],
    "06_sentence_transformers.py": [(r"converted: SentenceTransformer around BertModel", None),
                                    (r"embedding cosine to the teacher on 8 held-out sentences: ", None),
                                    (r"closest to '", None), (r"  student: '", None)],
    "07_onnx.py": [(r"minilm-m2: wrote minilm-m2\.onnx", None),
                   (rf"minilm-m2: ONNX Runtime vs PyTorch over 2 shapes, max \|diff\| {NUMBER}", 1e-4),
                   (rf"gpt2-m2: ONNX Runtime vs PyTorch over 2 shapes, max \|diff\| {NUMBER}", 1e-4)],
}

SLOWEST = ("01_convert_and_diff.py", "02_recover_on_sample.py", "04_lower_and_export.py")


def test_every_example_is_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


def _run(script: str, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict:
    """The selected scripts' runs, two at a time (the scripts this session's tests ask for)."""
    wanted = {item.callspec.params["script"] for item in request.session.items
              if item.module is request.module and "script" in getattr(getattr(item, "callspec", None), "params", {})}
    with ThreadPoolExecutor(max_workers=2) as pool:                      # the slowest first
        futures = {s: pool.submit(_run, s, tmp_path_factory.mktemp(s.split("_")[0]))
                   for s in sorted(wanted, key=lambda s: (s not in SLOWEST, s))}
        return {s: f.result() for s, f in futures.items()}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs_at_its_smoke_budget(script, runs):
    run = runs[script]
    assert run.returncode == 0, run.stderr[-3000:]
    for pattern, bound in EXPECTED[script]:
        found = re.search(pattern, run.stdout)
        assert found, f"{script} printed no line matching {pattern!r}:\n{run.stdout[-2000:]}"
        if bound is not None:
            assert abs(float(found.group(1))) <= bound, found.group(0)
