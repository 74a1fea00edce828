"""ViT recovery on real images: does a converted M2-ViT get back to its teacher's test accuracy?

    1. data: scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the package),
       upsampled to 16x16, split 75/25 (stratified, seeded); the test quarter is never trained on
    2. teacher: a small ViTForImageClassification (patch 4 -> 16 patch tokens + CLS) trained from
       scratch on the training split
    3. convert it with m2convert.convert: every attention -> bidirectional M2 mixer (seeded from
       Q, K, V, O), every MLP linear -> MonarchLinear (Frobenius projection)
    4. recover on the training split: layer-wise transfer (each M2 module fed the teacher's inputs to
       that layer, relative MSE to the teacher module's output), then end-to-end KD + labels' loss
    5. test accuracy of teacher, converted (no recovery) and recovered, parameters, wall time

Run:   python benchmarks/vit_recovery.py            (the committed report; a few minutes on 2 CPU cores)
       python benchmarks/vit_recovery.py --smoke    (seconds; writes to runs/bench_smoke/)
Needs: pip install -e .[bench]   (scikit-learn)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Clock, cosine, count_params, log, markdown_table, write_report  # noqa: E402

import m2convert as m2  # noqa: E402
from m2convert.recover.stages import TransferObjective, kd_kl, layer_pairs, record_module_io  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny budgets to check the pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default benchmarks/results)")
    p.add_argument("--name", default="vit_recovery")
    # data and teacher
    p.add_argument("--image-size", type=int, default=16, help="digits are upsampled from 8x8 to this size")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=128, help="ViT intermediate size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=60)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    # conversion
    p.add_argument("--nblocks", type=int, default=4)
    p.add_argument("--filter-order", type=int, default=16)
    p.add_argument("--no-dimension", action="store_true", help="keep the MLPs dense")
    # recovery
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--transfer-lr", type=float, default=2e-3)
    p.add_argument("--recover-epochs", type=int, default=60)
    p.add_argument("--recover-lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.smoke:
        args.teacher_epochs, args.transfer_steps, args.recover_epochs = 2, 4, 1
        args.out = args.out or Path(__file__).resolve().parents[1] / "runs" / "bench_smoke"
    return args


def load_digits_split(image_size: int, seed: int):
    """(train_x, train_y, test_x, test_y): digits as (B, 1, S, S) floats, standardised with train stats."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0        # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)  # (1797, 1, S, S)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed,
                                           stratify=digits.target)
    train_x, test_x = x[train_idx], x[test_idx]
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, y[train_idx], (test_x - mean) / std, y[test_idx]


def make_teacher(args, seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=args.image_size, patch_size=args.patch_size, num_channels=1,
                    hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                    intermediate_size=args.mlp, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    num_labels=10)
    return ViTForImageClassification(cfg)


@torch.no_grad()
def accuracy(model, x, y, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on images x (B, 1, S, S) with labels y (B,)."""
    model.eval()
    hits = 0
    for i in range(0, len(y), batch_size):
        logits = model(pixel_values=x[i:i + batch_size]).logits                 # (b, 10)
        hits += (logits.argmax(-1) == y[i:i + batch_size]).sum().item()
    return hits / len(y)


def shifted(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Each image translated by a random (dy, dx) in [-max_shift, max_shift], background filled in."""
    if max_shift == 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))                      # (B, 1, S + 2m, S + 2m)
    s = x.shape[-1]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = pad[i, :, dy:dy + s, dx:dx + s]
    return out


def batches(n: int, batch_size: int, epochs: int, gen: torch.Generator):
    """Index batches over ``epochs`` shuffled passes of n examples (last partial batch dropped)."""
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def train_end_to_end(model, x, y, *, epochs, lr, batch_size, seed, teacher=None, temperature=2.0,
                     kd_weight=0.0, max_shift=1) -> list[float]:
    """AdamW on labels' cross-entropy (+ kd_weight x T^2 KL to ``teacher``); cosine schedule; losses."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * (len(y) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    losses = []
    model.train()
    for step, idx in enumerate(batches(len(y), batch_size, epochs, gen)):
        for g in opt.param_groups:
            g["lr"] = lr * cosine(step, steps, warmup=max(1, steps // 20))
        xb = shifted(x[idx], gen, max_shift)                                       # (b, 1, S, S)
        logits = model(pixel_values=xb).logits                                     # (b, 10)
        loss = F.cross_entropy(logits, y[idx])
        if teacher is not None and kd_weight > 0:
            with torch.no_grad():
                t_logits = teacher(pixel_values=xb).logits
            loss = loss + kd_weight * kd_kl(logits, t_logits, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def transfer(student, teacher, x, *, steps, lr, batch_size, seed) -> list[float]:
    """Layer-wise transfer: only the M2 modules train, each on the teacher's inputs to its layer."""
    pairs = layer_pairs(student, teacher)                                         # (path, M2 module, original)
    objective = TransferObjective(pairs, "relative-mse")
    params = [p for _, module, _ in pairs for p in module.parameters()]
    teacher_modules = {path: original for path, _, original in pairs}
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    teacher.eval()
    objective.train()
    for step, idx in enumerate(batches(len(x), batch_size, 10 ** 6, gen)):
        if step == steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr * cosine(step, steps, warmup=max(1, steps // 20))
        with torch.no_grad(), record_module_io(teacher_modules) as calls:
            teacher(pixel_values=shifted(x[idx], gen, 1))
        loss = objective(calls, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    student.eval()
    return losses


def _mean(values: list[float], tail: bool) -> float | None:
    part = values[-20:] if tail else values[:20]
    return sum(part) / len(part) if part else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = Clock()
    train_x, train_y, test_x, test_y = load_digits_split(args.image_size, args.seed)
    log(f"digits: {len(train_y)} train / {len(test_y)} test images of {args.image_size}x{args.image_size}")

    teacher = make_teacher(args, args.seed)
    t_losses = train_end_to_end(teacher, train_x, train_y, epochs=args.teacher_epochs, lr=args.teacher_lr,
                                batch_size=args.batch_size, seed=args.seed)
    teacher_s = clock.lap("teacher")
    teacher_acc = accuracy(teacher, test_x, test_y)
    log(f"teacher: test acc {teacher_acc:.4f}, {count_params(teacher):,} params, {teacher_s:.0f} s")

    config = m2.ConvertConfig(nblocks=args.nblocks, filter_order=args.filter_order,
                              dimension=not args.no_dimension)
    plan = m2.plan(teacher, config)
    student = plan.apply()
    convert_s = clock.lap("convert")
    converted_acc = accuracy(student, test_x, test_y)
    log(f"converted: {len(plan.converted)} sites, test acc {converted_acc:.4f}, {count_params(student):,} params")

    tr_losses = transfer(student, teacher, train_x, steps=args.transfer_steps, lr=args.transfer_lr,
                         batch_size=args.batch_size, seed=args.seed + 1)
    transfer_s = clock.lap("transfer")
    transfer_acc = accuracy(student, test_x, test_y)
    log(f"after transfer: test acc {transfer_acc:.4f} ({transfer_s:.0f} s)")

    kd_losses = train_end_to_end(student, train_x, train_y, epochs=args.recover_epochs, lr=args.recover_lr,
                                 batch_size=args.batch_size, seed=args.seed + 2, teacher=teacher,
                                 temperature=args.temperature, kd_weight=args.kd_weight)
    kd_s = clock.lap("kd+task")
    recovered_acc = accuracy(student, test_x, test_y)
    wall = clock.total
    log(f"recovered: test acc {recovered_acc:.4f} ({kd_s:.0f} s); total {wall:.0f} s")

    t_params, s_params = count_params(teacher), count_params(student)
    gap = 100 * (teacher_acc - recovered_acc)
    stages = [
        {"name": "teacher training", "steps": len(t_losses), "seconds": teacher_s, "first_loss": _mean(t_losses, False),
         "final_loss": _mean(t_losses, True), "test_acc": teacher_acc},
        {"name": "transfer", "steps": len(tr_losses), "seconds": transfer_s, "first_loss": _mean(tr_losses, False),
         "final_loss": _mean(tr_losses, True), "test_acc": transfer_acc},
        {"name": "kd+task", "steps": len(kd_losses), "seconds": kd_s, "first_loss": _mean(kd_losses, False),
         "final_loss": _mean(kd_losses, True), "test_acc": recovered_acc},
    ]
    result = {"teacher_test_acc": teacher_acc, "converted_test_acc": converted_acc,
              "recovered_test_acc": recovered_acc, "teacher_params": t_params, "student_params": s_params,
              "wall_seconds": wall, "convert_seconds": convert_s, "gap_points": gap,
              "target_met": bool(gap <= 1.0), "train_images": len(train_y), "test_images": len(test_y),
              "stages": stages, "sites": {"converted": len(plan.converted), "skipped": len(plan.skipped)},
              "recovery": "layer-wise transfer and KD + labels' loss written out in this script with "
                          "m2convert.recover.stages objectives (m2.distill batches need input_ids)"}
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_report(args.name, result, cfg, render, args.out)
    log(f"wrote {path}")
    return result


def render(doc: dict) -> str:
    """The markdown body of the report from its JSON document."""
    c, (teach, transfer, kd) = doc["config"], doc["stages"]
    t_params, s_params, gap = doc["teacher_params"], doc["student_params"], doc["gap_points"]
    table = markdown_table(
        ["model", "test acc", "params", "steps", "seconds"],
        [["teacher ViT (trained here)", teach["test_acc"], t_params, teach["steps"], teach["seconds"]],
         ["converted, no recovery", doc["converted_test_acc"], s_params, 0, doc["convert_seconds"]],
         ["after layer-wise transfer", transfer["test_acc"], s_params, transfer["steps"], transfer["seconds"]],
         ["after KD + labels (recovered)", kd["test_acc"], s_params, kd["steps"], kd["seconds"]]])
    notes = [f"data: scikit-learn load_digits, 8x8 upsampled to {c['image_size']}x{c['image_size']} (bilinear), "
             f"{doc['train_images']} train / {doc['test_images']} test images, stratified split seed {c['seed']}; "
             f"1 point = {doc['test_images'] / 100:.1f} test images",
             f"teacher: ViT hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads, MLP {c['mlp']}, "
             f"patch {c['patch_size']} ({(c['image_size'] // c['patch_size']) ** 2} patches + CLS)",
             f"student: {doc['sites']['converted']} sites converted (attention -> bidirectional M2 mixer, filter "
             f"order {c['filter_order']}; MLP linears -> MonarchLinear nblocks {c['nblocks']}); "
             f"parameters {t_params:,} -> {s_params:,} ({100 * (s_params / t_params - 1):+.1f}%)",
             f"gap to the teacher: {gap:.2f} points (target: within 1 point) -> "
             f"{'met' if doc['target_met'] else 'not met'}; wall time {doc['wall_seconds'] / 60:.1f} min in all "
             "(data, teacher training, conversion, recovery, evaluations)",
             f"recovery: {doc['recovery']}; it trains on the training split only, random 1-pixel shifts augmenting "
             "every batch"]
    return table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


if __name__ == "__main__":
    main()
