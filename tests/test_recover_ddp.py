"""A 2-process gloo torchrun run of distill works, and its ranks end with identical weights."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from m2convert.errors import ConfigError
from m2convert.recover import DistillConfig, StageConfig, distill
from test_recover_common import (class_batches, convert_bert, one_thread, tiny_bert,  # noqa: F401
                                 torchrun_two_ranks)

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from m2convert.recover import DistillConfig, StageConfig, distill
    from test_recover_common import class_batches, convert_bert, tiny_bert

    import torch.distributed as dist
    dist.init_process_group("gloo")            # distill joins this group and leaves it open for the second run
    rank = int(os.environ["RANK"])
    for name, layerwise in (("", False), ("-layerwise", True)):
        teacher = tiny_bert()
        torch.manual_seed(100 + rank)              # ranks start from different weights: DDP must sync them
        student = convert_bert(teacher)
        cfg = DistillConfig(stages=[StageConfig("transfer", steps=3, lr=3e-3, layerwise=layerwise),
                                    StageConfig("task", steps=3, kd_weight=1.0)],
                            checkpoint_dir={ckpt!r} + name, progress=False)
        result = distill(student, teacher, class_batches(8), cfg)
        digest = hashlib.sha256()
        for k, v in sorted(student.state_dict().items()):
            digest.update(k.encode()); digest.update(v.detach().contiguous().numpy().tobytes())
        json.dump({{"world": result.world_size, "digest": digest.hexdigest(),
                   "losses": [s.losses for s in result.stages], "tokens": [s.tokens for s in result.stages]}},
                  open(os.path.join({out!r}, f"rank{{rank}}{{name}}.json"), "w"))
    dist.destroy_process_group()
""")


def test_two_process_gloo_run_ranks_agree(tmp_path):
    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=tests, ckpt=str(tmp_path / "ckpt"), out=str(tmp_path)))
    torchrun_two_ranks(script)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"]
    assert r0["losses"] == r1["losses"] and all(len(ls) == 3 for ls in r0["losses"])
    one_rank_tokens = sum(int(b["attention_mask"].sum()) for b in class_batches(8)[:6:2])
    assert r0["tokens"][0] > one_rank_tokens                      # both ranks' tokens are counted
    assert sorted(p.name for p in (tmp_path / "ckpt" / "latest").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors", "rng-rank1.safetensors",
        "state.json"]
    # Layerwise transfer runs outside DDP and averages the gradients itself: the ranks agree, and the
    # losses are the all-at-once run's to float rounding.
    l0, l1 = (json.loads((tmp_path / f"rank{r}-layerwise.json").read_text()) for r in (0, 1))
    assert l0["digest"] == l1["digest"] and l0["losses"] == l1["losses"]
    for a, b in zip(l0["losses"], r0["losses"]):
        assert a == pytest.approx(b, rel=1e-4)


def test_ddp_without_torchrun_is_a_config_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    teacher = tiny_bert()
    with pytest.raises(ConfigError, match="torchrun"):
        distill(convert_bert(teacher), teacher, class_batches(1),
                DistillConfig(stages=[StageConfig("kd", steps=1)], distributed="ddp", progress=False))
