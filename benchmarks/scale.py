"""Real-size models on one machine: conversion, distillation and serving at scale (benchmarks/results/scale.*).

Runnable in parts, each merged into ``scale.json`` (the other parts' rows are kept):

    python benchmarks/scale.py --part convert [--models qwen2.5-0.5b,llama-3.2-1b] [--dtype float32]
    python benchmarks/scale.py --part serving [--context 4096] [--batches 1,8,32,128] [--memory-gb 16]
    python benchmarks/scale.py --part distill [--distill-rows runs/scale_distill.json]

``convert``: a model of the named real config with random weights goes through ``m2.plan``,
``plan.apply(inplace=True)`` and ``m2.to_recurrent(inplace=True)``; each model runs in a child process,
so its peak resident memory (``VmHWM``) is its own. Timings are wall seconds on this machine.

``serving``: a GPT-2-small body (12 layers, H 768, 8,192-token vocabulary, random weights, as
generation.md), the original with its KV cache against its recurrent form (``m2.to_recurrent``). One
prompt of ``--context`` tokens is prefilled once per model; its cache is repeated to the batch, and
decode tokens/s is batch x steps / the seconds of ``--steps`` greedy one-token steps after a warm-up
step (median of ``--rounds``). Each (model, batch) runs in a child process whose peak resident memory
is measured; the largest batch within ``--memory-gb`` is searched from the measured bytes per
sequence and kept only if its measured peak fits. Before timing, a left-padded batch of prompts of
different lengths is decoded and compared with each prompt decoded alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, command_line, count_params, log, machine, markdown_table, peak_rss_mb,  # noqa: E402
                    reset_peak)

# Real configurations (the published config.json values that shape the weights), random weights.
CONFIGS = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    "llama-3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, head_dim=64,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
}


def build(name: str, dtype: torch.dtype):
    """The named model with random weights, in ``dtype``."""
    import transformers
    cls_name, kwargs = CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def convert_one(name: str, dtype: torch.dtype) -> dict:
    """Plan, apply and make recurrent one model in this process; times, peak memory and dtypes."""
    import m2convert as m2
    model = build(name, dtype)
    params = count_params(model)
    weights_mb = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) / 2**20
    row = {"name": name, "dtype": str(dtype).removeprefix("torch."), "params": params, "weights_mb": round(weights_mb, 1)}
    reset_peak()
    start = time.perf_counter()
    plan = m2.plan(model)
    row["plan_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    converted = plan.apply(inplace=True)
    row["apply_s"] = round(time.perf_counter() - start, 1)
    row["peak_rss_apply_mb"] = round(peak_rss_mb(), 1)
    start = time.perf_counter()
    report = m2.to_recurrent(converted, inplace=True)
    row["to_recurrent_s"] = round(time.perf_counter() - start, 1)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    row["rss_over_weights"] = round(row["peak_rss_mb"] / weights_mb, 2)
    row["dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in report.model.parameters()})
    row["worst_channel_error"] = max(f.max_channel_error or 0.0 for f in report.layers)
    row["converted_sites"] = len(plan.converted)
    return row


GIB = 2**30
NOTE = [None]                   # --note: how this part's run was made, kept beside its rows


def serving_model(kind: str, context: int):
    """The GPT-2-small body ("original") or its conversion made recurrent ("recurrent"), eval mode."""
    import transformers

    import m2convert as m2
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=8192, n_positions=context + 64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    if kind == "recurrent":
        model = m2.to_recurrent(m2.convert(model, inplace=True, progress=False), inplace=True).model.eval()
    model.generation_config.eos_token_id = None                       # every requested token is generated
    model.generation_config.pad_token_id = 0
    return model


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc), so a new peak window starts from live memory."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def left_padding_check(model, lengths=(37, 64, 100), new_tokens: int = 16) -> dict:
    """Greedy-decode a left-padded batch of prompts of ``lengths`` and each prompt alone: equal tokens?"""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    longest = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(longest - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(longest)[None] >= torch.tensor([longest - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        alone = [model.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=new_tokens, do_sample=False) for p in prompts]
    equal = all(torch.equal(batched[i, longest:], a[0, len(p):]) for i, (p, a) in enumerate(zip(prompts, alone)))
    return {"lengths": list(lengths), "new_tokens": new_tokens, "equal": equal}


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from ``obj`` (a cache: its layers, states and key/value tensors)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    return sum(tensor_bytes(o, seen) for o in vars(obj).values()) if hasattr(obj, "__dict__") else 0


def decode_rate(model, cache, batch: int, context: int, steps: int, rounds: int) -> float:
    """Tokens/s of ``steps`` greedy one-token steps of ``batch`` sequences from ``cache`` (median of rounds)."""
    ids = torch.randint(1, model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(1))
    seen, rates = context, []
    with torch.no_grad():
        for r in range(rounds + 1):                                     # round 0 is a warm-up step
            start = time.perf_counter()
            for _ in range(steps if r else 1):
                seen += 1
                out = model(input_ids=ids, attention_mask=torch.ones(batch, seen, dtype=torch.long),
                            cache=cache, use_cache=True)
                ids = out.logits[:, -1:].argmax(-1)
            if r:
                rates.append(batch * steps / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


def serve_one(kind: str, context: int, batches: list[int], memory_gb: float, steps: int, rounds: int) -> dict:
    """In this process: prefill one prompt, then decode rates and peak memory per batch, and the largest
    batch whose measured peak stays within ``memory_gb``."""
    import copy

    from transformers import DynamicCache
    model = serving_model(kind, context)
    out = {"kind": kind, "rows": []}
    if kind == "recurrent":
        out["left_padding"] = left_padding_check(model)
        log(f"left padding check: {out['left_padding']}")
    prompt = torch.randint(1, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        prefilled = model(input_ids=prompt, cache=DynamicCache(), use_cache=True).past_key_values
    log(f"{kind}: prefill of {context} tokens {time.perf_counter() - start:.1f} s")
    limit = memory_gb * GIB / 2**20                                     # MiB

    def run(batch: int, steps: int = steps, rounds: int = rounds) -> dict:
        cache = copy.deepcopy(prefilled)
        cache.batch_repeat_interleave(batch)
        trim_heap()
        reset_peak()
        rate = decode_rate(model, cache, batch, context, steps, rounds)
        row = {"batch": batch, "tokens_per_s": round(rate, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}
        log(f"{kind}: {row}")
        del cache
        return row

    per_sequence = max(tensor_bytes(prefilled) / 2**20, 1e-3)                # MiB of cache per sequence

    def predicted(batch: int) -> float:
        """Peak MiB at ``batch``: the largest batch run so far, plus the cache and the measured growth per sequence."""
        rows = sorted((r for r in out["rows"] if r["fits"]), key=lambda r: r["batch"])[-2:]
        if not rows:
            return 0.0
        slope = (rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) / (rows[1]["batch"] - rows[0]["batch"]) \
            if len(rows) == 2 else 0.0
        return rows[-1]["peak_rss_mb"] + max(per_sequence, slope) * (batch - rows[-1]["batch"])

    for batch in batches:
        if predicted(batch) > limit:
            log(f"{kind}: batch {batch} is predicted at {predicted(batch):,.0f} MiB > {limit:,.0f}: not run")
            out["rows"].append({"batch": batch, "tokens_per_s": None, "peak_rss_mb": round(predicted(batch), 1),
                                "fits": False})
            continue
        out["rows"].append({**run(batch), "fits": True})
    out["rows"] = [r for r in out["rows"] if r["fits"]] + [r for r in out["rows"] if not r["fits"]]
    low, high = 1, 1 << 20                                              # the largest batch predicted to fit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if predicted(mid) <= 0.97 * limit else (low, mid - 1)
    best = max((r for r in out["rows"] if r["fits"]), key=lambda r: r["batch"])
    base = min((r for r in out["rows"] if r["fits"]), key=lambda r: r["batch"])
    guess = max(low, best["batch"])
    for _ in range(5):                      # quick probes (one timed step) toward the largest batch that fits
        probe = run(guess, steps=1, rounds=1)
        if probe["peak_rss_mb"] <= limit:
            best = probe if probe["batch"] > best["batch"] else best
            slope = (probe["peak_rss_mb"] - base["peak_rss_mb"]) / max(probe["batch"] - base["batch"], 1)
            guess = int(base["batch"] + (0.97 * limit - base["peak_rss_mb"]) / max(slope, 1e-3))
            if guess <= best["batch"] * 1.05:
                break
        else:
            guess = int(guess * 0.95 * limit / probe["peak_rss_mb"])
    row = best if best in out["rows"] else run(best["batch"])
    out["max_batch"] = {**row, "fits": row["peak_rss_mb"] <= limit}
    return out


def merge(part: str, updates: dict) -> Path:
    """Write ``updates`` (keys of ``scale.json``) for ``part``, the other parts' keys kept; re-render the markdown."""
    path = RESULTS / "scale.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update(updates)
    doc.setdefault("commands", {})[part] = command_line()
    doc["command"] = "; ".join(doc["commands"].values())
    doc["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["machine"] = machine()
    doc.setdefault("part_machines", {})[part] = doc["machine"]
    doc.setdefault("notes", {})[part] = NOTE[0]
    path.write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "scale.md").write_text(render(doc))
    return path


def render(doc: dict) -> str:
    m = doc["machine"]
    out = ["# scale", "", f"{doc['date']}, {m['processor']} ({m['cpu_count']} cores); each part's command, "
           "threads and load average are given with it.", ""]

    def where(part: str) -> str:
        pm = doc.get("part_machines", {}).get(part, m)
        note = doc.get("notes", {}).get(part)
        return (f"`{doc['commands'][part]}`: {pm['torch_threads']} torch thread(s), load average at the end "
                f"{pm['load_average_1_5_15min']}" + (f". {note}" if note else ""))
    if doc.get("models"):
        out += ["## Conversion (plan, apply in place, to_recurrent in place)", "", where("convert"), "",
                markdown_table(["model", "dtype", "params", "weights MB", "plan s", "apply s", "to_recurrent s",
                                "peak RSS MB", "peak / weights", "worst channel error"],
                               [[r["name"], r["dtype"], r["params"], r["weights_mb"], r["plan_s"], r["apply_s"],
                                 r["to_recurrent_s"], r["peak_rss_mb"], r["rss_over_weights"],
                                 f"{r['worst_channel_error']:.2e}"] for r in doc["models"]]), ""]
    if doc.get("serving"):
        mb = doc["max_batch"]
        ratio = mb["recurrent_tokens_per_s"] / mb["original_tokens_per_s"]
        out += [f"## Serving at {doc['serving_context']} tokens of context (GPT-2-small body, decode tokens/s)", "",
                where("serving"), "",
                markdown_table(["batch", "original (KV cache) tok/s", "recurrent tok/s", "original peak RSS MB",
                                "recurrent peak RSS MB"],
                               [[r["batch"], r["original_tokens_per_s"] or "does not fit",
                                 r["recurrent_tokens_per_s"] or "does not fit", r["original_peak_rss_mb"],
                                 r["recurrent_peak_rss_mb"]] for r in doc["serving"]]), "",
                f"- Largest batch within {doc['serving_memory_gb']} GiB (measured peak RSS): original "
                f"{mb['original']} ({mb['original_tokens_per_s']:,.1f} tok/s, {mb['original_peak_rss_mb']:,.0f} MB), "
                f"recurrent {mb['recurrent']} ({mb['recurrent_tokens_per_s']:,.1f} tok/s, "
                f"{mb['recurrent_peak_rss_mb']:,.0f} MB): {ratio:.1f}x the throughput (target >= 5x: "
                f"{'met' if ratio >= 5 else 'missed'}).",
                f"- Left-padded batch of prompts of lengths {doc['left_padding']['lengths']} decoded "
                f"{doc['left_padding']['new_tokens']} greedy tokens equal to each prompt alone: "
                f"{doc['left_padding']['equal']}.",
                "- Rows marked 'does not fit' were predicted past the memory limit from the measured peaks "
                "and not run.",
                "- The original decodes with transformers' DynamicCache (what generate() uses): each step "
                "appends one token to every layer's keys and values by concatenation, a copy of the whole "
                "cache, so its throughput falls as the batch grows.", ""]
    if doc.get("distill"):
        rows = [[r["stage"], r.get("rank", 0), r["processes"], r["peak_rss_mb"], r["seconds_per_step"],
                 r.get("param_bytes_local", 0) / 2**20, r.get("optimizer_bytes_local", 0) / 2**20,
                 r.get("lora_rank", 0), r.get("train", "")] for r in doc["distill"]]
        first = doc["distill"][0]
        out += ["## Distillation at scale (Qwen2.5-0.5B shape, sequence 512)", "", where("distill"), "",
                markdown_table(["stage", "rank", "processes", "peak RSS MB", "s / step", "parameters held MB",
                                "optimizer state held MB", "LoRA rank", "trains"], rows), "",
                f"- Batch {first.get('batch')}, {first.get('data')}, autocast {first.get('autocast')}, gradient "
                f"checkpointing {first.get('gradient_checkpointing')}; transfer layer-wise "
                f"({first.get('layerwise')}: one layer's teacher activations at a time); {first.get('keep_layers')} "
                f"attention layers kept dense (LoRA's targets in kd); {first.get('steps_timed')} timed steps "
                "after a warm-up.",
                "- Under FSDP2 each process holds its shard of the parameters and of the AdamW state: "
                "the 'held' columns against the whole student's "
                f"{first.get('param_bytes_total', 0) / 2**20:,.0f} MB of parameters.", ""]
    return "\n".join(out)


def distill(args) -> None:
    """Distillation at scale (``scale_distill.py``: transfer and kd in one process, kd under FSDP2 over 2
    gloo processes with torchrun), or the rows an earlier run of it wrote (``--distill-rows``), merged
    into ``scale.json``."""
    script = str(Path(__file__).with_name("scale_distill.py"))
    path = Path(args.distill_rows) if args.distill_rows else Path(tempfile.mkstemp(suffix=".json")[1])
    if not args.distill_rows:
        subprocess.run([sys.executable, script, "--out", str(path)], check=True, env=os.environ)
        torchrun = Path(sys.executable).with_name("torchrun")
        subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", script, "--fsdp", "--out", str(path)],
                       check=True, env=os.environ)
    rows = json.loads(path.read_text())
    log(f"wrote {merge('distill', {'distill': rows})}")


def serving(args) -> None:
    """Run each model's serving rows in a child process and merge them into ``scale.json``."""
    results = {}
    for kind in ("original", "recurrent"):
        log(f"serving: {kind} in a child process")
        result = Path(tempfile.mkstemp(suffix=".json")[1])
        subprocess.run([sys.executable, __file__, "--part", "serving", "--serve-child", kind, "--result", str(result),
                        "--context", str(args.context), "--batches", args.batches, "--memory-gb", str(args.memory_gb),
                        "--steps", str(args.steps), "--rounds", str(args.rounds),
                        *(["--threads", str(args.threads)] if args.threads else [])], check=True, env=os.environ)
        results[kind] = json.loads(result.read_text())
        result.unlink()
    by = {k: {r["batch"]: r for r in v["rows"]} for k, v in results.items()}
    rows = [{"batch": b, **{f"{k}_{f}": by[k].get(b, {}).get(f) for k in by for f in ("tokens_per_s", "peak_rss_mb")}}
            for b in sorted(set(by["original"]) | set(by["recurrent"]))]
    for row in rows:
        for k in by:
            if not by[k].get(row["batch"], {}).get("fits", True):
                row[f"{k}_tokens_per_s"] = None
    mb = {k: v["max_batch"] for k, v in results.items()}
    max_batch = {"original": mb["original"]["batch"], "recurrent": mb["recurrent"]["batch"],
                 **{f"{k}_{f}": mb[k][f] for k in mb for f in ("tokens_per_s", "peak_rss_mb")}}
    path = merge("serving", {"serving": rows, "max_batch": max_batch, "left_padding": results["recurrent"]["left_padding"],
                             "serving_context": args.context, "serving_memory_gb": args.memory_gb})
    log(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["convert", "serving", "distill"], required=True)
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--memory-gb", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--note", default=None, help="how the run was made (e.g. what else ran), kept in the report")
    parser.add_argument("--distill-rows", default=None, help="merge these scale_distill.py rows instead of running it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    NOTE[0] = args.note
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.child:
        print("ROW " + json.dumps(convert_one(args.child, dtype)), flush=True)
    elif args.serve_child:
        batches = [int(b) for b in args.batches.split(",")]
        Path(args.result).write_text(json.dumps(serve_one(args.serve_child, args.context, batches, args.memory_gb,
                                                          args.steps, args.rounds)))
    elif args.part == "serving":
        serving(args)
    elif args.part == "distill":
        distill(args)
    elif args.part == "convert":
        rows = []
        for name in args.models.split(","):
            log(f"converting {name} ({args.dtype}) in a child process")
            proc = subprocess.run([sys.executable, __file__, "--part", "convert", "--dtype", args.dtype, "--child", name],
                                  stdout=subprocess.PIPE, text=True, check=True, env=os.environ)
            row = json.loads(next(line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")))
            log(json.dumps(row))
            rows.append(row)
        path = RESULTS / "scale.json"
        kept = json.loads(path.read_text()).get("models", []) if path.exists() else []
        fresh = {(r["name"], r["dtype"]) for r in rows}
        rows = [r for r in kept if (r["name"], r["dtype"]) not in fresh] + rows       # other models' rows kept
        log(f"wrote {merge('convert', {'models': rows})}")


if __name__ == "__main__":
    main()
