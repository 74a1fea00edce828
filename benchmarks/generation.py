"""Decoding speed and state: the original with its KV cache, the converted model with its convolution
cache, and its recurrent form (m2.to_recurrent: a fixed-size diagonal state per filter).

Model: a GPT-2-small body (12 layers, H 768, 12 heads) with an 8,192-token vocabulary and random
weights, so the layers and not the LM head dominate each token's work; converted with the default
ConvertConfig, and a second conversion with Monarch in/out projections (``--projection-nblocks``).

Per prompt length: decode tokens/s = 1 / the time between consecutive new tokens of one generate() call
(stamped by a logits processor, first to last new token), medians of ``--repeats`` interleaved runs, so
the prompt's prefill is not counted. The original is timed where its
prefill fits ``--original-max-prompt``; past that its per-token cost is predicted from a line through its
measured costs against the KV length (the report says which). Two bounds stand beside each ratio:
bytes read per token (weights, plus the KV cache for the original, plus the state for the recurrent
model), and a bare loop of one token through the recurrent model's own modules (no generate()).

Fidelity (``--student``): the WikiText benchmark's recovered student (``wikitext_recovery.py
--save-student``), test perplexity of the convolution form vs the recurrent form, greedy 64-token
continuations of 20 test prompts, and a state-size sweep.

    python benchmarks/generation.py --student runs/bench_cache/wikitext_student     # speed and fidelity
    python benchmarks/generation.py --smoke                                          # a quick look

Speed and fidelity can also run apart (each takes most of an hour on one core) and be joined:

    python benchmarks/generation.py                                                  # speed rows
    python benchmarks/generation.py --fidelity-only --student runs/bench_cache/wikitext_student \
        --out runs/bench_fid --name generation_fidelity
    python benchmarks/generation.py --attach-fidelity runs/bench_fid/generation_fidelity.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, count_params, log, markdown_table, write_markdown, write_report  # noqa: E402

import m2convert as m2  # noqa: E402
from m2convert.layers.modal import STATE_SIZE  # noqa: E402
from m2convert.layers.recurrent import RecurrentFilter  # noqa: E402

FLOAT = 4                                     # bytes per fp32 value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-lens", default="512,4096,32768")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--conv-new-tokens", type=int, default=8, help="tokens for the convolution cache past 4096")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--long-repeats", type=int, default=1, help="repeats past 4096 tokens (each prefill takes minutes)")
    p.add_argument("--attach-fidelity", type=Path, default=None,
                   help="a --fidelity-only report (JSON) to add to the speed report <out>/<name>.json")
    p.add_argument("--fidelity-only", action="store_true",
                   help="add the student's fidelity and sweep to an existing report instead of timing the speed rows")
    p.add_argument("--original-max-prompt", type=int, default=4096,
                   help="longest prompt the original is timed at (its O(N^2) prefill); longer ones are predicted")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--state-size", type=int, default=STATE_SIZE, help="the speed rows' state size (default: m2.to_recurrent's)")
    p.add_argument("--projection-nblocks", type=int, default=4)
    p.add_argument("--student", type=Path, default=None, help="a saved recovered WikiText student")
    p.add_argument("--sweep", default="4,8,16,32,64")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--name", default="generation")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompt_lens, args.new_tokens, args.conv_new_tokens, args.repeats = "64,256", 6, 4, 1
        args.layers, args.hidden, args.original_max_prompt, args.sweep = 2, 128, 64, "4,8"
        args.out = args.out or Path("runs/bench_smoke")
    return args


def build(args):
    """(original, {variant: model}, {variant: recurrent report}) for the speed rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    longest = max(int(n) for n in args.prompt_lens.split(",")) + max(args.new_tokens, 32) + 8
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.hidden // 64,
                        vocab_size=args.vocab, n_positions=longest)
    original = GPT2LMHeadModel(config).eval()
    models, reports = {"original": original}, {}
    for variant, settings in (("default", {}), ("monarch_projections", {"projection_nblocks": args.projection_nblocks})):
        converted = m2.convert(original, m2.ConvertConfig(**settings))
        reports[variant] = m2.to_recurrent(converted, state_size=args.state_size)
        models[f"conv_{variant}"], models[f"recurrent_{variant}"] = converted, reports[variant].model
    for model in models.values():
        model.generation_config.eos_token_id = None              # generate exactly the tokens asked for
        model.generation_config.pad_token_id = 0
    return original, models, reports


class _Stamps:
    """A logits processor that only records when generate() asks for each new token's scores."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate_seconds(model, ids, new_tokens: int) -> tuple[float, float]:
    """(total seconds, seconds per decoded token after the first) of one greedy generate() call."""
    from transformers import LogitsProcessorList

    stamps = _Stamps()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       use_cache=True, logits_processor=LogitsProcessorList([stamps]))
    total = time.perf_counter() - start
    per_token = (stamps.times[-1] - stamps.times[0]) / max(len(stamps.times) - 1, 1)
    return total, per_token


def decode_rates(models: dict, ids, new_tokens: dict, repeats: int) -> dict:
    """{name: decode tokens/s}: 1 / median seconds per token between the first and the last new token
    (the prefill is not counted), runs interleaved."""
    per_token = {k: [] for k in models}
    for r in range(repeats):
        for name, model in models.items():
            total, step = generate_seconds(model, ids, new_tokens[name])
            per_token[name].append(step)
            log(f"N={ids.shape[1]} repeat {r + 1}/{repeats} {name}: {total:.2f} s for {new_tokens[name]} tokens "
                f"({1000 * step:.1f} ms per decoded token)")
    return {k: 1 / max(statistics.median(v), 1e-9) for k, v in per_token.items()}


def bare_loop_rate(recurrent, prompt_len: int, tokens: int = 32) -> float:
    """Tokens/s of one-token steps through the recurrent model's own modules, without generate()."""
    from transformers import DynamicCache

    ids = torch.randint(0, recurrent.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache()
    with torch.no_grad():
        out = recurrent(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = recurrent(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
    return tokens / (time.perf_counter() - start)


def weight_bytes(model) -> int:
    """Bytes of the weights one token reads: every parameter but the position table (one row of it)."""
    total = 0
    for name, p in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        total += p[0].numel() * p.element_size() if name.endswith("wpe.weight") else p.numel() * p.element_size()
    return total


def state_bytes(reports: dict, cfg, n: int) -> dict:
    """Decode state per sequence after n tokens: KV cache, convolution cache (past w and u), recurrent."""
    layers, h = cfg.n_layer, cfg.n_embd
    short_window = 3 * h * 2                                  # the short conv's last kernel - 1 = 2 inputs
    return {"original": 2 * layers * n * h * FLOAT,
            "conv": layers * (2 * n * h + short_window) * FLOAT,
            "recurrent": reports["default"].state_bytes}


def predicted_rate(measured: dict[int, float], n: int) -> float:
    """Tokens/s at KV length n from a line through the measured per-token seconds against the KV length."""
    xs, ys = zip(*sorted((k, 1 / v) for k, v in measured.items()))
    if len(xs) == 1:
        return measured[xs[0]]
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    return 1 / (ys[-1] + slope * (n - xs[-1]))


def speed_rows(args, original, models, reports) -> list[dict]:
    # long: one row per prompt length, each with its measured/predicted figures and both bounds
    rows, measured_original = [], {}
    for n in (int(x) for x in args.prompt_lens.split(",")):
        ids = torch.randint(0, args.vocab, (1, n), generator=torch.Generator().manual_seed(1))
        timed = {k: m for k, m in models.items() if k != "original" or n <= args.original_max_prompt}
        tokens = {k: args.new_tokens if not k.startswith("conv") or n <= 4096 else args.conv_new_tokens for k in timed}
        for model in timed.values():                                     # warm-up (allocator, first calls)
            generate_seconds(model, ids[:, :64], 2)
        rates = decode_rates(timed, ids, tokens, args.repeats if n <= 4096 else args.long_repeats)
        if "original" in rates:
            measured_original[n] = rates["original"]
            original_rate, how = rates["original"], "measured"
        else:
            original_rate, how = predicted_rate(measured_original, n), "predicted from its per-token cost vs KV length"
        bare = bare_loop_rate(models["recurrent_default"], min(n, 4096))
        w_orig, w_rec = weight_bytes(original), weight_bytes(models["recurrent_default"])
        states = state_bytes(reports, original.config, n)
        row = {"prompt_len": n, "original_tokens_per_s": original_rate, "original_is": how,
               "converted_cached_tokens_per_s": rates["conv_default"],
               "recurrent_tokens_per_s": rates["recurrent_default"],
               "monarch_projections": {"converted_cached_tokens_per_s": rates["conv_monarch_projections"],
                                       "recurrent_tokens_per_s": rates["recurrent_monarch_projections"],
                                       "weight_bytes": weight_bytes(models["recurrent_monarch_projections"])},
               "state_bytes": states,
               "bounds": {"bytes_ratio": (w_orig + states["original"]) / (w_rec + states["recurrent"]),
                          "bare_loop_tokens_per_s": bare, "bare_loop_ratio": bare / original_rate},
               "weight_bytes": {"original": w_orig, "recurrent": w_rec}}
        row["recurrent_ratio"] = row["recurrent_tokens_per_s"] / original_rate
        row["monarch_projections"]["recurrent_ratio"] = rates["recurrent_monarch_projections"] / original_rate
        log(f"N={n}: original {original_rate:.2f} tok/s ({how}), conv {row['converted_cached_tokens_per_s']:.2f}, "
            f"recurrent {row['recurrent_tokens_per_s']:.2f} ({row['recurrent_ratio']:.2f}x; bytes bound "
            f"{row['bounds']['bytes_ratio']:.2f}x, bare loop {row['bounds']['bare_loop_ratio']:.2f}x)")
        rows.append(row)
    return rows


def _test_blocks(args, tokenizer):
    from m2convert.data import default_data_dir, pack_text

    data = args.data or default_data_dir()
    blocks, _ = pack_text(data / "wikitext2" / "test.txt", tokenizer, 128, on_bad="raise")
    return blocks[:64] if args.smoke else blocks


def greedy_agreement(conv, recurrent, blocks, prompts: int = 20, new_tokens: int = 64) -> float:
    """Share of generated positions where both forms pick the same token (greedy, the first 32 tokens
    of ``prompts`` test blocks as prompts)."""
    same = total = 0
    for model in (conv, recurrent):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    with torch.no_grad():
        for ids in blocks[:prompts, :32]:
            ids = ids[None]
            a = conv.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
            b = recurrent.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False)
            same += (a[0, 32:] == b[0, 32:]).sum().item()
            total += new_tokens
    return same / total


def fidelity(args) -> dict:
    """Perplexity of the convolution and recurrent forms of the recovered student, and the sweep."""
    from transformers import AutoTokenizer
    from wikitext_recovery import perplexity

    student = m2.from_pretrained(args.student).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    blocks = _test_blocks(args, tokenizer)
    ppl_conv = perplexity(student, blocks)
    log(f"student (convolution form) test ppl {ppl_conv:.3f}")
    sweep = []
    for s in (int(x) for x in args.sweep.split(",")):
        report = m2.to_recurrent(student, state_size=s)
        ppl = perplexity(report.model, blocks)
        fit_error = max(max(f.filter_error or 0, f.residual_error or 0) for f in report.layers)
        rate = decode_speed(report.model, args)
        sweep.append({"state_size": s, "fit_error": fit_error, "ppl": ppl, "ppl_change": ppl / ppl_conv - 1,
                      "tokens_per_s": rate, "state_bytes": report.state_bytes,
                      "layers": [vars(f) for f in report.layers]})
        log(f"state {s}: worst layer fit error {fit_error:.2e}, ppl {ppl:.3f} ({100 * (ppl / ppl_conv - 1):+.3f}%), "
            f"{rate:.2f} tok/s")
    meets = [r for r in sweep if abs(r["ppl_change"]) <= 0.005]
    chosen = min(meets, key=lambda r: r["state_size"]) if meets else max(sweep, key=lambda r: r["state_size"])
    recurrent = m2.to_recurrent(student, state_size=chosen["state_size"]).model
    agreement = greedy_agreement(student, recurrent, blocks, prompts=4 if args.smoke else 20,
                                 new_tokens=8 if args.smoke else 64)
    log(f"default state size {chosen['state_size']}: greedy agreement {agreement:.4f}")
    return {"state_size": chosen["state_size"], "meets_0.5_percent": bool(meets), "ppl_conv": ppl_conv,
            "ppl_recurrent": chosen["ppl"], "greedy_agreement": agreement, "sweep": sweep,
            "student": str(args.student), "student_params": count_params(student)}


def decode_speed(recurrent, args) -> float:
    """Decode tokens/s of a recurrent model after a prompt as long as its position table allows (<= 512)."""
    recurrent.generation_config.eos_token_id = None
    recurrent.generation_config.pad_token_id = 0
    limit = getattr(recurrent.config, "n_positions", 1024) - args.new_tokens - 1
    n = min(64 if args.smoke else 512, limit)
    ids = torch.randint(0, recurrent.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    generate_seconds(recurrent, ids[:, :32], 2)
    return decode_rates({"r": recurrent}, ids, {"r": args.new_tokens}, args.repeats)["r"]


def render(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        b, mp = r["bounds"], r["monarch_projections"]
        rows.append([r["prompt_len"], f"{r['original_tokens_per_s']:.2f}" + ("" if r["original_is"] == "measured"
                                                                          else " (predicted)"),
                     r["converted_cached_tokens_per_s"], r["recurrent_tokens_per_s"],
                     f"{r['recurrent_ratio']:.2f}x", f"{b['bytes_ratio']:.2f}x", f"{b['bare_loop_ratio']:.2f}x",
                     f"{mp['recurrent_tokens_per_s']:.2f} ({mp['recurrent_ratio']:.2f}x)"])
    speed = markdown_table(["prompt", "original (KV cache) tok/s", "conv cache tok/s", "recurrent tok/s",
                            "recurrent / original", "bytes bound", "bare-loop bound",
                            "recurrent, Monarch projections tok/s"], rows)
    mib = 1 / 2 ** 20
    states = markdown_table(["prompt", "KV cache MiB", "conv cache MiB", "recurrent state MiB"],
                            [[r["prompt_len"], r["state_bytes"]["original"] * mib, r["state_bytes"]["conv"] * mib,
                              r["state_bytes"]["recurrent"] * mib] for r in doc["rows"]])
    lines = ["## Decode speed (batch 1, greedy)", "", speed, "", "## Decode state per sequence", "", states, ""]
    if doc.get("fidelity_run"):
        run = doc["fidelity_run"]
        lines += [f"Fidelity and sweep: `{run['command']}`, {run['date']}, load average at the end "
                  f"{run['machine'].get('load_average_1_5_15min')}.", ""]
    rec = doc.get("recurrent")
    if rec:
        sweep = markdown_table(["state size", "worst layer fit error", "test ppl", "ppl change", "decode tok/s",
                                "state KiB"],
                               [[s["state_size"], f"{s['fit_error']:.2e}", s["ppl"], f"{100 * s['ppl_change']:+.3f}%",
                                 s["tokens_per_s"], s["state_bytes"] / 1024] for s in rec["sweep"]])
        lines += ["## Fidelity on the recovered WikiText student", "",
                  f"- convolution form test ppl {rec['ppl_conv']:.3f}; recurrent (state size {rec['state_size']}) "
                  f"{rec['ppl_recurrent']:.3f} ({100 * (rec['ppl_recurrent'] / rec['ppl_conv'] - 1):+.3f}%)",
                  f"- greedy 64-token continuations of 20 test prompts: {100 * rec['greedy_agreement']:.1f}% of "
                  "positions pick the same token", "", "### State-size sweep", "", sweep, ""]
    lines += [f"- {note}" for note in doc.get("notes", [])]
    return "\n".join(lines)


def attach_fidelity(args) -> dict:
    """Put a ``--fidelity-only`` report's fidelity and sweep (with its command, date, machine and config)
    into the speed report ``<out>/<name>.json``, and rewrite its markdown."""
    out = Path(args.out or RESULTS)
    doc = json.loads((out / f"{args.name}.json").read_text())
    fid = json.loads(args.attach_fidelity.read_text())
    doc["recurrent"] = fid["recurrent"]
    doc["fidelity_run"] = {k: fid[k] for k in ("command", "date", "machine")}
    doc["config"]["fidelity"] = fid["config"]
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {write_markdown(args.name, render, out)}")
    return doc


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.attach_fidelity is not None:
        return attach_fidelity(args)
    if args.fidelity_only:
        result = {"rows": [], "fit": {}, "notes": [], "recurrent": fidelity(args)}
    else:
        original, models, reports = build(args)
        log(f"original {count_params(original):,} parameters; converted {count_params(models['conv_default']):,}")
        result = {"rows": speed_rows(args, original, models, reports),
                  "fit": {v: [vars(f) for f in r.layers] for v, r in reports.items()}}
        result["notes"] = [
            "Decode tokens/s exclude the prefill: 1 / the median time between consecutive new tokens (from the "
            "first to the last of each generate() call), runs of the models interleaved.",
            "bytes bound: (original weights + KV cache) / (recurrent weights + state) read per token; bare-loop "
            "bound: one-token forward calls of the recurrent model with its cache, no generate(), against the "
            "original's generate().",
            f"recurrent form: m2.to_recurrent(state_size={args.state_size}); filters fitted over their default "
            "horizon."]
        if args.student is not None:
            result["recurrent"] = fidelity(args)
    path = write_report(args.name, result, config, render, args.out)
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
