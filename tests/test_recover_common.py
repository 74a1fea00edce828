"""Tiny random-weight teachers and hand-converted students shared by the recovery tests.

Students are built by hand, as m2convert.convert would: MLP linears become MonarchLinear at the
same path; attention's core (``attention.self``) becomes an adapter around M2SequenceMixer with the
Hugging Face attention signature.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from m2convert.layers import M2Block, M2SequenceMixer, MonarchLinear
from m2convert.recover import replaced_modules

VOCAB = 64


class MixerAttention(M2Block):
    """HF self-attention signature around an M2SequenceMixer: forward(hidden, attention_mask, ...)."""

    def __init__(self, d_model: int, mode: str):
        super().__init__()
        self.mixer = M2SequenceMixer(d_model, mode=mode, filter_order=16)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            row = attention_mask[:, 0, -1, :]                                  # (B, N) of the last query
            mask = row if row.dtype == torch.bool else (row == 0)
        return self.mixer(hidden_states, mask), None


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny models run faster that way, and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_bert(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def convert_bert(teacher, attention: bool = True, mlp: bool = True):
    """A deep copy of a tiny BERT with its MLP linears Monarch (nblocks 2) and its attention M2."""
    student = copy.deepcopy(teacher)
    for layer in student.bert.encoder.layer:
        if mlp:
            layer.intermediate.dense = MonarchLinear.from_dense(layer.intermediate.dense, nblocks=2)
            layer.output.dense = MonarchLinear.from_dense(layer.output.dense, nblocks=2)
        if attention:
            layer.attention.self = MixerAttention(32, "bidirectional")
    return student


def convert_gpt2(teacher):
    """A deep copy of a tiny GPT-2 whose attention blocks are causal M2 mixers."""
    student = copy.deepcopy(teacher)
    for block in student.transformer.h:
        block.attn = MixerAttention(32, "causal")
    return student


def class_batches(n: int = 8, batch: int = 8, seq: int = 12, seed: int = 0) -> list[dict]:
    """Classification batches with some padding (label = whether token 5 occurs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        labels = ((ids == 5).any(1) | (ids < 10).sum(1).gt(1)).long()
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": labels})
    return out


def lm_batches(n: int = 8, batch: int = 4, seq: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_convert_bert_puts_m2_blocks_at_the_original_paths():
    teacher = tiny_bert()
    student = convert_bert(teacher)
    paths = [p for p, _ in replaced_modules(student)]
    assert paths == [f"bert.encoder.layer.{i}.{s}" for i in range(2)
                     for s in ("attention.self", "intermediate.dense", "output.dense")]
    out = student(**class_batches(1)[0])
    assert torch.isfinite(out.logits).all()


def torchrun_two_ranks(script: Path, timeout: float = 300) -> None:
    """Run ``script`` as 2 gloo ranks under ``torchrun --standalone`` (one thread each, tests/ importable);
    asserts a clean exit and never leaves the workers behind."""
    import os
    import signal
    import subprocess
    import sys
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
