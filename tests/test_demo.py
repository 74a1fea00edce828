"""The demo end to end on the bundled all-MiniLM-L6-v2 and the shared SST-2 sentences, with a tiny budget."""

import pytest

from m2convert.data import default_data_dir
from m2convert.demo import run_demo


@pytest.mark.skipif(not (default_data_dir() / "sst2" / "dev.tsv").exists(), reason="shared data folder absent")
def test_demo_seeds_and_recovers_towards_the_teacher():
    out = run_demo(steps=6, eval_sentences=16, seed_batches=2)
    assert out["student_params"] < out["teacher_params"]
    # Converted embeddings start far from the teacher's; seeding and a few transfer steps move them closer.
    assert out["cosine_before"] < out["cosine_seeded"] < out["cosine_after"], out
    assert out["tokens_per_ms"]["converted"] > 0 and out["tokens_per_ms"]["original"] > 0
