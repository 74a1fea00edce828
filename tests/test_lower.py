"""The lowering pass: converted tiny BERT / GPT-2 graphs run the fused m2:: ops, with the same outputs;
chains that only look like a Monarch multiply or a long convolution are left alone and reported."""

import inspect

import pytest
import torch
from torch import nn

import m2convert as m2
from m2convert.errors import M2Error
from m2convert.kernels.testing import assert_close
from m2convert.layers import M2SequenceMixer, MonarchLinear
from m2convert.passes.lower import LowerResult, lower, lower_program
from m2convert.passes.pipeline import PassResult

MONARCH, CONV = "m2::monarch_matmul", "m2::gated_long_conv"
# A Monarch product followed by its bias (and activation) lowers to one m2::monarch_linear.
LINEAR = "m2::monarch_linear"
MONARCH_OPS = (MONARCH, LINEAR)
# What must not survive lowering: the Monarch GEMMs and every FFT / complex op of the convolutions.
REFERENCE_OPS = ("aten.bmm", "aten.matmul", "aten.fft_rfft", "aten.fft_irfft", "aten.real", "aten._conj")


def _ops(graph_module) -> list[str]:
    return [f"{n.target.namespace}.{n.target._opname}" for n in graph_module.graph.nodes
            if n.op == "call_function" and hasattr(n.target, "namespace")]


def _expected_sites(model: nn.Module) -> tuple[set, int]:
    """Paths of the MonarchLinear modules, and how many long convolutions the mixers run."""
    monarch = {name for name, m in model.named_modules() if isinstance(m, MonarchLinear)}
    convs = sum(1 + (m.residual_filter is not None) for m in model.modules() if isinstance(m, M2SequenceMixer))
    return monarch, convs


def _assert_fully_lowered(converted: nn.Module, lowered) -> None:
    result = lowered.result
    monarch, convs = _expected_sites(converted)
    assert monarch and convs                       # the fixture really is converted
    # A layer change that stops a chain from matching shows here as a missing site.
    assert {f.site for f in result.fused if f.op in MONARCH_OPS} == monarch
    assert result.count(MONARCH) + result.count(LINEAR) == len(monarch) and result.count(CONV) == convs
    assert result.unfused == [] and result.matched == len(monarch) + convs
    ops = _ops(lowered.exported.graph_module)
    monarch_ops = ops.count("m2.monarch_matmul") + ops.count("m2.monarch_linear")
    assert monarch_ops == len(monarch) and ops.count("m2.gated_long_conv") == convs
    assert not [op for op in ops if op in REFERENCE_OPS]
    complex_nodes = [n.name for n in lowered.exported.graph.nodes
                     if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()]
    assert complex_nodes == []


@pytest.fixture(scope="module")
def bert():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    converted = m2.convert(transformers.BertModel(cfg).eval())
    return converted, m2.lower(converted)


def _inputs(n: int, batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(1, 96, (batch, n), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, n // 2:] = 0                                      # last row padded
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_lowers_every_site_and_keeps_outputs(bert):
    converted, lowered = bert
    _assert_fully_lowered(converted, lowered)
    assert all(f.rule in ("monarch-bmm", "fft-conv") for f in lowered.result.fused)
    assert {f.detail.split(",")[0] for f in lowered.result.fused if f.op == CONV} == {"bidirectional"}
    with torch.no_grad():
        for n, batch in ((9, 2), (23, 3)):                     # lengths and batch other than the capture's
            inputs = _inputs(n, batch)
            assert_close(lowered(**inputs).last_hidden_state, converted(**inputs).last_hidden_state, 1e-5,
                         f"N={n}")


@pytest.mark.parametrize("mode,rule", [("causal", "fft-conv"), ("causal-monarch", "monarch-dft-conv")])
def test_gpt2_lowers_every_site_and_keeps_outputs(tiny_model, mode, rule):
    converted = m2.convert(tiny_model("gpt2"), m2.ConvertConfig(causal_mode=mode))
    inputs = _inputs(16)
    with torch.no_grad():
        want = converted(**inputs).logits                      # before capture: the DFT factors are cached
    lowered = lower(converted, example_inputs=inputs, dynamic=mode == "causal")  # static: see the mixer test
    _assert_fully_lowered(converted, lowered)
    assert {f.rule for f in lowered.result.fused if f.op == CONV} == {rule}
    assert {f.detail.split(",")[0] for f in lowered.result.fused if f.op == CONV} == {"causal"}
    with torch.no_grad():
        assert_close(lowered(**inputs).logits, want, 1e-5, mode)


def test_exporting_the_lowered_module_keeps_m2_ops(bert):
    converted, lowered = bert
    inputs = _inputs(12)
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(lowered, (), inputs, dynamic_shapes={k: {1: seq} for k in inputs}, strict=False)
    ops = _ops(ep.graph_module)
    assert "m2.monarch_linear" in ops and "m2.gated_long_conv" in ops
    assert not [op for op in ops if op in REFERENCE_OPS]
    with torch.no_grad():
        assert_close(ep.module()(**inputs).last_hidden_state, converted(**inputs).last_hidden_state, 1e-5)


def test_lowered_module_signature_modes_and_report(bert):
    _, lowered = bert
    params = inspect.signature(lowered.forward).parameters
    assert list(params)[:2] == ["input_ids", "attention_mask"] and params["use_cache"].default is False
    assert lowered.eval() is lowered and lowered.train().training     # the graph itself stays in eval mode
    result = lowered.result
    assert isinstance(result, LowerResult) and isinstance(result, PassResult) and result.name == "lower"
    text = str(result)
    assert text.startswith(f"lowering: {result.matched} sites fused, 0 left unfused")
    assert "encoder.layer.1.output.dense" in text and "taps from residual_filter" in text


def test_lowered_module_takes_the_models_optional_arguments(bert, capfd, monkeypatch):
    converted, lowered = bert
    monkeypatch.setenv("M2_DEBUG", "1")
    with torch.no_grad():
        for n, batch in ((7, 1), (23, 3)):        # batch 1 first: the new program still takes other batches
            inputs = _inputs(n, batch)
            ids = inputs["input_ids"]
            want = converted(input_ids=ids).last_hidden_state          # no mask: the model's own default
            assert_close(lowered(input_ids=ids).last_hidden_state, want, 1e-5, f"ids only, N={n}")
            assert_close(lowered(ids).last_hidden_state, want, 1e-5, f"positional, N={n}")
            assert_close(lowered(**inputs).last_hidden_state, converted(**inputs).last_hidden_state, 1e-5,
                         f"ids and mask, N={n}")
    assert capfd.readouterr().err.count("lowered again for the arguments (input_ids, use_cache)") == 1
    with pytest.raises(TypeError, match="attention_maks"):
        lowered(input_ids=ids, attention_maks=torch.ones_like(ids))
    with pytest.raises(TypeError, match="input_ids"):
        lowered(ids, input_ids=ids)
    with pytest.raises(TypeError, match="'attention_mask' is a list"):
        lowered(input_ids=ids, attention_mask=[1] * ids.shape[1])


def test_an_unlowered_set_of_arguments_is_refused_while_traced(bert):
    _, lowered = bert
    ids = _inputs(12)["input_ids"]
    with pytest.raises(M2Error, match=r"no program for the arguments \(input_ids, token_type_ids, use_cache\) yet"):
        torch.export.export(lowered, (), {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}, strict=False)


class _MixerThenMonarch(nn.Module):
    """A mask-free mixer (its gates read the split projections directly) and a MonarchLinear whose sizes
    need padding (24 -> 50 with 4 blocks: P 6, S 13, 52 outputs cut to 50)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mixer = M2SequenceMixer(24, mode=mode)
        self.proj = MonarchLinear(24, 50, nblocks=4)

    def forward(self, x):                                                # x: (B, N, 24)
        return self.proj(self.mixer(x))                                  # (B, N, 50)


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "causal-monarch"])
def test_mask_free_mixer_and_padded_monarch_lower_with_gradients(mode):
    torch.manual_seed(0)
    model = _MixerThenMonarch(mode).eval()
    x, x_ref = (torch.randn(2, 10, 24, generator=torch.Generator().manual_seed(2)).requires_grad_() for _ in "ab")
    want = model(x_ref)                                                  # before capture: DFT factors cached
    want.square().sum().backward()
    lowered = lower(model, example_inputs=(x.detach(),))
    result = lowered.result
    assert result.count(LINEAR) == 1 and result.count(CONV) == 2 and result.unfused == []   # cropped, with bias
    # A model export cannot capture with dynamic shapes falls back to static ones and says so.
    assert all(note.startswith("captured with static shapes") for note in result.notes)
    gated = next(f.detail for f in result.fused if "taps from filter" in f.detail)
    assert gated.endswith("pre-gate, post-gate")                         # v * x1 and x2 * (...) fused too
    out = lowered(x)
    out.square().sum().backward()
    assert_close(out, want, 1e-5, "forward")
    assert_close(x.grad, x_ref.grad, 1e-4, "input gradient")


class _LookAlikes(nn.Module):
    """A MonarchLinear beside two chains of the same ops that are not Monarch multiplies:
    one permutes within blocks instead of across them, one has factors whose block counts differ."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.monarch = MonarchLinear(12, 20, nblocks=4)
        self.w1 = nn.Parameter(torch.randn(4, 8, 3, generator=gen))      # (nb, nb * rho, P): nb 4, rho 2
        self.w2 = nn.Parameter(torch.randn(4, 5, 8, generator=gen))      # (nb, S, nb * rho)
        self.v1 = nn.Parameter(torch.randn(2, 4, 6, generator=gen))      # nb 2 ...
        self.v2 = nn.Parameter(torch.randn(1, 5, 4, generator=gen))      # ... then nb 1: no chain

    def forward(self, x):                                                # x: (B, N, 12)
        lead = x.shape[:-1]
        h = torch.bmm(x.reshape(-1, 4, 3).transpose(0, 1), self.w1.transpose(1, 2))   # (4, M, 8)
        h = h.reshape(4, -1, 4, 2).permute(0, 1, 3, 2).reshape(4, -1, 8)            # within-block permute
        y1 = torch.bmm(h, self.w2.transpose(1, 2)).transpose(0, 1).reshape(*lead, 20)
        g = torch.bmm(x.reshape(-1, 2, 6).transpose(0, 1), self.v1.transpose(1, 2))   # (2, M, 4)
        g = g.reshape(2, -1, 2, 2).permute(2, 1, 0, 3).reshape(1, -1, 4)            # (1, 2M, 4)
        y2 = torch.bmm(g, self.v2.transpose(1, 2)).reshape(*lead, 10)                # (1, 2M, 5) -> (B, N, 10)
        return torch.cat([self.monarch(x), y1, y2], dim=-1)                            # (B, N, 50)


def test_look_alike_chains_are_left_alone_and_reported(capfd, monkeypatch):
    monkeypatch.setenv("M2_DEBUG", "1")
    model, x = _LookAlikes().eval(), torch.randn(2, 5, 12)
    lowered = lower(model, example_inputs=(x,))
    result = lowered.result
    assert [f.site for f in result.fused] == ["monarch"] and result.count(LINEAR) == 1      # with its bias
    reasons = sorted(u.reason for u in result.unfused)
    assert len(reasons) == 2 and all(u.rule == "monarch-bmm" and u.site == "" for u in result.unfused)
    assert "do not chain" in reasons[0] and "(2, 4, 6) and (1, 5, 4)" in reasons[0]
    assert "something other than m2::monarch_matmul" in reasons[1]
    assert _ops(lowered.exported.graph_module).count("aten.bmm") == 4  # both look-alikes untouched
    with torch.no_grad():
        for shape in ((2, 5, 12), (3, 7, 12)):
            x = torch.randn(*shape)
            assert_close(lowered(x), model(x), 1e-6, str(shape))
    err = capfd.readouterr().err
    assert "rule monarch-bmm [reshape.bmm.permute.bmm -> m2::monarch_matmul] fired at 'monarch'" in err
    assert "rule monarch-bmm left '' at" in err


class _CircularConv(nn.Module):
    """rfft * mul * irfft of size N: a circular convolution, which wraps around, not the linear one."""

    def __init__(self, h: int = 3, n: int = 8):
        super().__init__()
        self.k = nn.Parameter(torch.randn(h, n, generator=torch.Generator().manual_seed(1)))

    def forward(self, u):                                                # u: (B, H, N)
        n = u.shape[-1]
        return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.k, n=n), n=n)


def test_circular_convolution_is_not_fused():
    ep = torch.export.export(_CircularConv(), (torch.randn(2, 3, 8),), strict=False)
    result = lower_program(ep)
    assert result.matched == 0 and len(result.unfused) == 1
    assert result.unfused[0].rule == "fft-conv"
    assert "something other than m2::gated_long_conv" in result.unfused[0].reason
    assert "aten.fft_irfft" in _ops(ep.graph_module)


def test_lower_rejects_what_is_not_a_model():
    with pytest.raises(M2Error, match="m2.lower expects a torch.nn.Module"):
        lower("bert-base-uncased")
