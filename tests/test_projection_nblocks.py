"""ConvertConfig.projection_nblocks: the sequence mixers' in/out projections as MonarchLinear.

Validation, plan prices against the real converted model, exactness at full rank, per-site overrides,
save/load, lowering, torch.export, the CLI flag and the benchmark scripts that read the setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import m2convert as m2
from m2convert.cli import main
from m2convert.errors import ConfigError, ConversionError
from m2convert.layers import MonarchLinear
from m2convert.layers.cost import B, N, evaluate, linear_flops
from m2convert.layers.monarch import monarch_shape

pytestmark = pytest.mark.usefixtures("one_thread")
H = 32                                                     # the tiny BERT's hidden size (conftest._bert)


def _small(**kw) -> m2.ConvertConfig:
    return m2.ConvertConfig(filter_order=16, **kw)


def _mixers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, m2.M2SequenceMixer)]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _monarch_flops(in_f: int, out_f: int, nblocks: int, rank: int):
    """Forward FLOPs of a biased Monarch in -> out layer, from its block sizes alone."""
    p, s, rho = monarch_shape(in_f, out_f, nblocks, rank)
    weights = nblocks * nblocks * rho * p + nblocks * s * nblocks * rho      # w1 + w2
    return B * N * (2 * weights + out_f)


@pytest.fixture(scope="module")
def bert():
    from conftest import _bert

    return _bert()


@pytest.fixture
def inputs(tiny_inputs):
    return tiny_inputs(11)


@pytest.mark.parametrize("value, needle", [
    (-1, "projection_nblocks=-1 is out of range [0, 4096]; use 0"),
    (4097, "projection_nblocks=4097 is out of range"),
    (2.0, "projection_nblocks must be an int"),
    (True, "projection_nblocks must be an int"),
])
def test_bad_values_raise_a_named_config_error(value, needle):
    with pytest.raises(ConfigError) as info:
        m2.ConvertConfig(projection_nblocks=value)
    assert needle in str(info.value)
    with pytest.raises(ConfigError, match=r"overrides\['x'\]\['projection_nblocks'\]"):
        m2.ConvertConfig(overrides={"x": {"projection_nblocks": value}})


def test_config_round_trips_and_old_dicts_mean_dense():
    cfg = m2.ConvertConfig(projection_nblocks=8, overrides={r"layer\.0\.": {"projection_nblocks": 0}})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["projection_nblocks"] == 8 and m2.ConvertConfig.from_dict(data) == cfg
    old = {k: v for k, v in m2.ConvertConfig().to_dict().items() if k != "projection_nblocks"}
    assert m2.ConvertConfig.from_dict(old).projection_nblocks == 0 == m2.ConvertConfig().projection_nblocks


@pytest.mark.parametrize("nblocks", [0, 4])
def test_plan_prices_the_converted_model(bert, nblocks):
    plan = m2.plan(bert, _small(projection_nblocks=nblocks))
    converted = plan.apply()
    # Parameters: the plan's total is the converted model's actual count.
    assert plan.totals()["params_after"] == _params(converted)
    # FLOPs of each mixer site: the projections' share follows their structure.
    dense_proj = linear_flops(H, 3 * H) + linear_flops(H, H)
    monarch_proj = _monarch_flops(H, 3 * H, 4, 1) + _monarch_flops(H, H, 4, 1)
    baseline = m2.plan(bert, _small())
    for site, base in zip(plan.converted, baseline.converted):
        if site.kind != "sequence":
            assert site.params_after == base.params_after
            continue
        assert site.settings["projection_nblocks"] == nblocks
        mixer = converted.get_submodule(site.fqn).mixer
        assert evaluate(site.flops_after, 512) == evaluate(mixer.flops(), 512)
        extra = 0 if nblocks == 0 else evaluate(monarch_proj - dense_proj, 512)
        assert evaluate(site.flops_after, 512) == evaluate(base.flops_after, 512) + extra
        if nblocks:
            assert extra < 0 and site.params_after < base.params_after
            assert "proj nblocks=4, rank=1" in site.replacement
        else:
            assert site.replacement == "M2PostNormAttention(bidirectional)"
    back = m2.RewritePlan.from_dict(json.loads(plan.to_json()))
    assert [s.to_dict() for s in back.sites] == [s.to_dict() for s in plan.sites]
    assert back.config.projection_nblocks == nblocks


def test_projections_become_monarch_and_outputs_stay_finite(bert, inputs):
    converted = m2.convert(bert, _small(projection_nblocks=4, rank=2))
    for mixer in _mixers(converted):
        for proj in (mixer.in_proj, mixer.out_proj):
            assert isinstance(proj, MonarchLinear) and (proj.nblocks, proj.rank) == (4, 2)
        assert (mixer.in_proj.in_features, mixer.in_proj.out_features) == (H, 3 * H)
    with torch.no_grad():
        out = converted(**inputs).last_hidden_state
    assert out.shape == (2, 11, H) and torch.isfinite(out).all()


@pytest.mark.parametrize("nblocks, rank", [(1, 1), (2, 2)])
def test_full_rank_monarch_projections_reproduce_the_dense_conversion(bert, inputs, nblocks, rank):
    # Each dense block has rank at most min(P, S); when rho reaches it the Frobenius projection is exact
    # (nblocks 1 at any rank; nblocks 2 from rank 2 at H 32).
    for out_f in (3 * H, H):
        p, s, rho = monarch_shape(H, out_f, nblocks, rank)
        assert rho == min(p, s)
    dense = m2.convert(bert, _small(rank=rank))                             # rank also sets the MLPs'
    monarch = m2.convert(bert, _small(projection_nblocks=nblocks, rank=rank))
    # The filters are randomly initialised: give both the same ones, so only the projections differ.
    shared = {k: v for k, v in dense.state_dict().items() if "_proj." not in k}
    missing, unexpected = monarch.load_state_dict(shared, strict=False)
    assert not unexpected and missing and all("_proj." in k for k in missing)
    for a, b in zip(_mixers(dense), _mixers(monarch)):
        torch.testing.assert_close(b.in_proj.to_dense(), a.in_proj.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.out_proj.bias, a.out_proj.bias, rtol=0, atol=0)
    with torch.no_grad():
        want, got = dense(**inputs).last_hidden_state, monarch(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Not a vacuous comparison: 4 blocks at the same rank is a real approximation.
    lossy = m2.convert(bert, _small(projection_nblocks=4, rank=rank))
    lossy.load_state_dict(shared, strict=False)
    with torch.no_grad():
        assert (lossy(**inputs).last_hidden_state - want).abs().max() > 1e-3


def test_save_and_load_round_trip_bit_equal(bert, inputs, tmp_path):
    converted = m2.convert(bert, _small(projection_nblocks=4))
    m2.save_pretrained(converted, tmp_path / "m2")
    meta = json.loads((tmp_path / "m2" / "m2convert.json").read_text())
    assert {s["settings"]["projection_nblocks"] for s in meta["plan"]["sites"] if s["kind"] == "sequence"} == {4}
    loaded = m2.from_pretrained(tmp_path / "m2")
    assert all(isinstance(m.out_proj, MonarchLinear) and m.out_proj.nblocks == 4 for m in _mixers(loaded))
    want, got = converted.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, converted(**inputs).last_hidden_state)


def test_old_plans_without_the_setting_build_dense_projections(bert):
    data = json.loads(m2.plan(bert, _small()).to_json())
    for site in data["sites"]:
        site["settings"].pop("projection_nblocks", None)
    data["config"].pop("projection_nblocks")
    with torch.device("meta"):
        empty = type(bert)(bert.config)
    built = m2.RewritePlan.from_dict(data).apply(model=empty, inplace=True, seed=False)
    assert all(type(m.in_proj) is nn.Linear for m in _mixers(built))


def test_an_override_applies_it_to_one_layer_only(bert):
    plan = m2.plan(bert, _small(overrides={r"layer\.0\.": {"projection_nblocks": 16}}))
    converted = plan.apply()
    first, second = (converted.encoder.layer[i].attention.mixer for i in (0, 1))
    assert isinstance(first.in_proj, MonarchLinear) and first.in_proj.nblocks == 16
    assert type(second.in_proj) is nn.Linear and type(second.out_proj) is nn.Linear
    assert converted.encoder.layer[0].intermediate.dense.nblocks == 4       # the MLP keeps its nblocks
    assert plan.totals()["params_after"] == _params(converted)


def test_more_blocks_than_the_width_skip_the_site_with_the_reason(bert):
    cfg = _small(overrides={r"layer\.1\.attention": {"projection_nblocks": 2 * H}})
    plan = m2.plan(bert, cfg)
    (skipped,) = plan.skipped
    assert skipped.fqn == "encoder.layer.1.attention"
    assert "proj nblocks=64" in skipped.reason and f"nblocks={2 * H} is out of range" in skipped.reason
    with pytest.raises(ConversionError, match="encoder.layer.1.attention"):
        m2.plan(bert, cfg.replace(strict=True)).apply()


def test_lowering_fuses_the_monarch_projections(bert, inputs):
    converted = m2.convert(bert, _small(projection_nblocks=4))
    lowered = m2.lower(converted)
    result = lowered.result
    monarch = {name for name, m in converted.named_modules() if isinstance(m, MonarchLinear)}
    projections = {f"encoder.layer.{i}.attention.mixer.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")}
    assert projections <= monarch
    assert {f.site for f in result.fused if f.op in ("m2::monarch_matmul", "m2::monarch_linear")} == monarch
    assert result.unfused == []
    with torch.no_grad():
        torch.testing.assert_close(lowered(**inputs).last_hidden_state, converted(**inputs).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_torch_export_runs_at_other_lengths(bert, tiny_inputs, tmp_path):
    converted = m2.convert(bert, _small(projection_nblocks=4))
    path = m2.export(converted, tiny_inputs(16), tmp_path / "bert.pt2")
    program = torch.export.load(str(path)).module()
    for n in (16, 37):
        feed = tiny_inputs(n)
        with torch.no_grad():
            torch.testing.assert_close(program(**feed)[0], converted(**feed).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)


def test_cli_flag_reaches_the_plan_and_the_saved_model(bert, tmp_path, capsys):
    bert.save_pretrained(tmp_path / "tiny-bert")
    assert main(["plan", str(tmp_path / "tiny-bert"), "--json", "--filter-order", "16",
                 "--projection-nblocks", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["projection_nblocks"] == 4
    seq = [s for s in data["sites"] if s["kind"] == "sequence"]
    assert [s["settings"]["projection_nblocks"] for s in seq] == [4, 4]
    assert all("proj nblocks=4" in s["replacement"] for s in seq)

    out = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "tiny-bert"), "--out", str(out), "--filter-order", "16",
                 "--projection-nblocks", "2"]) == 0
    assert m2.from_pretrained(out).encoder.layer[1].attention.mixer.out_proj.nblocks == 2
    capsys.readouterr()

    assert main(["plan", str(tmp_path / "tiny-bert"), "--projection-nblocks", "-3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("m2convert: error: projection_nblocks=-3 is out of range")


def test_benchmark_scripts_read_and_pass_the_setting(bert, benchmark_script):
    throughput = benchmark_script("throughput")
    cfg, shown = throughput.config_of({"nblocks": 16, "projection_nblocks": 16, "filter_order": 16})
    assert cfg.projection_nblocks == 16 and shown["projection_nblocks"] == 16
    old, _ = throughput.config_of({"nblocks": 4, "filter_order": 16})     # a report from before the flag
    assert old.projection_nblocks == 0
    assert not hasattr(throughput, "monarch_projections")
    assert throughput.FASTEST["projection_nblocks"] == 16

    sst2 = benchmark_script("sst2_recovery")
    args = sst2.parse_args(["--projection-nblocks", "4", "--filter-order", "16"])
    student = sst2.convert(bert, args)
    assert all(isinstance(m.in_proj, MonarchLinear) and m.in_proj.nblocks == 4 for m in _mixers(student))
    assert "projections nblocks 4" in sst2.conversion_text(vars(args))
    assert "projections" not in sst2.conversion_text({**vars(args), "projection_nblocks": 0})
    legacy = {k: v for k, v in vars(args).items() if k != "projection_nblocks"}
    assert "projections" not in sst2.conversion_text(legacy)


def test_benchmark_hybrid_keeps_the_named_attention_layers(bert, benchmark_script):
    sst2 = benchmark_script("sst2_recovery")
    args = sst2.parse_args(["--keep-attention", "0", "--filter-order", "16"])
    student = sst2.convert(bert, args)
    mixers = [path for path, m in student.named_modules() if isinstance(m, m2.M2SequenceMixer)]
    layers = len(bert.encoder.layer) if hasattr(bert, "encoder") else len(bert.bert.encoder.layer)
    assert len(mixers) == layers - 1 and not any("layer.0." in path for path in mixers)
    assert "attention kept dense in layer(s) 0" in sst2.conversion_text(vars(args))
