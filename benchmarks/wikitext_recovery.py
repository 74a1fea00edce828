"""WikiText-2 recovery: a small GPT-2-style LM converted to causal M2 mixers and recovered.

WikiText-2's train split is not in the data folder, so the teacher trains on ``valid.txt`` for a
fixed budget and everything is evaluated on ``test.txt``:

    1. tokenizer: byte-level BPE (8,192 tokens) trained on valid.txt          (cached)
    2. teacher: GPT-2 architecture, ~11M parameters, trained on valid.txt   (cached per size)
    3. convert: attention -> causal M2 sequence mixers (m2convert.convert)
    4. recover on valid.txt: layer-wise transfer, then KD (+ LM loss)
    5. test perplexity (non-overlapping blocks of 128 tokens) of teacher, converted, each stage

Run:   python benchmarks/wikitext_recovery.py --task-weight 0    (the committed report: KD only)
       python benchmarks/wikitext_recovery.py                    (KD + 0.5 x LM loss, its variant)
       python benchmarks/wikitext_recovery.py --smoke            (a couple of minutes; writes to runs/bench_smoke/)
       python benchmarks/common.py wikitext_recovery OTHER.json LABEL; then --render   (add a variant)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Clock, cache_dir, count_params, log, markdown_table, progress_logger, stage_rows,  # noqa: E402
                    write_markdown, write_report)

import m2convert as m2  # noqa: E402
from m2convert.data import default_data_dir, load_data, pack_text  # noqa: E402
from m2convert.recover import DistillConfig, StageConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="folder with wikitext2/{valid,test}.txt")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-only", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--name", default="wikitext_recovery")
    p.add_argument("--render", action="store_true", help="only rebuild the markdown from the JSON report")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--n-embd", type=int, default=320)
    p.add_argument("--n-layer", type=int, default=7)
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--causal-mode", default="causal")
    p.add_argument("--dimension", action="store_true", help="also convert the MLPs to Monarch")
    p.add_argument("--nblocks", type=int, default=4)
    p.add_argument("--filter-order", type=int, default=64)
    p.add_argument("--transfer-steps", type=int, default=150)
    p.add_argument("--transfer-lr", type=float, default=1e-3)
    p.add_argument("--task-steps", type=int, default=300)
    p.add_argument("--task-lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--task-weight", type=float, default=0.5)
    p.add_argument("--save-student", type=Path, default=None,
                   help="also save the recovered student (m2convert folder + tokenizer) here, for later benchmarks")
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab, args.n_embd, args.n_layer = 1024, 64, 2
        args.teacher_steps, args.transfer_steps, args.task_steps = 20, 5, 5
        args.out = args.out or Path(__file__).resolve().parents[1] / "runs" / "bench_smoke"
    return args


def get_tokenizer(args, valid: Path, folder: Path):
    """Byte-level BPE trained on valid.txt, wrapped as a transformers fast tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(valid)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping (num_blocks, block) id blocks."""
    was = model.training
    model.eval()
    nll = count = 0.0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1]                          # (B, N-1, V)
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was)
    return math.exp(nll / count)


def train_teacher(args, tokenizer, valid: Path, test_blocks, folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel
    info_file = folder / "teacher.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        log(f"teacher from cache {folder}: test ppl {info['test_ppl']:.2f}")
        return GPT2LMHeadModel.from_pretrained(folder).eval(), info
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=max(256, args.block), n_embd=args.n_embd,
                     n_layer=args.n_layer, n_head=8 if args.n_embd % 8 == 0 else 4,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.1, betas=(0.9, 0.95))
    src = load_data(valid, tokenizer, batch_size=args.batch_size, block_size=args.block, seed=4321)
    clock = Clock()
    model.train()
    warm = max(1, args.teacher_steps // 20)
    for step in range(args.teacher_steps):
        frac = max(0.0, (step - warm) / max(1, args.teacher_steps - warm))
        for g in opt.param_groups:
            g["lr"] = args.teacher_lr * (min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = model(**src.batch(step)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"teacher step {step + 1}: loss {loss.item():.3f} ({clock.total / 60:.1f} min)")
    model.eval()
    info = {"test_ppl": perplexity(model, test_blocks), "steps": args.teacher_steps, "seconds": clock.total,
            "tokens": args.teacher_steps * args.batch_size * args.block, "lr": args.teacher_lr,
            "epochs_of_valid": args.teacher_steps / src.per_epoch, "schedule": "warmup + cosine",
            "config": cfg.to_dict()}
    model.save_pretrained(folder)
    info_file.write_text(json.dumps(info, indent=2))
    return model, info


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return {"markdown": str(write_markdown(args.name, render, args.out))}
    torch.set_num_threads(args.threads)
    data = args.data or default_data_dir()
    valid, test = data / "wikitext2" / "valid.txt", data / "wikitext2" / "test.txt"
    folder = cache_dir("wikitext_teacher_smoke" if args.smoke
                       else f"wikitext_teacher_e{args.n_embd}_l{args.n_layer}_v{args.vocab}_s{args.teacher_steps}")
    tokenizer = get_tokenizer(args, valid, folder)
    test_blocks, _ = pack_text(test, tokenizer, args.block, on_bad="raise")
    if args.smoke:
        test_blocks = test_blocks[:32]
    teacher, tinfo = train_teacher(args, tokenizer, valid, test_blocks, folder)
    teacher_ppl = tinfo["test_ppl"]                                     # measured on the same blocks
    log(f"teacher test ppl {teacher_ppl:.2f}, {count_params(teacher):,} params")
    if args.teacher_only:
        return {"teacher_test_ppl": teacher_ppl}

    clock = Clock()
    torch.manual_seed(0)                                                # filter initialisation
    student = m2.convert(teacher, m2.ConvertConfig(sequence=True, dimension=args.dimension, nblocks=args.nblocks,
                                                   causal_mode=args.causal_mode, filter_order=args.filter_order))
    clock.lap("convert")
    converted_ppl = perplexity(student, test_blocks)
    log(f"converted (no recovery) test ppl {converted_ppl:.2f}, {count_params(student):,} params")
    stages = [StageConfig("transfer", steps=args.transfer_steps, lr=args.transfer_lr),
              StageConfig("task", steps=args.task_steps, lr=args.task_lr, kd_weight=args.kd_weight,
                          task_weight=args.task_weight, temperature=args.temperature, schedule="cosine",
                          warmup_steps=min(50, args.task_steps // 10))]
    stage_out = []
    stage_out_names = [s.name for s in stages if s.steps]
    for i, stage in enumerate(s for s in stages if s.steps):
        cfg = DistillConfig(stages=[stage], batch_size=args.batch_size, block_size=args.block, seed=i + 1,
                            checkpoint_dir=str(cache_dir(f"{args.name}_ckpt") / stage.name),
                            checkpoint_every=200, progress=False)
        res = m2.distill(student, teacher, valid, cfg, tokenizer=tokenizer,
                        on_step=progress_logger(50)).to_dict()["stages"][0]
        last = i == len(stage_out_names) - 1
        # Full test set after the last stage; between stages, the first 256 blocks (a CPU saving),
        # next to the teacher's perplexity on the same blocks.
        res["metric"] = res["test_ppl"] = perplexity(student, test_blocks if last else test_blocks[:256])
        res["eval_blocks"] = len(test_blocks) if last else 256
        if not last:
            res["teacher_ppl_same_blocks"] = perplexity(teacher, test_blocks[:256])
        res["config"] = cfg.to_dict()["stages"][0]
        res["losses"] = res["losses"][:: max(1, len(res["losses"]) // 100)]
        stage_out.append(res)
        log(f"after {stage.name}: test ppl {res['test_ppl']:.2f} ({res['seconds'] / 60:.1f} min, "
            f"loss {res['first_loss']:.4f} -> {res['final_loss']:.4f})")
    wall, cpu = clock.total, clock.cpu
    t_params, s_params = count_params(teacher), count_params(student)
    recovered = stage_out[-1]["test_ppl"] if stage_out else converted_ppl
    result = {"teacher_test_ppl": teacher_ppl, "converted_test_ppl": converted_ppl,
              "recovered_test_ppl": recovered, "teacher_params": t_params, "student_params": s_params,
              "wall_seconds": wall, "cpu_seconds": cpu, "stages": stage_out, "ppl_ratio": recovered / teacher_ppl,
              "target_met": bool(recovered <= 1.05 * teacher_ppl), "teacher": tinfo}
    if args.save_student is not None:
        student.save_pretrained(args.save_student)
        tokenizer.save_pretrained(args.save_student)
        log(f"saved the recovered student to {args.save_student}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_report(args.name, result, config, render, args.out)
    log(f"wrote {path}")
    return result


def _ppl(s: dict) -> str:
    if s.get("teacher_ppl_same_blocks") is None:
        return f"{s['metric']:.1f}"
    return f"{s['metric']:.1f} (first {s['eval_blocks']} blocks; teacher {s['teacher_ppl_same_blocks']:.1f})"


def render(doc: dict) -> str:
    """The markdown body of a report from its JSON document (main run and variants)."""
    rows = [["teacher", "", "", "", "", "", f"{doc['teacher_test_ppl']:.1f}"],
            ["converted, no recovery", "", "", "", "", "", f"{doc['converted_test_ppl']:.1f}"]]
    rows += stage_rows(doc["stages"], _ppl)
    table = markdown_table(["model / stage", "steps", "tokens", "wall min", "first loss", "last loss", "test ppl"],
                           rows)
    t, cfg = doc["teacher"], doc["config"]
    task = next((s for s in doc["stages"] if s["name"] == "task"), None)
    lines = [table, "",
             f"- teacher: GPT-2 architecture ({cfg['n_layer']} layers, width {cfg['n_embd']}, byte-level BPE of "
             f"{cfg['vocab']} tokens), {doc['teacher_params']:,} parameters, trained on WikiText-2 valid.txt only "
             f"({t['steps']} steps, {t['tokens']:,} tokens, {t['epochs_of_valid']:.1f} epochs); the train split is "
             "not in the data folder",
             f"- student: every attention block -> causal M2 mixer ({cfg['causal_mode']}, filter order "
             f"{cfg['filter_order']}){' + Monarch MLPs' if cfg.get('dimension') else ''}, "
             f"{doc['student_params']:,} parameters; recovered on valid.txt, evaluated on all of test.txt "
             f"(non-overlapping blocks of {cfg['block']} tokens)",
             f"- student time: {doc['cpu_seconds'] / 60:.1f} CPU min, {doc['wall_seconds'] / 60:.1f} min wall on a "
             "shared machine",
             f"- target: within 5% of the teacher's perplexity -> {'met' if doc['target_met'] else 'not met'} "
             f"(student / teacher = {doc['ppl_ratio']:.3f})"]
    if task is not None and task["config"]["task_weight"] > 0:
        lines.append(f"- the task stage adds {task['config']['task_weight']} x the LM loss on valid.txt to KD, so "
                     "the student also trains longer on the teacher's data than the teacher did; a KD-only run "
                     "(task_weight 0) isolates what conversion + distillation alone recover")
    elif task is not None:
        lines.append(f"- recovery learns from the teacher only: layer-wise transfer, then KL to the teacher's "
                     f"next-token distributions (temperature {task['config']['temperature']}, no LM loss), so the "
                     "student gets no extra signal from the data beyond what the teacher passes on")
    if doc.get("variants"):
        vrows = [[v["label"], f"{v['config']['task_weight']:g}", f"{v['config']['temperature']:g}",
                  "/".join(str(s["steps"]) for s in v["stages"]), f"{v['converted_test_ppl']:.1f}",
                  f"{v['recovered_test_ppl']:.1f}", f"{v['ppl_ratio']:.3f}", f"{v['cpu_seconds'] / 60:.1f}"]
                 for v in [{**doc, "label": "this report"}] + doc["variants"]]
        lines += ["", "## Settings tried", "",
                  markdown_table(["run", "LM-loss weight", "KD temperature", "transfer/task steps", "converted",
                                  "recovered", "student/teacher", "CPU min"], vrows), ""]
        lines += [f"- {v['label']}: `{v['command']}`" for v in doc["variants"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
