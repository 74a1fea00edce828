"""Weight-only int8 (m2convert.quantize_int8) of the bundled all-MiniLM-L6-v2 and its conversion: how far
the outputs move, how much smaller the weights get, and the speed change.

Models: the teacher (its nn.Linear weights int8), the conversion after the demo's short recovery
(transfer steps on the packaged WikiText-2 valid sentences), and, with ``--sst2-student DIR`` (a saved
converted BertForSequenceClassification, e.g. the recovered SST-2 student), its SST-2 dev accuracy before
and after. Each is compared with itself in fp32: relative error of the last hidden states over the real
tokens of held-out sample sentences, and the cosine of the mean-pooled sentence embeddings. Speed is the
int8 model's throughput over the fp32 model's, measured in the same run, interleaved, median of rounds.

Run:   python benchmarks/quantization.py --threads 1     (the committed report; about 5 CPU minutes)
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, markdown_table, write_report  # noqa: E402

import m2convert as m2  # noqa: E402
from m2convert.bench_rows import machine_load  # noqa: E402
from m2convert.data.readers import sample_data_dir  # noqa: E402
from m2convert.loading import load_tokenizer  # noqa: E402
from m2convert.recover import DistillConfig, StageConfig  # noqa: E402

WORKLOADS = ((32, 128), (1, 512))                  # (batch, tokens): an embedding server's and one long input


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=100, help="transfer steps of the recovery (the demo's 100)")
    p.add_argument("--sentences", type=int, default=64, help="held-out test sentences compared")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per workload")
    p.add_argument("--linears", default="auto", choices=["auto", "torchao", "torch.ao"])
    p.add_argument("--sst2-student", type=Path, default=None, help="a saved converted SST-2 classifier")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state dict as torch.save writes it (int8 tensors, scales, packed weights)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def agreement(fp32: torch.nn.Module, int8: torch.nn.Module, batch: dict) -> dict:
    """Relative error of the last hidden states (real tokens) and the worst / mean cosine of the
    mean-pooled sentence embeddings, int8 against fp32."""
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        a, b = fp32(**batch).last_hidden_state, int8(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(a.dtype)
    ea, eb = (a * mask).sum(1) / mask.sum(1), (b * mask).sum(1) / mask.sum(1)
    cos = torch.nn.functional.cosine_similarity(ea, eb, dim=-1)
    return {"relative_error": ((b[real] - a[real]).norm() / a[real].norm()).item(),
            "cosine_min": cos.min().item(), "cosine_mean": cos.mean().item()}


def speed(fp32: torch.nn.Module, int8: torch.nn.Module, rounds: int) -> list[dict]:
    """Per workload: the median milliseconds of each model over interleaved rounds, and int8 over fp32."""
    rows = []
    for batch, n in WORKLOADS:
        ids = torch.randint(1000, 20000, (batch, n))
        times = {"fp32": [], "int8": []}
        with torch.no_grad():
            for model in (fp32, int8):
                model(input_ids=ids)                                   # warm-up
            for _ in range(rounds):
                for name, model in (("fp32", fp32), ("int8", int8)):
                    start = time.perf_counter()
                    model(input_ids=ids)
                    times[name].append(1000 * (time.perf_counter() - start))
        f, q = statistics.median(times["fp32"]), statistics.median(times["int8"])
        rows.append({"batch": batch, "seq_len": n, "fp32_ms": f, "int8_ms": q, "speedup": f / q})
        log(f"batch {batch} N={n}: fp32 {f:.1f} ms, int8 {q:.1f} ms ({f / q:.2f}x)")
    return rows


def measure(name: str, fp32: torch.nn.Module, batch: dict, args) -> dict:
    int8 = copy.deepcopy(fp32)
    counts = m2.quantize_int8(int8, linears=args.linears)
    row = {"model": name, **counts, **agreement(fp32, int8, batch),
           "fp32_bytes": weight_bytes(fp32), "int8_bytes": weight_bytes(int8), "speed": speed(fp32, int8, args.rounds)}
    log(f"{name}: {counts}, relative error {100 * row['relative_error']:.2f}%, embedding cosine min "
        f"{row['cosine_min']:.4f}, weights {row['fp32_bytes'] / 2**20:.1f} -> {row['int8_bytes'] / 2**20:.1f} MiB")
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = machine_load(args.threads)
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    lines = (sample_data_dir() / "wikitext2-test-sentences.txt").read_text().splitlines()
    sentences = [s.strip() for s in lines if s.strip()][: args.sentences]
    batch = dict(tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    teacher = m2.load_model("all-MiniLM-L6-v2").eval()
    torch.manual_seed(0)
    student = m2.convert(teacher, progress=False).eval()
    m2.distill(student, teacher, str(sample_data_dir() / "wikitext2-valid-sentences.txt"),
               DistillConfig(stages=[StageConfig("transfer", steps=args.steps)], batch_size=16, progress=False),
               tokenizer=tokenizer)
    rows = [measure("teacher", teacher, batch, args),
            measure(f"converted, recovered ({args.steps} transfer steps)", student.eval(), batch, args)]
    result = {"models": rows, "sentences": len(sentences), "load_before": load_before}
    if args.sst2_student is not None:
        fp32 = m2.from_pretrained(args.sst2_student).eval()
        int8 = copy.deepcopy(fp32)
        m2.quantize_int8(int8, linears=args.linears)
        from sst2_recovery import accuracy, dev_batches
        from m2convert.data import default_data_dir
        dev = dev_batches(tokenizer, default_data_dir() / "sst2" / "dev.tsv")
        result["sst2"] = {"student": str(args.sst2_student), "dev_acc_fp32": accuracy(fp32, dev),
                          "dev_acc_int8": accuracy(int8, dev)}
        log(f"SST-2 dev: {result['sst2']}")
    result["load_after"] = machine_load(args.threads, load_before["load_before"])
    path = write_report("quantization", result, vars(args) | {"out": str(args.out),
                                                           "sst2_student": str(args.sst2_student)}, render, args.out)
    log(f"wrote {path}")
    return result


def render(doc: dict) -> str:
    rows = []
    for m in doc["models"]:
        speeds = ", ".join(f"{s['speedup']:.2f}x (B={s['batch']}, N={s['seq_len']})" for s in m["speed"])
        rows.append([m["model"], f"{m['monarch']} / {m['linear']} ({m['linears']})", f"{100 * m['relative_error']:.2f}%",
                     f"{m['cosine_min']:.4f} / {m['cosine_mean']:.4f}",
                     f"{m['fp32_bytes'] / 2**20:.1f} -> {m['int8_bytes'] / 2**20:.1f}", speeds])
    sst2 = doc.get("sst2")
    sst2_line = (f"- SST-2 dev accuracy of {sst2['student']}: fp32 {sst2['dev_acc_fp32']:.4f}, int8 "
                 f"{sst2['dev_acc_int8']:.4f} ({100 * (sst2['dev_acc_int8'] - sst2['dev_acc_fp32']):+.2f} points)"
                 if sst2 else "- SST-2: not measured in this run (needs a saved recovered SST-2 student: "
                 "--sst2-student DIR)")
    return "\n".join([
        markdown_table(["model (all-MiniLM-L6-v2)", "int8 MonarchLinear / nn.Linear", "relative error vs fp32",
                        "embedding cosine min / mean", "weights MiB (state dict)", "int8 speed vs fp32"], rows),
        "",
        f"- {doc['sentences']} WikiText-2 test sample sentences; last hidden states over real tokens, and "
        "mean-pooled embeddings; embeddings, norms and the mixers' implicit filters stay fp32",
        "- speed: batch of random token ids, median of interleaved rounds, "
        f"{doc['config']['threads']} thread(s); cores other processes kept busy: {doc['load_before']['load_before']} "
        f"before, {doc['load_after']['load_after']} after" + (f" ({doc['load_after']['note']})" if doc['load_after']['note'] else ""),
        sst2_line,
    ]) + "\n"


if __name__ == "__main__":
    main()
