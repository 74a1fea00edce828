"""Check every fused kernel against its reference on a CUDA GPU, then time it against its baseline.

    python benchmarks/gpu_kernels.py               # about 3 minutes on an H200; writes the JSON below
    python benchmarks/gpu_kernels.py --check-cpu   # tiny sizes on the CPU, Triton interpreter (checks only)

Every check draws fresh random inputs and runs with NaN-poisoned allocations (an unwritten output
fails). Timings are triton.testing.do_bench medians in bf16:
  - Monarch multiply (nblocks 4, rank 1 as MonarchLinear builds it) at d in {1024, 4096, 8192} on
    8192 tokens, against a dense cuBLAS matmul of the same (d -> d) shape; both also as TFLOP/s of
    useful work (2 * multiply-adds of the structured product, or of the dense one).
  - Gated long convolution (bidirectional and causal) at N in {1024, 4096, 16384}, 4 x 768 rows,
    against the torch.fft reference. Lengths beyond the kernel's MAX_N are reported as unsupported.
Results: benchmarks/results/gpu_kernels.json (rows: kernel, shape, max_rel_err, ms, baseline_ms, ratio,
device, ...; top level: command, date, machine, config).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

GPU_CONFIG = {"dtype": "bfloat16", "tokens": 8192, "nblocks": 4, "d": [1024, 4096, 8192],
              "batch": 4, "channels": 768, "N": [1024, 4096, 16384], "tolerance": {"bfloat16": 3e-2}}
CPU_CONFIG = {"dtype": "float32", "tokens": 37, "nblocks": 3, "d": [15],
              "batch": 2, "channels": 3, "N": [50], "tolerance": {"float32": 1e-4}}
OUT = Path(__file__).resolve().parent / "results" / "gpu_kernels.json"


def monarch_shape(d: int, nb: int) -> tuple[int, int, int]:
    """(P, S, rho) of a square d -> d MonarchLinear with nb blocks and rank 1."""
    p = -(-d // nb)
    return p, p, -(-p // nb)


def _inputs_monarch(m, d, nb, dtype, device):
    p, s, rho = monarch_shape(d, nb)
    x = torch.randn(m, nb * p, device=device, dtype=dtype)
    w1 = (torch.randn(nb, nb * rho, p, device=device) / p ** 0.5).to(dtype)
    w2 = (torch.randn(nb, s, nb * rho, device=device) / (nb * rho) ** 0.5).to(dtype)
    return x, w1, w2


def _inputs_conv(b, h, n, bidirectional, dtype, device):
    v, x1, x2 = (torch.randn(b, h, n, device=device, dtype=dtype) for _ in range(3))
    k = (torch.randn(h, n, device=device) / n ** 0.5).to(dtype)
    k_rev = (torch.randn(h, n, device=device) / n ** 0.5).to(dtype) if bidirectional else None
    return v, x1, x2, k, k_rev, torch.randn(h, device=device, dtype=dtype)


def _check(fn, ref, args, testing) -> tuple[float, float]:
    """(forward error, worst gradient error) of fn vs ref (ref in fp32 on the same rounded inputs)."""
    ins = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    with testing.poison_empty():
        y = fn(*ins)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [a for a in ins if a is not None], dy)
    ref_ins = [a.detach().float().requires_grad_() if a is not None else None for a in args]
    y_ref = ref(*ref_ins)
    ref_grads = torch.autograd.grad(y_ref, [a for a in ref_ins if a is not None], dy.float())
    return testing.rel_err(y, y_ref), max(testing.rel_err(g, r) for g, r in zip(grads, ref_grads))


def _bench(fn) -> float:
    """Median milliseconds per call (on the CPU, one timed call: it only exercises the code path)."""
    if not torch.cuda.is_available():
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _fwd_bwd(fn, args):
    ins = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    leaves = [a for a in ins if a is not None]
    dy = fn(*ins).detach().clone().normal_()

    def run():
        y = fn(*ins)
        torch.autograd.grad(y, leaves, dy)
    return run


def monarch_rows(cfg, device, timing, tol, kernels) -> list[dict]:
    tm, ref, ops, testing = kernels["monarch"], kernels["monarch_ref"], kernels["ops"], kernels["testing"]
    dtype = getattr(torch, cfg["dtype"])
    rows = []
    for d in cfg["d"]:
        nb, m = cfg["nblocks"], cfg["tokens"]
        p, s, rho = monarch_shape(d, nb)
        shape = {"M": m, "d": d, "nb": nb, "P": p, "S": s, "rho": rho}
        args = _inputs_monarch(m, d, nb, dtype, device)
        err_f, err_b = _check(tm.monarch_matmul_triton, ref, args, testing)
        # The m2:: op (wrap_triton launches on a GPU, the reference on the CPU) must agree as well.
        op_f, op_b = _check(ops.monarch_matmul_op, ref, _inputs_monarch(m, d, nb, dtype, device), testing)
        err_f, err_b = max(err_f, op_f), max(err_b, op_b)
        row_f = {"kernel": "monarch_matmul.fwd", "shape": shape, "dtype": cfg["dtype"], "tolerance": tol,
                 "max_rel_err": err_f}
        row_b = {**row_f, "kernel": "monarch_matmul.fwd+bwd", "max_rel_err": err_b}
        if timing:
            x, w1, w2 = _inputs_monarch(m, d, nb, dtype, device)
            dense = torch.randn(d, d, device=device, dtype=dtype)
            useful = 2 * m * (w1.numel() + w2.numel())                  # multiply-adds of both factors
            row_f.update(ms=_bench(lambda: tm.monarch_matmul_triton(x, w1, w2)),
                         baseline="dense cuBLAS x @ W.T", baseline_ms=_bench(lambda: x @ dense.T),
                         reference_ms=_bench(lambda: ref(x, w1, w2)),
                         useful_flop=useful, dense_flop=2 * m * d * d)
            row_b.update(ms=_bench(_fwd_bwd(tm.monarch_matmul_triton, (x, w1, w2))),
                         baseline="dense cuBLAS fwd+bwd",
                         baseline_ms=_bench(_fwd_bwd(lambda a, w: a @ w.T, (x, dense))),
                         useful_flop=3 * useful, dense_flop=6 * m * d * d)
            for row in (row_f, row_b):
                row["tflops"] = row["useful_flop"] / row["ms"] / 1e9
                row["baseline_tflops"] = row["dense_flop"] / row["baseline_ms"] / 1e9
        rows += [row_f, row_b]
    return rows


def conv_rows(cfg, device, timing, tol, kernels) -> list[dict]:
    tf, ref, ops, testing = kernels["fftconv"], kernels["fftconv_ref"], kernels["ops"], kernels["testing"]
    dtype = getattr(torch, cfg["dtype"])
    b, h = cfg["batch"], cfg["channels"]
    rows = []
    for n in cfg["N"]:
        for mode in ("bidirectional", "causal"):
            bidir = mode == "bidirectional"
            row_f = {"kernel": f"gated_long_conv.{mode}.fwd", "shape": {"B": b, "H": h, "N": n},
                     "dtype": cfg["dtype"], "tolerance": tol, "baseline": "torch.fft reference"}
            row_b = {**row_f, "kernel": f"gated_long_conv.{mode}.fwd+bwd"}
            args = _inputs_conv(b, h, n, bidir, dtype, device)
            if timing:
                row_f["baseline_ms"] = _bench(lambda: ref(*args))
                row_b["baseline_ms"] = _bench(_fwd_bwd(ref, args))
            if n > tf.MAX_N:
                row_f["unsupported"] = row_b["unsupported"] = f"N > MAX_N = {tf.MAX_N}"
                rows += [row_f, row_b]
                continue
            err_f, err_b = _check(tf.gated_long_conv_triton, ref, args, testing)
            op_args = _inputs_conv(b, h, n, bidir, dtype, device)
            op_f, op_b = _check(ops.gated_long_conv_op, ref, op_args, testing)
            err_f, err_b = max(err_f, op_f), max(err_b, op_b)
            row_f["max_rel_err"], row_b["max_rel_err"] = err_f, err_b
            if timing:
                row_f["ms"] = _bench(lambda: tf.gated_long_conv_triton(*args))
                row_b["ms"] = _bench(_fwd_bwd(tf.gated_long_conv_triton, args))
            rows += [row_f, row_b]
    return rows


def compile_row(device, kernels) -> dict:
    """torch.compile(fullgraph=True) of the two m2:: ops, forward and backward, on the device."""
    ops, testing = kernels["ops"], kernels["testing"]
    x, w1, w2 = _inputs_monarch(64, 64, 4, torch.float32, device)

    def f(x, w1, w2):
        y = ops.monarch_matmul_op(x, w1, w2).T.reshape(1, 64, 64)           # (B=1, H=64, N=64)
        return ops.gated_long_conv_op(y, y, y, w1.reshape(64, 16).repeat(1, 4), None, None)  # k: (64, 64)

    args = [a.requires_grad_() for a in (x, w1, w2)]
    eager = torch.autograd.grad(f(*args).square().sum(), args)
    out = torch.compile(f, fullgraph=True)(*args)
    compiled = torch.autograd.grad(out.square().sum(), args)
    err = max(testing.rel_err(a, b) for a, b in zip(compiled, eager))
    return {"kernel": "torch.compile(m2 ops).fwd+bwd", "shape": {"d": 64, "N": 64}, "dtype": "float32",
            "max_rel_err": err, "tolerance": 1e-4}


def _load(check_cpu: bool) -> dict:
    if check_cpu:
        os.environ["TRITON_INTERPRET"] = "1"                     # before triton.jit defines the kernels
    from m2convert.kernels import ops, testing
    from m2convert.kernels.fftconv import reference as fref
    from m2convert.kernels.monarch import reference as mref
    load = testing.load_interpreted if check_cpu else importlib.import_module
    return {"monarch": load("m2convert.kernels.monarch.triton_monarch"), "monarch_ref": mref.monarch_matmul,
            "fftconv": load("m2convert.kernels.fftconv.triton_fftconv"), "fftconv_ref": fref.gated_long_conv,
            "ops": ops, "testing": testing}


def _fmt(v, spec):
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    print(f"{'kernel':38} {'shape':38} {'dtype':8} {'rel_err':>9} {'ms':>9} {'base_ms':>9} {'ratio':>7} "
          f"{'TFLOP/s':>8}  status")
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        print(f"{r['kernel']:38} {shape:38} {r['dtype']:8} {_fmt(r.get('max_rel_err'), '9.2e')} "
              f"{_fmt(r.get('ms'), '9.3f')} {_fmt(r.get('baseline_ms'), '9.3f')} {_fmt(r.get('ratio'), '7.2f')} "
              f"{_fmt(r.get('tflops'), '8.1f')}  {r['status']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-cpu", action="store_true",
                        help="tiny sizes on the CPU under TRITON_INTERPRET=1 (checks; timings are not meaningful)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile check")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (GPU default: {OUT})")
    args = parser.parse_args(argv)
    if not args.check_cpu and not torch.cuda.is_available():
        print("gpu_kernels.py: no CUDA device; run it on a GPU machine, or pass --check-cpu for the "
              "correctness checks under the Triton interpreter", file=sys.stderr)
        return 2
    kernels = _load(args.check_cpu)
    cfg, device = (CPU_CONFIG, "cpu") if args.check_cpu else (GPU_CONFIG, "cuda")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (triton interpreter)"
    torch.manual_seed(0)
    tol = cfg["tolerance"][cfg["dtype"]]
    rows = monarch_rows(cfg, device, True, tol, kernels) + conv_rows(cfg, device, True, tol, kernels)
    if args.check_cpu:
        # The float32 checks again in bf16: the interpreter paths that round through 16-bit types.
        rows += monarch_rows({**cfg, "dtype": "bfloat16"}, device, False, 3e-2, kernels)
        rows += conv_rows({**cfg, "dtype": "bfloat16"}, device, False, 3e-2, kernels)
    if not args.skip_compile:
        rows.append(compile_row(device, kernels))
    for row in rows:
        row["device"] = device_name
        if row.get("ms") and row.get("baseline_ms"):
            row["ratio"] = row["ms"] / row["baseline_ms"]
        err = row.get("max_rel_err")
        row["status"] = ("unsupported" if row.get("unsupported") else
                         "ok" if err is not None and err <= row["tolerance"] else "FAIL")
    print_table(rows)
    out = args.out or (None if args.check_cpu else OUT)
    if out is not None:
        import triton
        report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": {"device": device_name, "host": platform.node(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "triton": triton.__version__},
                  "config": cfg, "rows": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    failed = [r["kernel"] for r in rows if r["status"] == "FAIL"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
