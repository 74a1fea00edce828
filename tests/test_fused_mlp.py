"""The fused Monarch MLP: activations folded into the first projection by the plan, the token-chunked
(chained) MLP, their lowered forms (m2::monarch_linear, the channel-blocked m2::gated_long_conv), each held
to the unfused reference at float32 1e-5."""

import copy

import pytest
import torch
import transformers
from torch import nn

import m2convert as m2
from m2convert.bench import measure_peak_mb
from m2convert.kernels.fftconv.cpu import gated_conv
from m2convert.kernels.fftconv.reference import gated_long_conv
from m2convert.kernels.monarch.cpu import monarch_linear as cpu_monarch
from m2convert.kernels.monarch.reference import monarch_matmul
from m2convert.kernels.ops import monarch_linear_op
from m2convert.kernels.testing import assert_close
from m2convert.layers import MonarchLinear
from m2convert.layers import chained
from m2convert.layers.chained import DeferredOutput


def _bert(act="gelu", layers=2, h=64, inter=256):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=h, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=inter, hidden_act=act, max_position_embeddings=4096)
    return transformers.BertModel(cfg).eval()


def _unfolded(converted, original):
    """The converted model with every folded activation put back as the original's module."""
    plain = copy.deepcopy(converted)
    for site in plain.m2convert_plan["sites"]:
        layout = site.get("layout") or {}
        if site["status"] == "convert" and layout.get("fold"):
            fc = plain.get_submodule(site["roles"][layout["fold_role"]]["path"])
            fc.activation, fc.chain_output = None, False
            parent, _, name = layout["fold_module"].rpartition(".")
            setattr(plain.get_submodule(parent), name, copy.deepcopy(original.get_submodule(layout["fold_module"])))
    return plain


@pytest.mark.parametrize("act,fold", [("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("relu", "relu"),
                                      ("silu", "silu")])
def test_plan_folds_the_activation_module_and_outputs_stay(act, fold):
    model = _bert(act)
    plan = m2.plan(model)
    mlps = [s for s in plan.converted if s.kind == "dimension"]
    assert [(s.layout.fold, s.layout.fold_role) for s in mlps] == [(fold, "fc1")] * 2
    assert [s.layout.fold_module for s in mlps] == [f"encoder.layer.{i}.intermediate.intermediate_act_fn"
                                                    for i in range(2)]
    converted = plan.apply().eval()
    layer = converted.encoder.layer[0]
    assert isinstance(layer.intermediate.intermediate_act_fn, nn.Identity)
    assert layer.intermediate.dense.activation == fold and layer.intermediate.dense.chain_output
    plain = _unfolded(converted, model)
    assert not isinstance(plain.encoder.layer[0].intermediate.intermediate_act_fn, nn.Identity)
    ids = torch.randint(0, 100, (2, 2500))                     # 5000 tokens: fc2 takes fc1's output chained
    with torch.no_grad():
        want = plain(input_ids=ids).last_hidden_state
        assert_close(converted(input_ids=ids).last_hidden_state, want, 1e-5, act)
        with m2.layers.monarch.fast_paths(monarch=False, mixer=False):          # the reference path folds too
            assert_close(converted(input_ids=ids).last_hidden_state, want, 1e-5, act)


class _Scaled(nn.Module):
    """Named like GELU, computes something else: no MonarchLinear activation reproduces it."""

    def forward(self, x):
        return nn.functional.gelu(1.5 * x)


class _LearnedGelu(nn.Module):
    """A GELU with a learned input scale: a parameter the projection could not carry."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return nn.functional.gelu(self.scale * x)


class _MLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(32, 128), act, nn.Linear(128, 32)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("act", [_Scaled(), _LearnedGelu(), nn.GELU()])
def test_activations_that_cannot_fold_stay_modules(act):
    model = nn.Sequential(_MLP(act)).eval()
    plan = m2.plan(model, example_inputs=(torch.randn(2, 16, 32),))
    (site,) = [s for s in plan.sites if s.kind == "dimension"]
    assert site.status == "convert"
    folds = isinstance(act, nn.GELU)                                   # the control: a plain GELU folds
    assert (site.layout.fold, site.layout.fold_module) == (("gelu", "0.act") if folds else (None, None))
    converted = plan.apply().eval()
    assert isinstance(converted[0].act, nn.Identity if folds else type(act))
    assert converted[0].fc1.activation == ("gelu" if folds else None)
    x = torch.randn(2, 16, 32)
    mlp = converted[0]
    with torch.no_grad():
        mlp.fc1.activation = None                                      # the unfused form: act after fc1
        want = x + mlp.fc2(act(mlp.fc1(x)))
        mlp.fc1.activation = site.layout.fold
        assert_close(converted(x), want, 1e-5)


def test_deferred_output_read_by_a_hook_gets_its_values(monkeypatch):
    monkeypatch.setattr(chained, "CHAIN_BYTES", 64 * 128 * 4)            # groups of 256 tokens
    model = _bert()
    converted = m2.convert(model).eval()
    seen = []
    act = converted.encoder.layer[1].intermediate.intermediate_act_fn
    act.register_forward_hook(lambda mod, args, out: seen.append((type(out).__name__, out.sum().item())))
    ids = torch.randint(0, 100, (1, 1000))
    with torch.no_grad():
        got = converted(input_ids=ids).last_hidden_state
        plain = _unfolded(converted, model)
        sums = []
        plain.encoder.layer[1].intermediate.intermediate_act_fn.register_forward_hook(
            lambda mod, args, out: sums.append(out.sum().item()))
        want = plain(input_ids=ids).last_hidden_state
    assert seen[0][0] == "DeferredOutput" and seen[0][1] == pytest.approx(sums[0], rel=1e-5)
    assert_close(got, want, 1e-5)


def test_chained_mlp_holds_one_group_not_the_intermediate():
    torch.manual_seed(0)
    fc1 = MonarchLinear(256, 1024, activation="gelu")
    fc2 = MonarchLinear(1024, 256)
    x = torch.randn(1, 16384, 256)                                        # intermediate: 64 MiB
    with torch.inference_mode():
        fc1.chain_output = False
        plain_mb, want = measure_peak_mb(lambda: fc2(fc1(x)))
        fc1.chain_output = True
        deferred = fc1(x)
        assert isinstance(deferred, DeferredOutput) and deferred.shape == (1, 16384, 1024)
        chained_mb, got = measure_peak_mb(lambda: fc2(fc1(x)))
    assert_close(got, want, 1e-5)
    if plain_mb is not None:
        assert plain_mb > 60 and chained_mb < plain_mb / 2, (plain_mb, chained_mb)


@pytest.mark.parametrize("m", [0, 1, 5, 300])
@pytest.mark.parametrize("nb,p,s,rho", [(4, 16, 48, 4), (8, 12, 6, 2)])
def test_block_major_input_and_output_match_the_reference(m, nb, p, s, rho):
    g = torch.Generator().manual_seed(m + nb)
    x = torch.randn(m, nb * p, generator=g)
    w1, w2 = torch.randn(nb, nb * rho, p, generator=g), torch.randn(nb, s, nb * rho, generator=g)
    bias = torch.randn(nb * s, generator=g)
    want = torch.nn.functional.gelu(monarch_matmul(x, w1, w2) + bias)                   # (m, nb * S)
    blocks = cpu_monarch(x, w1, w2, bias, activation=torch._C._nn.gelu_, out_blocks=True)
    assert blocks.shape == (nb, m, s)
    assert_close(blocks.transpose(0, 1).reshape(m, nb * s), want, 1e-5)
    # Read back as block-major input (fc2 of a chained MLP): the blocks are the next input's blocks.
    v1, v2 = torch.randn(nb, nb * rho, s, generator=g), torch.randn(nb, p, nb * rho, generator=g)
    assert_close(cpu_monarch(blocks, v1, v2, x_blocks=True), monarch_matmul(want, v1, v2), 1e-5)
    with pytest.raises(ValueError, match="out_blocks"):
        cpu_monarch(x, w1, w2, out_features=nb * s - 1, out_blocks=True)


@pytest.mark.parametrize("second,match", [(dict(nblocks=4), True), (dict(nblocks=8), False),
                                          (dict(nblocks=4, rank=2), True)])
def test_chained_mlp_hands_blocks_on_only_when_they_match(second, match, monkeypatch):
    monkeypatch.setattr(chained, "CHAIN_BYTES", 256 * 256 * 4)             # groups of 256 tokens
    torch.manual_seed(0)
    fc1 = MonarchLinear(64, 256, nblocks=4, activation="gelu")
    fc2 = MonarchLinear(256, 64, **second)
    cropped = MonarchLinear(64, 250, nblocks=4, activation="gelu")             # last block cut: rows, not blocks
    assert chained.blocks_match(fc1, fc2) is match
    assert not chained.blocks_match(cropped, MonarchLinear(250, 64, nblocks=4))
    assert not chained.blocks_match(fc1, nn.Linear(256, 64))
    x = torch.randn(1, 700, 64)
    with torch.inference_mode():
        want = fc2(fc1(x))
        fc1.chain_output = True
        assert isinstance(fc1(x), DeferredOutput)
        got = fc2(fc1(x))                                                       # three token groups
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("act", ["", "gelu", "gelu_tanh", "relu", "silu"])
def test_monarch_linear_op_matches_reference_and_gradients(act):
    torch.manual_seed(0)
    x = torch.randn(2, 300, 12, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 8, 3, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(18, dtype=torch.float64, requires_grad=True)
    layer = MonarchLinear(12, 18, nblocks=4, rank=2, activation=act or None).double()   # w1 (4, 8, 3)
    with torch.no_grad():
        layer.w1.copy_(w1), layer.w2.copy_(w2), layer.bias.copy_(b)
        with m2.layers.monarch.fast_paths(monarch=False):
            want = layer(x)                                              # reference product + bias + act
        assert_close(monarch_linear_op(x, w1, w2, b, 18, act), want, 1e-10, act)
    torch.autograd.gradcheck(lambda *a: monarch_linear_op(a[0][:, :7], *a[1:], 18, act), (x, w1, w2, b))
    torch.library.opcheck(torch.ops.m2.monarch_linear.default, (x.detach(), w1.detach(), w2.detach(),
                                                                b.detach(), 18, act))


@pytest.mark.parametrize("n", [1, 9, 300, 1025])
@pytest.mark.parametrize("bidirectional,skip", [(True, True), (False, False), (False, True)])
def test_blocked_gated_conv_equals_reference(n, bidirectional, skip):
    torch.manual_seed(n)
    h = 700                                                                # several channel blocks
    v, x1, x2 = torch.randn(3, 2, h, n, dtype=torch.float64).unbind(0)
    k, k_rev = (0.1 * torch.randn(2, h, n, dtype=torch.float64)).unbind(0)
    D = torch.randn(h, dtype=torch.float64) if skip else None
    want = gated_long_conv(v, x1, x2, k, k_rev if bidirectional else None, D)
    assert_close(gated_conv(v, x1, x2, k, k_rev if bidirectional else None, D), want, 1e-10)
    args = [t.float() if t is not None else None for t in (v, x1, x2, k, k_rev if bidirectional else None, D)]
    assert_close(torch.ops.m2.gated_long_conv(*args), want.float(), 1e-5)


def test_lowered_mlp_runs_monarch_linear_with_the_activation():
    model = _bert()
    converted = m2.convert(model).eval()
    lowered = m2.lower(converted)
    fc1 = {f.site: f.detail for f in lowered.result.fused if f.op == "m2::monarch_linear"}
    assert {s for s, d in fc1.items() if d.endswith("bias, gelu")} == {
        f"encoder.layer.{i}.intermediate.dense" for i in range(2)}
    ids = torch.randint(0, 100, (2, 300))
    with torch.no_grad():
        assert_close(lowered(input_ids=ids).last_hidden_state, converted(input_ids=ids).last_hidden_state, 1e-5)
