"""The plan's memory prediction: per-site activation counts, the plan column and totals, the saved plan,
and the predicted peak against the measured one on an encoder large enough to measure."""

import pytest
import torch
import transformers

import m2convert as m2
from m2convert.bench_memory import live_peak_mb
from m2convert.passes.memory import KERNEL_BUFFERS, kernel_elements, predicted_peak, site_elements
from m2convert.passes.plan import RewritePlan


def _bert(h=64, inter=256, layers=2, act="gelu", positions=512):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=h, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=inter, hidden_act=act, max_position_embeddings=positions)
    return transformers.BertModel(cfg).eval()


def test_site_counts_follow_what_each_form_keeps_alive():
    h, i = 768, 3072
    assert site_elements("mlp", h, i) == 2 * h + h + 2 * i                   # fc1 output and activation
    assert site_elements("mlp", h, i, folded=True) == 2 * h + 4 * h + i      # one intermediate, then fc2/sum/norm
    assert site_elements("mlp", h, i, chained=True) == 6 * h                 # no whole intermediate
    assert site_elements("mlp", h, i, gated=True) == 3 * h + 3 * i
    assert site_elements("attention", h) == 6 * h
    assert site_elements("attention", 64, converted=True) == 2 * 64 + 64 + 3 * 64


def test_plan_reports_per_site_counts_and_the_predicted_peak():
    plan = m2.plan(_bert(), m2.ConvertConfig(seq_len=4096))
    mlp = [s for s in plan.converted if s.kind == "dimension"]
    assert [(s.act_before, s.act_after) for s in mlp] == [(3 * 64 + 2 * 256, 6 * 64)] * 2
    memory = plan.memory()
    assert memory["seq_len"] == 4096 and memory["elements_before"] == 3 * 64 + 512
    assert memory["after"] == predicted_peak(6 * 64, 4096) == 4096 * 6 * 64 * 4 + KERNEL_BUFFERS
    assert memory["before"] == 4096 * (3 * 64 + 2 * 256) * 4
    text = str(plan)
    assert "fp32 KiB/token at peak" in text and "predicted prefill memory at N=4096" in text
    again = RewritePlan.from_dict(plan.to_dict())
    assert again.memory() == memory and plan.to_dict()["memory"] == memory


def test_kernel_buffers_count_only_while_the_kernels_run():
    h, i = 768, 3072
    assert kernel_elements("mlp", h, i, chained=True) == 4 * h               # stream, input, fc2 output
    assert kernel_elements("attention", h, converted=True) == 4 * h          # stream, output, a 256-channel group
    assert kernel_elements("mlp", h, i, folded=True) == site_elements("mlp", h, i, folded=True)
    plan = m2.plan(_bert(h=h, inter=i, layers=1))
    mlp = next(s for s in plan.converted if s.kind == "dimension")
    assert (mlp.act_after, mlp.act_kernels) == (6 * h, 4 * h)
    n = 1024                                  # the buffers outweigh the 2H the MLP adds after its groups
    assert plan.memory(n)["after"] == 4 * h * n * 4 + KERNEL_BUFFERS > 6 * h * n * 4
    assert RewritePlan.from_dict(plan.to_dict()).memory(n) == plan.memory(n)
    old = plan.to_dict()
    for site in old["sites"]:
        site.pop("act_kernels")                                             # a plan saved before the field
    assert RewritePlan.from_dict(old).memory(n)["after"] == 6 * h * n * 4 + KERNEL_BUFFERS


def test_plan_says_when_the_kernels_fixed_buffers_set_the_peak():
    """At short N the converted model's predicted peak is the kernels' fixed buffers, while every site's
    per-token memory falls: the summary says so instead of showing a bare rise."""
    plan = m2.plan(_bert(), m2.ConvertConfig(seq_len=64))
    memory = plan.memory()
    assert memory["kernel_buffers"] == KERNEL_BUFFERS and memory["after"] > memory["before"]
    assert "the CPU kernels' working buffers, the same at every N" in str(plan)
    long = m2.plan(_bert(), m2.ConvertConfig(seq_len=1 << 16))
    assert long.memory()["after"] < long.memory()["before"]
    assert "working buffers" not in str(long)


def test_unconverted_sites_count_as_they_are():
    model = _bert()
    plan = m2.plan(model, m2.ConvertConfig(dimension=False))
    assert plan.memory()["elements_after"] == 3 * 64 + 2 * 256           # the dense MLPs still peak


def test_predicted_peak_within_25_percent_of_the_live_tensors():
    n = 16384
    converted = m2.convert(_bert(h=256, inter=1024, layers=3, positions=n)).eval()
    predicted = RewritePlan.from_dict(converted.m2convert_plan).memory(n)["after"] / 2**20
    ids = torch.randint(0, 200, (1, n))
    with torch.inference_mode():
        converted(input_ids=torch.ones(1, 64, dtype=torch.long))              # thread pools, FFT plans
        measured = live_peak_mb(lambda: converted(input_ids=ids))
    if measured is None:
        pytest.fail("this test needs glibc's mallinfo2 to measure the live tensors")
    assert abs(predicted / measured - 1) <= 0.25, (predicted, measured)
