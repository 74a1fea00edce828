"""WikiText-2 recovery: a small GPT-2-style LM converted to causal M2 mixers and recovered.

WikiText-2's train split is not in the data folder, so the teacher trains on ``valid.txt`` (or, with
``--teacher-text valid+sst2``, valid.txt plus SST-2 train sentences, early-stopped on 5% held out) for a
fixed budget and everything is evaluated on ``test.txt``:

    1. tokenizer: byte-level BPE (8,192 tokens) trained on the teacher's text  (cached)
    2. teacher: GPT-2 architecture, ~11M parameters, trained on that text   (cached per size and text)
    3. convert: attention -> causal M2 sequence mixers (m2convert.convert)
    4. recover on the same text: layer-wise transfer, then KD (+ LM loss)
    5. test perplexity (non-overlapping blocks of 128 tokens) of teacher, converted, each stage

Run:   python benchmarks/wikitext_recovery.py --task-weight 0    (the committed report: KD only)
       python benchmarks/wikitext_recovery.py                    (KD + 0.5 x LM loss, its variant)
       python benchmarks/wikitext_recovery.py --teacher-text valid+sst2 --teacher-steps 2500 --task-weight 0
           (a teacher on over 5x the tokens, early-stopped on held-out text; target within 2%)
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
from common import (cache_dir, cached_teacher, Clock, cosine, count_params, log, markdown_table,  # noqa: E402
                    progress_logger, stage_rows, write_markdown, write_report)

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
    p.add_argument("--teacher-text", choices=("valid", "valid+sst2"), default="valid",
                   help="what the teacher (and the recovery) trains on: WikiText-2 valid.txt, or valid.txt plus "
                        "SST-2 train sentences with 5%% of both held out for early stopping")
    p.add_argument("--teacher-eval-every", type=int, default=250, help="held-out evaluations (valid+sst2 only)")
    p.add_argument("--teacher-patience", type=int, default=3, help="evaluations without improvement before stopping")
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
        args.teacher_steps, args.transfer_steps, args.task_steps, args.teacher_eval_every = 20, 5, 5, 10
        args.out = args.out or Path(__file__).resolve().parents[1] / "runs" / "bench_smoke"
    return args


def teacher_text(args, data: Path, folder: Path) -> tuple[Path, Path | None]:
    """(train text, held-out text or None) of the teacher; the recovery trains on the same train text.

    "valid+sst2": WikiText-2 valid.txt split into its articles (" = Title = " lines) plus SST-2 train
    sentences (one per line); a seeded 5% of the articles and of the sentences are held out.
    """
    valid = data / "wikitext2" / "valid.txt"
    if args.teacher_text == "valid":
        return valid, None
    train, held = folder / "train.txt", folder / "heldout.txt"
    if train.exists() and held.exists():
        return train, held
    articles: list[list[str]] = []
    for line in valid.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = ") or not articles:
            articles.append([])
        articles[-1].append(line)
    sentences = [row.split("\t", 1)[1] + "\n" for row in (data / "sst2" / "train.tsv").read_text(
        encoding="utf-8").splitlines()[1:]]
    if args.smoke:
        articles, sentences = articles[:12], sentences[:400]
    gen = torch.Generator().manual_seed(99)
    parts = {"train": [], "held": []}
    for items in (["".join(a) for a in articles], sentences):
        order = torch.randperm(len(items), generator=gen).tolist()
        cut = max(1, len(items) // 20)
        parts["held"] += [items[i] for i in sorted(order[:cut])]
        parts["train"] += [items[i] for i in sorted(order[cut:])]
    train.write_text("".join(parts["train"]), encoding="utf-8")
    held.write_text("".join(parts["held"]), encoding="utf-8")
    return train, held


def get_tokenizer(args, text: Path, folder: Path):
    """Byte-level BPE trained on the teacher's train text, wrapped as a transformers fast tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text)], trainer)
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


def train_teacher(args, tokenizer, train_text: Path, held_blocks, test_blocks, folder: Path):
    """Train (or load) the teacher: warmup + cosine over ``--teacher-steps``; with held-out blocks, stop
    after ``--teacher-patience`` evaluations without a better held-out perplexity and keep the best."""
    # long: one training loop with its evaluation and bookkeeping, read top to bottom
    from transformers import GPT2Config, GPT2LMHeadModel
    cached = cached_teacher(folder, GPT2LMHeadModel, "test ppl {test_ppl:.2f}")
    if cached is not None:
        return cached
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=max(256, args.block), n_embd=args.n_embd,
                     n_layer=args.n_layer, n_head=8 if args.n_embd % 8 == 0 else 4,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.1, betas=(0.9, 0.95))
    src = load_data(train_text, tokenizer, batch_size=args.batch_size, block_size=args.block, seed=4321)
    clock, history, best, best_state, bad = Clock(), [], math.inf, None, 0
    model.train()
    warm = max(1, args.teacher_steps // 20)
    for step in range(args.teacher_steps):
        for g in opt.param_groups:
            g["lr"] = args.teacher_lr * cosine(step, args.teacher_steps, warm)
        loss = model(**src.batch(step)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if held_blocks is not None and ((step + 1) % args.teacher_eval_every == 0 or step + 1 == args.teacher_steps):
            held = perplexity(model, held_blocks)
            history.append({"step": step + 1, "loss": loss.item(), "held_out_ppl": held, "seconds": clock.total})
            log(f"teacher step {step + 1}: loss {loss.item():.3f} held-out ppl {held:.2f} ({clock.total / 60:.1f} min)")
            if held < best:
                best, best_state, bad = held, {k: v.clone() for k, v in model.state_dict().items()}, 0
            else:
                bad += 1
                if bad >= args.teacher_patience:
                    break
        elif (step + 1) % 100 == 0:
            log(f"teacher step {step + 1}: loss {loss.item():.3f} ({clock.total / 60:.1f} min)")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    trained = step + 1
    info = {"test_ppl": perplexity(model, test_blocks), "steps": trained, "planned_steps": args.teacher_steps,
            "seconds": clock.total, "tokens": trained * args.batch_size * args.block, "lr": args.teacher_lr,
            "epochs_of_valid": trained / src.per_epoch, "epochs": trained / src.per_epoch,
            "schedule": "warmup + cosine", "text": args.teacher_text, "train_text": str(train_text.name),
            "train_text_tokens": src.per_epoch * args.batch_size * args.block, "history": history,
            "held_out_ppl": best if held_blocks is not None else None, "config": cfg.to_dict()}
    model.save_pretrained(folder)
    (folder / "teacher.json").write_text(json.dumps(info, indent=2))
    return model, info


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return {"markdown": str(write_markdown(args.name, render, args.out))}
    torch.set_num_threads(args.threads)
    data = args.data or default_data_dir()
    test = data / "wikitext2" / "test.txt"
    text = "" if args.teacher_text == "valid" else "_vs2"
    folder = cache_dir("wikitext_teacher_smoke" + text if args.smoke
                       else f"wikitext_teacher_e{args.n_embd}_l{args.n_layer}_v{args.vocab}_s{args.teacher_steps}{text}")
    train_text, held_text = teacher_text(args, data, folder)     # the teacher's (and the recovery's) train text
    tokenizer = get_tokenizer(args, train_text, folder)
    test_blocks, _ = pack_text(test, tokenizer, args.block, on_bad="raise")
    held_blocks = pack_text(held_text, tokenizer, args.block, on_bad="raise")[0] if held_text else None
    if args.smoke:
        test_blocks = test_blocks[:32]
    teacher, tinfo = train_teacher(args, tokenizer, train_text, held_blocks, test_blocks, folder)
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
        res = m2.distill(student, teacher, train_text, cfg, tokenizer=tokenizer,
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
              "teacher_train_tokens": tinfo["tokens"],
              "recovered_test_ppl": recovered, "teacher_params": t_params, "student_params": s_params,
              "wall_seconds": wall, "cpu_seconds": cpu, "stages": stage_out, "ppl_ratio": recovered / teacher_ppl,
              # valid.txt alone: within 5%; the larger valid+sst2 teacher: within 2%, converted and recovered
              "target_ratio": 1.05 if args.teacher_text == "valid" else 1.02, "teacher": tinfo}
    result["target_met"] = bool(recovered <= result["target_ratio"] * teacher_ppl)
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


def _teacher_line(doc: dict) -> str:
    t, cfg = doc["teacher"], doc["config"]
    head = (f"- teacher: GPT-2 architecture ({cfg['n_layer']} layers, width {cfg['n_embd']}, byte-level BPE of "
            f"{cfg['vocab']} tokens), {doc['teacher_params']:,} parameters, ")
    if t.get("text", "valid") == "valid":
        return head + (f"trained on WikiText-2 valid.txt only ({t['steps']} steps, {t['tokens']:,} tokens, "
                       f"{t['epochs_of_valid']:.1f} epochs); the train split is not in the data folder")
    curve = ", ".join(f"{h['step']}: {h['held_out_ppl']:.1f}" for h in t["history"])
    return head + (f"trained on WikiText-2 valid.txt + SST-2 train sentences less a held-out 5% of each "
                   f"({t['train_text_tokens']:,} tokens per epoch; {t['steps']} of {t['planned_steps']} planned steps, "
                   f"{t['tokens']:,} tokens, {t['epochs']:.1f} epochs, {t['seconds'] / 60:.0f} min); the checkpoint "
                   f"kept has the best held-out perplexity ({t['held_out_ppl']:.2f}); curve (step: held-out ppl): "
                   f"{curve}")


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
             _teacher_line(doc),
             f"- student: every attention block -> causal M2 mixer ({cfg['causal_mode']}, filter order "
             f"{cfg['filter_order']}){' + Monarch MLPs' if cfg.get('dimension') else ''}, "
             f"{doc['student_params']:,} parameters; recovered on the teacher's train text, evaluated on all of test.txt "
             f"(non-overlapping blocks of {cfg['block']} tokens)",
             f"- student time: {doc['cpu_seconds'] / 60:.1f} CPU min, {doc['wall_seconds'] / 60:.1f} min wall on a "
             "shared machine",
             f"- target: within {100 * doc.get('target_ratio', 1.05) - 100:.0f}% of the teacher's perplexity -> "
             f"{'met' if doc['target_met'] else 'not met'} "
             f"(student / teacher = {doc['ppl_ratio']:.3f})"]
    if task is not None and task["config"]["task_weight"] > 0:
        lines.append(f"- the task stage adds {task['config']['task_weight']} x the LM loss on the teacher's train text to KD, so "
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
