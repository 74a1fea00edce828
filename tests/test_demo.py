"""The demo end to end on the bundled all-MiniLM-L6-v2 and the sample text installed with the package, with a
tiny budget, in a fresh interpreter that may not read the shared data folder (as on a fresh clone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from m2convert.data.readers import sample_data_dir

ROOT = Path(__file__).resolve().parents[1]

# Every file under ../shared (where the shared data folder lies beside a checkout) is refused; the budget is
# cut to about a minute.
RUN_DEMO = """
import json, os, sys
hidden = os.path.abspath(sys.argv[1])

def refuse(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.abspath(os.fsdecode(args[0])).startswith(hidden):
            raise PermissionError(f"the demo read the shared data folder: {args[0]}")

sys.addaudithook(refuse)
import torch
torch.set_num_threads(1)              # two threads on two shared cores crawl
from m2convert.demo import run_demo
out = run_demo(steps=4, eval_sentences=16, seed_batches=2, seed_steps=50, speed_seq_len=128)
print("RESULT " + json.dumps(out))
"""


def test_demo_runs_without_the_shared_data_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "M2CONVERT_DATA"}
    env["HF_HUB_OFFLINE"] = "1"
    run = subprocess.run([sys.executable, "-c", RUN_DEMO, str(ROOT.parent / "shared")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "16 held-out WikiText-2 test sentences" in run.stdout
    out = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["student_params"] < out["teacher_params"]
    # Converted embeddings start far from the teacher's; seeding and a few transfer steps move them closer.
    assert out["cosine_before"] < out["cosine_seeded"] < out["cosine_after"], out
    assert out["tokens_per_ms"]["converted"] > 0 and out["tokens_per_ms"]["original"] > 0


def test_the_sample_is_small_licensed_and_installed_with_the_package():
    files = sorted(p for p in sample_data_dir().iterdir() if p.is_file())
    assert {p.name for p in files} == {"README.md", "wikitext2-valid-sentences.txt", "wikitext2-test-sentences.txt"}
    assert sum(p.stat().st_size for p in files) < 2 * 2**20
    readme = (sample_data_dir() / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in readme and "Merity" in readme
    with open(ROOT / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["m2convert.data"]
    assert all(any(p.relative_to(sample_data_dir().parent).match(g) for g in globs) for p in files)
    train, held_out = ((sample_data_dir() / f"wikitext2-{s}-sentences.txt").read_text(encoding="utf-8").splitlines()
                       for s in ("valid", "test"))
    assert len(held_out) == 1000 and len(train) > 2000 and not set(train) & set(held_out)
