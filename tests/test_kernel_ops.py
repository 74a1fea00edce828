"""The m2:: operators on the CPU: numerics, autograd, fake kernels, torch.export and torch.compile."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2convert.kernels.fftconv.reference import gated_long_conv
from m2convert.kernels.monarch.reference import monarch_matmul
from m2convert.kernels.ops import gated_long_conv_op, monarch_matmul_op
from m2convert.kernels.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]


def _monarch_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 12, generator=g, dtype=dtype)                # nb=4, P=3
    return x, torch.randn(4, 8, 3, generator=g, dtype=dtype), torch.randn(4, 5, 8, generator=g, dtype=dtype)


def _conv_args(bidirectional=True, skip=True, dtype=torch.float32, b=2, h=3, n=9):
    g = torch.Generator().manual_seed(0)
    v, x1, x2 = (torch.randn(b, h, n, generator=g, dtype=dtype) for _ in range(3))
    k = torch.randn(h, n, generator=g, dtype=dtype)
    k_rev = torch.randn(h, n, generator=g, dtype=dtype) if bidirectional else None
    D = torch.randn(h, generator=g, dtype=dtype) if skip else None
    return v, x1, x2, k, k_rev, D


CONV_CASES = [(True, True), (False, True), (True, False), (False, False)]


def test_schemas_take_optional_filters():
    schema = str(torch.ops.m2.gated_long_conv.default._schema)
    assert "Tensor? k_rev" in schema and "Tensor? D" in schema
    assert str(torch.ops.m2.monarch_matmul.default._schema).startswith("m2::monarch_matmul(Tensor x")


def test_monarch_op_matches_reference_with_gradients():
    args = [t.double().requires_grad_() for t in _monarch_args()]
    assert_close(monarch_matmul_op(*args), monarch_matmul(*args), name="y")
    assert torch.autograd.gradcheck(monarch_matmul_op, args, fast_mode=True)


@pytest.mark.parametrize("bidirectional,skip", CONV_CASES)
def test_conv_op_matches_reference_with_gradients(bidirectional, skip):
    args = [t.double().requires_grad_() if t is not None else None
            for t in _conv_args(bidirectional, skip, b=2, h=2, n=6)]
    assert_close(gated_long_conv_op(*args), gated_long_conv(*args), name="y")
    assert torch.autograd.gradcheck(gated_long_conv_op, args, fast_mode=True)


@pytest.mark.parametrize("bidirectional,skip", [(True, True), (False, False)])
def test_opcheck_schema_fake_and_autograd_registration(bidirectional, skip):
    torch.library.opcheck(torch.ops.m2.monarch_matmul.default, _monarch_args())
    torch.library.opcheck(torch.ops.m2.gated_long_conv.default, _conv_args(bidirectional, skip))


class _TinyMixer(torch.nn.Module):
    """Monarch projection (12 -> 20 features) followed by a bidirectional gated long convolution."""

    def __init__(self):
        super().__init__()
        _, w1, w2 = _monarch_args()
        self.w1, self.w2 = torch.nn.Parameter(w1), torch.nn.Parameter(w2)
        self.k = torch.nn.Parameter(torch.randn(20, 16) / 4)
        self.k_rev = torch.nn.Parameter(torch.randn(20, 16) / 4)
        self.D = torch.nn.Parameter(torch.randn(20))

    def forward(self, x):                                          # x: (B, N=16, 12)
        y = monarch_matmul_op(x, self.w1, self.w2).transpose(1, 2)  # (B, 20, N)
        return gated_long_conv_op(y, y.sigmoid(), y, self.k, self.k_rev, self.D)

    def reference(self, x):
        y = monarch_matmul(x, self.w1, self.w2).transpose(1, 2)
        return gated_long_conv(y, y.sigmoid(), y, self.k, self.k_rev, self.D)


def test_export_graph_holds_m2_ops():
    model, x = _TinyMixer(), torch.randn(2, 16, 12)
    ep = torch.export.export(model, (x,))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.m2.monarch_matmul.default in targets
    assert torch.ops.m2.gated_long_conv.default in targets
    assert_close(ep.module()(x), model.reference(x), name="exported")


@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex")
def test_compile_fullgraph_forward_and_backward():
    model = _TinyMixer()
    x = torch.randn(2, 16, 12, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    ref = model.reference(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *model.parameters()])
    assert_close(out, ref, name="compiled")
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, 1e-4, "compiled grad")


def _run(code_or_args, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_importing_ops_loads_no_kernel_module():
    code = ("import sys, torch; import m2convert.kernels.ops as ops; "
            "assert not any(m.endswith(('triton_monarch', 'triton_fftconv')) for m in sys.modules); "
            "print(ops.monarch_matmul_op(torch.ones(1, 4), torch.ones(2, 2, 2), torch.ones(2, 3, 2)).shape)")
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 6])" in done.stdout


def test_benchmark_without_cuda_fails_clearly_and_checks_on_cpu(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_kernels.py")
    if not torch.cuda.is_available():
        plain = _run([script, "--out", str(tmp_path / "r.json")])
        assert plain.returncode != 0 and not (tmp_path / "r.json").exists()
        assert len(plain.stderr.strip().splitlines()) == 1 and "CUDA" in plain.stderr
    checked = _run([script, "--check-cpu", "--skip-compile"])  # compile: test_compile_fullgraph_...
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "FAIL" not in checked.stdout and checked.stdout.count(" ok") == 12
