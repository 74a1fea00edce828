"""The in-context recall benchmark's task, curriculum and hybrid conversion (benchmarks/recall.py)."""

from __future__ import annotations

import pytest
import torch

import m2convert as m2


@pytest.fixture(scope="module")
def recall(benchmark_script):
    return benchmark_script("recall")


def test_mqar_answers_are_the_values_paired_with_the_query_keys(recall):
    args = recall.parse_args(["--seq-len", "64", "--pairs", "8", "--keys", "12", "--values", "10"])
    batch = recall.MQAR(args, seed=0, batch_size=16).batch(torch.Generator().manual_seed(3))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (16, 64) and args.queries == (64 - 16) // 2
    for seq, lab in zip(ids, labels):
        keys, values = seq[0:16:2], seq[1:16:2]
        assert len(set(keys.tolist())) == 8 and keys.min() >= 1 and keys.max() <= 12
        assert values.min() >= 13 and values.max() <= 22
        pairs = dict(zip(keys.tolist(), values.tolist()))
        answers = (lab != -100).nonzero().flatten()
        assert len(answers) == args.queries and (answers % 2 == 1).all() and (answers > 16).all()
        for pos in answers.tolist():
            assert lab[pos] == seq[pos] == pairs[seq[pos - 1].item()]


def test_curriculum_stage_is_an_easier_task_and_bad_stages_are_refused(recall):
    args = recall.parse_args([])
    stage = recall.easier(args, "64:4")
    assert (stage.seq_len, stage.pairs, stage.queries) == (64, 4, 28)
    assert (args.seq_len, args.pairs) == (256, 16)                      # the task itself untouched
    batch = recall.MQAR(stage, seed=1, batch_size=2).batch(torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (2, 64)
    for bad in ("512:4", "64:32", "16:8"):
        with pytest.raises(SystemExit, match="--curriculum stage"):
            recall.easier(args, bad)


def test_fit_stops_at_the_target_and_keeps_the_best_state(recall, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    args = recall.parse_args(["--smoke"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1 + args.keys + args.values, n_positions=args.seq_len,
                                       n_embd=16, n_layer=2, n_head=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data, held = recall.MQAR(args, seed=1), recall.eval_batches(args, seed=2)
    history, steps = recall.fit(model, opt, data, held, args, steps=60, target=0.0, label="t",
                                progress=recall.Progress(tmp_path / "a"))
    assert steps == args.eval_every and len(history) == 1            # target 0 is met at the first evaluation
    history, steps = recall.fit(model, opt, data, held, args, steps=2 * args.eval_every, target=1.1, label="u",
                                progress=recall.Progress(tmp_path / "a"))
    assert steps == 2 * args.eval_every and len(history) == 2
    assert recall.accuracy(model, held) == pytest.approx(max(h["held_out_acc"] for h in history))


def test_stopped_teacher_training_goes_on_from_its_last_evaluation(recall, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    args = recall.parse_args(["--smoke"])

    def fresh():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=1 + args.keys + args.values, n_positions=args.seq_len,
                                           n_embd=16, n_layer=2, n_head=1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    data, held = recall.MQAR(args, seed=1), recall.eval_batches(args, seed=2)
    model, opt = fresh()
    first, _ = recall.fit(model, opt, data, held, args, steps=args.eval_every, target=1.1, label="t",
                          progress=recall.Progress(tmp_path))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt = fresh()                                    # a new process: fresh weights, same folder
    history, steps = recall.fit(model, opt, data, held, args, steps=2 * args.eval_every, target=1.1, label="t",
                                progress=recall.Progress(tmp_path))
    assert steps == 2 * args.eval_every and history[0] == first[0] and len(history) == 2
    assert any(not torch.equal(saved[k], v) for k, v in model.state_dict().items())      # it trained on
    again, _ = recall.fit(*fresh(), data, held, args, steps=2 * args.eval_every, target=1.1, label="t",
                          progress=recall.Progress(tmp_path))
    assert again == history                                 # finished: nothing more to run


def test_hybrid_students_keep_the_named_attention_layers(recall):
    from transformers import GPT2Config, GPT2LMHeadModel
    args = recall.parse_args(["--smoke"])
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=3, n_head=2)).eval()
    student = recall.convert(teacher, args, keep=[1])
    mixers = sorted(p for p, m in student.named_modules() if isinstance(m, m2.M2SequenceMixer))
    assert [p.split(".")[2] for p in mixers] == ["0", "2"]


def test_grown_teacher_computes_what_the_smaller_one_did(recall):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=3, n_head=1)
    small = GPT2LMHeadModel(GPT2Config(**{**cfg.to_dict(), "n_layer": 2})).eval()
    grown = recall.grow(small, cfg).eval()
    assert len(grown.transformer.h) == 3
    ids = torch.randint(0, 40, (2, 20))
    torch.testing.assert_close(grown(input_ids=ids).logits, small(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert any(p.abs().sum() > 0 for p in grown.transformer.h[2].attn.c_attn.parameters())   # not all zero


def test_added_student_must_share_the_report_settings(recall, tmp_path):
    import json
    args = recall.parse_args(["--smoke", "--out", str(tmp_path), "--keep", "1"])
    config = {k: (str(v) if k == "out" else v) for k, v in vars(args).items() if k != "keep"}
    (tmp_path / "recall.json").write_text(json.dumps({"config": {**config, "state_size": 2}, "students": []}))
    with pytest.raises(SystemExit, match="other settings: state_size"):
        recall.add_student(None, args, [], [1])


def test_students_report_kept_heads_and_their_decode_state(recall):
    """The head hybrid's decode state is the full conversion's plus its kept head's keys and values."""
    from transformers import GPT2Config, GPT2LMHeadModel
    args = recall.parse_args(["--smoke"])
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=1 + args.keys + args.values, n_positions=args.seq_len,
                                         n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    test = recall.eval_batches(args, seed=3)[:1]
    full = recall.student_row(teacher, args, test, "full", budget={})
    head = recall.student_row(teacher, args, test, "head", budget={"keep_heads": 1 / 12, "selection": "uniform"})
    assert full["kept_heads"] == [] and len(head["kept_heads"]) == 1
    layer, h = head["kept_heads"][0]
    assert (layer, h) == (1, 2) and head["kept_attention_layers"] == []       # the middle of 12 heads
    assert head["state_bytes_512"] - full["state_bytes_512"] == 2 * 8 * args.seq_len * 4   # K, V of one 8-wide head
    assert head["decode_tokens_per_s"] > 0 and head["selection"] == "uniform"
    original = recall.state_bytes(teacher, args.seq_len)
    assert original == 3 * 2 * 32 * args.seq_len * 4                          # the teacher's KV cache
    doc = {"original_state_bytes_512": original, "teacher_acc": 1.0, "students": [full, head]}
    assert "no hybrid that small" in recall.target_line(doc)                   # 12,544 bytes > 49,152 / 8
    small = {**head, "state_bytes_512": original // 8, "recurrent_acc": 0.96}
    assert "best head" in recall.target_line({**doc, "students": [small]}) and "(met)" in recall.target_line(
        {**doc, "students": [small]})
