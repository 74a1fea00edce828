"""distributed="fsdp": a 2-process gloo torchrun run matches DDP, its ranks agree, and it resumes exactly.

One torchrun launch (module fixture) runs, on each rank: DDP, FSDP, FSDP killed after task step 3,
FSDP resumed from that kill, and FSDP on a GPT-2 with tied embeddings; the tests compare what the
ranks wrote.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m2convert.errors import ConfigError
from m2convert.recover import DistillConfig, StageConfig, distill
from m2convert.recover.fsdp import shard_units
from test_recover_common import (class_batches, convert_bert, convert_gpt2, one_thread, torchrun_two_ranks,  # noqa: F401
                                 tiny_bert, tiny_gpt2)

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from m2convert.recover import DistillConfig, StageConfig, distill
    from test_recover_common import class_batches, convert_bert, convert_gpt2, lm_batches, tiny_bert, tiny_gpt2

    class Killed(Exception):
        pass

    dist.init_process_group("gloo")                  # distill joins this group and leaves it open
    rank = dist.get_rank()
    out = {out!r}

    def run(name, mode, resume=False, on_step=None, bump=False):
        teacher = tiny_bert()
        torch.manual_seed(100 + rank)                # ranks start from different weights: rank 0's must win
        student = convert_bert(teacher)
        if bump:
            with torch.no_grad():
                for p in student.parameters():
                    p.add_(1.0)                      # the checkpoint must overwrite these
        cfg = DistillConfig(stages=[StageConfig("transfer", steps=4, lr=3e-3),
                                    StageConfig("task", steps=4, lr=1e-3, kd_weight=1.0, grad_clip=0.5)],
                            checkpoint_dir=os.path.join(out, name), checkpoint_every=2, seed=3,
                            distributed=mode, resume=resume, progress=False)
        result = distill(student, teacher, class_batches(8), cfg, on_step=on_step)
        plain = all(type(p) is torch.nn.Parameter and type(p.data) is torch.Tensor for p in student.parameters())
        save_file({{k: v.contiguous() for k, v in student.state_dict().items()}},
                  os.path.join(out, f"{{name}}-rank{{rank}}.safetensors"))
        if rank == 0 and name == "fsdp":
            student.save_pretrained(os.path.join(out, "pretrained"))
        json.dump({{"world": result.world_size, "plain": plain, "cls": type(student).__name__,
                   "losses": [s.losses for s in result.stages], "tokens": [s.tokens for s in result.stages]}},
                  open(os.path.join(out, f"{{name}}-rank{{rank}}.json"), "w"))

    def kill(stage, step, loss):
        if (stage, step) == ("task", 3):
            raise Killed()

    run("ddp", "ddp")
    run("fsdp", "fsdp")
    try:
        run("killed", "fsdp", on_step=kill)
    except Killed:
        pass
    run("killed", "fsdp", resume=True, bump=True)

    teacher = tiny_gpt2()
    torch.manual_seed(100 + rank)
    student = convert_gpt2(teacher)
    cfg = DistillConfig(stages=[StageConfig("transfer", steps=2, lr=3e-3), StageConfig("kd", steps=2)],
                        checkpoint_dir=os.path.join(out, "lm"), checkpoint_every=1, distributed="fsdp", progress=False)
    result = distill(student, teacher, lm_batches(4), cfg)
    save_file({{"wte": student.transformer.wte.weight.detach().contiguous()}},
              os.path.join(out, f"lm-rank{{rank}}.safetensors"))
    json.dump({{"tied": student.lm_head.weight is student.transformer.wte.weight,
               "losses": [s.losses for s in result.stages]}}, open(os.path.join(out, f"lm-rank{{rank}}.json"), "w"))
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    tests = str(Path(__file__).resolve().parent)
    script = out / "worker.py"
    script.write_text(WORKER.format(tests=tests, out=str(out)))
    torchrun_two_ranks(script)
    return out


def _read(out: Path, name: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    return (json.loads((out / f"{name}-rank{rank}.json").read_text()),
            load_file(str(out / f"{name}-rank{rank}.safetensors")))


def test_fsdp_ranks_agree_and_match_ddp(runs):
    (m0, w0), (m1, w1) = _read(runs, "fsdp", 0), _read(runs, "fsdp", 1)
    ddp_meta, ddp = _read(runs, "ddp", 0)
    assert m0["world"] == m1["world"] == 2
    assert m0["plain"] and m1["plain"] and m0["cls"] == "BertForSequenceClassification"
    assert w0.keys() == w1.keys() == ddp.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)                   # every rank ends with the full weights
    assert m0["losses"] == m1["losses"] and m0["tokens"] == ddp_meta["tokens"]
    transfer = m0["losses"][0]
    assert transfer[-1] < transfer[0]
    # Same global batch, same gradient average, same AdamW: only the grad-clip norm, summed from
    # shards instead of whole tensors, rounds differently.
    for k in ddp:
        torch.testing.assert_close(w0[k], ddp[k], rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(m0["losses"], ddp_meta["losses"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    latest = runs / "fsdp" / "latest"
    assert sorted(p.name for p in latest.iterdir()) == sorted(p.name for p in (runs / "ddp" / "latest").iterdir())
    saved = load_file(str(latest / "model.safetensors"))
    assert all(torch.equal(saved[k], w0[k]) for k in saved)              # the final checkpoint is the full model
    assert sorted(load_file(str(latest / "optimizer.safetensors"))) == sorted(
        load_file(str(runs / "ddp" / "latest" / "optimizer.safetensors")))
    pretrained = load_file(str(runs / "pretrained" / "model.safetensors"))
    assert all(torch.equal(pretrained[k], w0[k]) for k in pretrained)     # save_pretrained works on the result


def test_fsdp_killed_and_resumed_ends_bit_equal(runs):
    full_meta, full = _read(runs, "fsdp", 0)
    for rank in (0, 1):
        meta, got = _read(runs, "killed", rank)
        assert got.keys() == full.keys()
        assert all(torch.equal(got[k], full[k]) for k in full)           # resharding copies, never rounds
        assert meta["losses"] == full_meta["losses"] and meta["tokens"] == full_meta["tokens"]


def test_fsdp_keeps_tied_embeddings_of_a_causal_lm(runs):
    (m0, w0), (m1, w1) = _read(runs, "lm", 0), _read(runs, "lm", 1)
    assert m0["tied"] and m1["tied"]
    assert torch.equal(w0["wte"], w1["wte"]) and m0["losses"] == m1["losses"]
    start = tiny_gpt2().transformer.wte.weight
    assert not torch.equal(w0["wte"], start)                              # the kd stage trained the embeddings


def test_shard_units_are_replaced_modules_then_their_blocks():
    bert = convert_bert(tiny_bert())
    assert shard_units(bert) == [f"bert.encoder.layer.{i}.{s}" for i in range(2)
                                 for s in ("attention.self", "intermediate.dense", "output.dense")] + [
        "bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert shard_units(convert_gpt2(tiny_gpt2()))[-2:] == ["transformer.h.0", "transformer.h.1"]


def _fsdp_config():
    return DistillConfig(stages=[StageConfig("kd", steps=1)], distributed="fsdp", progress=False)


def test_fsdp_without_torchrun_is_a_config_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    teacher = tiny_bert()
    with pytest.raises(ConfigError, match=r"distributed='fsdp' needs a torchrun launch.*distributed='none'"):
        distill(convert_bert(teacher), teacher, class_batches(1), _fsdp_config())


def test_fsdp_with_an_unreachable_group_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    teacher = tiny_bert()
    with pytest.raises(ConfigError, match=r"distributed='fsdp': cannot join the gloo process group"):
        distill(convert_bert(teacher), teacher, class_batches(1), _fsdp_config())


def test_fsdp_on_a_one_rank_group_is_a_config_error(monkeypatch):
    import torch.distributed as dist
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        teacher = tiny_bert()
        with pytest.raises(ConfigError, match="process group has 1"):
            distill(convert_bert(teacher), teacher, class_batches(1), _fsdp_config())
        assert dist.is_initialized()                                     # a group distill did not open stays open
    finally:
        dist.destroy_process_group()
