"""Attention written in less common ways: a residual added inside the attention module (Bloom), an
offset-only bias (ALiBi) that seeds the mixers' filters, windowed and sliding-window attention (skipped
with the window named), and flex-attention."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

import m2convert as m2
from m2convert.passes.site import Site

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = m2.ConvertConfig(filter_order=16)
HIDDEN, HEADS = 32, 4


def _bloom(cls=T.BloomModel, layers=1, **config):
    torch.manual_seed(0)
    return cls(T.BloomConfig(vocab_size=96, hidden_size=HIDDEN, n_layer=layers, n_head=HEADS, pad_token_id=0,
                             bos_token_id=0, eos_token_id=0, **config)).eval()


def _padded(batch, n=12):
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, 96, (batch, n), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _sequence_sites(plan):
    return [s for s in plan.sites if s.kind == "sequence"]


# --- a residual added inside the attention module ------------------------------------------------------

@pytest.mark.parametrize("cls", [T.BloomModel, T.BloomForCausalLM])
def test_bloom_attention_adds_its_residual_input(cls):
    model = _bloom(cls, layers=2)
    plan = m2.plan(model, SMALL)
    sites = _sequence_sites(plan)
    assert [(s.status, s.causal, s.layout.residual) for s in sites] == [("convert", True, "residual")] * 2
    converted = plan.apply()
    attn = converted.get_submodule(sites[0].fqn)
    assert type(attn).__name__ == "M2Attention" and attn.residual == "residual"
    with torch.no_grad():
        for batch in (1, 3):
            out = converted(**_padded(batch))[0]
            assert out.shape[:2] == (batch, 12) and torch.isfinite(out).all()
        # the adapter adds the tensor passed as `residual` (here by position), as BloomAttention does
        x, res = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
        assert torch.allclose(attn(x, res, None, None)[0] - attn(x, torch.zeros_like(res), None, None)[0], res,
                              atol=1e-6)


def test_residual_that_is_the_hidden_states_adds_them():
    # apply_residual_connection_post_layernorm: Bloom passes the attention's own input as the residual
    plan = m2.plan(_bloom(apply_residual_connection_post_layernorm=True), SMALL)
    assert [(s.status, s.layout.residual) for s in _sequence_sites(plan)] == [("convert", "hidden_states")]


class ResidualAttention(nn.Module):
    """Attention that adds ``skip`` (given by keyword) to dropout(O), or does ``after`` to O instead."""

    def __init__(self, after=None):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.after = after

    def forward(self, x, mask=None, skip=None):
        b, n, _ = x.shape

        def heads(t):                                                      # (B, N, H) -> (B, heads, N, d)
            return t.view(b, n, HEADS, -1).transpose(1, 2)

        probs = (heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        out = self.o((probs @ heads(self.v(x))).transpose(1, 2).reshape(b, n, HIDDEN))
        if self.after is not None:
            return self.after(out, skip)
        return skip + nn.functional.dropout(out, 0.1, self.training)


class Block(nn.Module):
    def __init__(self, after=None):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(HIDDEN), ResidualAttention(after)

    def forward(self, x):
        return self.attn(self.norm(x), skip=x)


def test_residual_by_keyword_converts_and_keeps_the_output():
    torch.manual_seed(0)
    block = Block().eval()
    plan = m2.plan(block, SMALL, example_inputs=(torch.randn(2, 8, HIDDEN),))
    site = _sequence_sites(plan)[0]
    assert (site.status, site.layout.residual, site.layout.dropout) == ("convert", "skip", 0.1)
    converted = plan.apply()
    x = torch.randn(3, 8, HIDDEN)
    with torch.no_grad():
        mixed = converted.attn.mixer(converted.norm(x))
        assert torch.allclose(converted(x), mixed + x, atol=1e-6)


def test_other_ops_after_the_output_projection_stay_skipped():
    torch.manual_seed(0)
    block = Block(after=lambda out, skip: out * 2 + skip).eval()
    site = _sequence_sites(m2.plan(block, SMALL, example_inputs=(torch.randn(2, 8, HIDDEN),)))[0]
    assert site.status == "skip"
    assert site.reason.startswith("the output projection 'attn.o' is followed inside 'attn' by ['aten.mul']")


def test_layout_without_residual_loads_from_older_plans():
    site = _sequence_sites(m2.plan(_bloom(), SMALL))[0]
    data = site.to_dict()
    assert data["layout"]["residual"] == "residual"
    del data["layout"]["residual"]                                         # written before the field existed
    assert Site.from_dict(data).layout.residual is None
    assert Site.from_dict(site.to_dict()) == site


# --- an offset-only score bias (ALiBi) seeds the mixers' filters ---------------------------------------

def _mpt():
    torch.manual_seed(0)
    return T.MptModel(T.MptConfig(vocab_size=96, d_model=HIDDEN, n_layers=1, n_heads=HEADS, max_seq_len=64,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()


def _seeded_fit(plan):
    """[(site, taps (heads_f, H, L), target taps)] of the converted sites seeded from an offset bias."""
    from m2convert.layers.filters import softmax_taps
    from m2convert.passes.attention_bias import SEED_OFFSETS

    converted = plan.apply()
    out = []
    for site in _sequence_sites(plan):
        bias = site.layout.offset_bias
        if bias is not None:
            target, _ = softmax_taps(*bias.profile(SEED_OFFSETS), site.layout.hidden)
            with torch.no_grad():
                out.append((site, converted.get_submodule(site.fqn).mixer.filter(SEED_OFFSETS), target))
    return out


def _alibi_slopes(heads):
    return [2.0 ** (-8 * (h + 1) / heads) for h in range(heads)]


@pytest.mark.parametrize("build", [_bloom, _mpt], ids=["bloom", "mpt"])
def test_alibi_is_read_per_head_and_seeds_the_causal_filters(build):
    plan = m2.plan(build(), SMALL)
    bias = _sequence_sites(plan)[0].layout.offset_bias
    assert bias is not None and bias.linear and bias.ahead is None
    slopes = [-row[1] for row in bias.back]                                # bias of the key 1 token back
    assert slopes == pytest.approx(_alibi_slopes(HEADS), rel=1e-5)
    [(site, taps, target)] = _seeded_fit(plan)
    err = float(((taps - target) ** 2).sum() / (target ** 2).sum())
    # measured: 0.20 (Bloom) and 0.19 (MPT) relative squared error at filter_order 16, 100 steps; the
    # fastest head (slope 1/4: 22% of the weight on offset 0) is the hard one. Random filters give 1.0.
    assert err < 0.3 and site.layout.offset_bias.fit_error == pytest.approx(err, rel=1e-3)
    for h, slope in enumerate(_alibi_slopes(HEADS)):                       # each head's channels decay at its rate
        rows = taps[0, h * 8:(h + 1) * 8]
        assert torch.corrcoef(torch.stack([rows.mean(0), target[0, h * 8]]))[0, 1] > 0.8, slope
    assert site.layout.offset_bias.fit_corr > 0.9


def test_models_without_an_offset_bias_are_not_seeded(tiny_model):
    for model in (tiny_model("llama", "eager", layers=1), tiny_model("gpt2", "eager", layers=1),
                  tiny_model("bert", "eager", layers=1)):
        plan = m2.plan(model, SMALL)
        assert [s.layout.offset_bias for s in _sequence_sites(plan)] == [None]
        unseeded = plan.apply(seed=False)
        converted = plan.apply()
        site = _sequence_sites(plan)[0]
        with torch.no_grad():                                              # the filter keeps its random start
            assert torch.equal(converted.get_submodule(site.fqn).mixer.filter(16),
                               unseeded.get_submodule(site.fqn).mixer.filter(16))


class SymmetricAlibi(nn.Module):
    """A bidirectional attention with the bias -slope_h * |key - query| (no mask)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.register_buffer("slopes", torch.tensor(_alibi_slopes(HEADS)).view(HEADS, 1, 1))

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, HEADS, -1).transpose(1, 2)                 # (B, heads, N, d)

        pos = torch.arange(n, device=x.device)
        bias = -self.slopes * (pos.view(1, -1) - pos.view(-1, 1)).abs()    # (heads, N, N)
        probs = (heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / 8 ** 0.5 + bias).softmax(-1)
        return self.o((probs @ heads(self.v(x))).transpose(1, 2).reshape(b, n, HIDDEN))


def test_bidirectional_offset_bias_seeds_both_directions():
    torch.manual_seed(0)
    plan = m2.plan(nn.Sequential(SymmetricAlibi()).eval(), SMALL, example_inputs=(torch.randn(2, 12, HIDDEN),))
    bias = _sequence_sites(plan)[0].layout.offset_bias
    assert bias.linear and bias.ahead == bias.back                         # symmetric, read both ways
    [(site, taps, target)] = _seeded_fit(plan)
    assert site.mode == "bidirectional" and taps.shape == target.shape == (2, HIDDEN, 256)
    for direction in (0, 1):                                               # forward (keys back), reverse (ahead)
        err = float(((taps[direction, :, 1:] - target[direction, :, 1:]) ** 2).sum() / (target[direction] ** 2).sum())
        assert err < 0.3, direction


def test_t5_relative_bias_seeds_both_directions():
    # T5's bucketed relative position bias depends only on the offset: measured both ways, not a line
    torch.manual_seed(0)
    model = T.T5EncoderModel(T.T5Config(vocab_size=96, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=1,
                                        num_heads=HEADS, pad_token_id=0, eos_token_id=0)).eval()
    plan = m2.plan(model, SMALL)
    bias = _sequence_sites(plan)[0].layout.offset_bias
    assert bias is not None and not bias.linear and len(bias.ahead) == len(bias.back) == HEADS
    [(site, taps, target)] = _seeded_fit(plan)
    assert taps.shape[0] == 2 and site.layout.offset_bias.fit_error < 0.3


# --- windowed attention (Swin) ---------------------------------------------------------------------------

def _swin(depths=(1,)):
    torch.manual_seed(0)
    return T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=list(depths),
                                    num_heads=[2] * len(depths), window_size=4, attn_implementation="eager")).eval()


@pytest.mark.parametrize("batch", [1, 2])
def test_swin_windowed_attention_is_skipped_and_the_rest_converts(batch):
    # 32 / 4 = 8 x 8 patches cut into 4 x 4 windows: 4 windows of 16 tokens per image
    model = _swin(depths=(2,))                                             # block 1 shifts its windows
    plan = m2.plan(model, SMALL, example_inputs={"pixel_values": torch.randn(batch, 3, 32, 32)})
    attention = _sequence_sites(plan)
    assert [s.status for s in attention] == ["skip", "skip"]
    for site in attention:
        assert site.reason.startswith(f"windowed attention: the queries of '{site.fqn}' are {4 * batch} rows of "
                                      f"16 tokens regrouped from {batch} rows of 64 tokens")
        assert "keys are limited to a window of 16 tokens; the M2 mixers model only full or causal" in site.reason
    assert [s.kind for s in plan.converted] == ["dimension", "dimension"]
    converted = plan.apply()
    with torch.no_grad():
        for rows in (1, 2):
            out = converted(pixel_values=torch.randn(rows, 3, 32, 32)).last_hidden_state
            assert out.shape == (rows, 64, 16) and torch.isfinite(out).all()


def test_vit_attention_over_whole_images_still_converts():
    torch.manual_seed(0)
    model = T.ViTModel(T.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                                   intermediate_size=64, image_size=16, patch_size=4,
                                   attn_implementation="eager")).eval()
    plan = m2.plan(model, SMALL)
    assert [(s.kind, s.status) for s in plan.sites] == [("sequence", "convert"), ("dimension", "convert")]


# --- sliding windows ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [8, 16])
def test_small_sliding_window_is_captured_long_enough_to_show_in_the_mask(window, attn):
    torch.manual_seed(0)
    model = T.MistralModel(T.MistralConfig(vocab_size=96, hidden_size=HIDDEN, num_hidden_layers=1,
                                           num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=64,
                                           max_position_embeddings=64, sliding_window=window,
                                           attn_implementation=attn)).eval()
    plan = m2.plan(model, SMALL)
    assert plan.captured.kwargs["input_ids"].shape[1] == window + 8
    [site] = _sequence_sites(plan)
    assert (site.status, site.causal, site.layout.window) == ("exclude", True, window)   # narrow: kept by default
    assert site.reason.startswith(f"local attention (each query sees {window} tokens: itself and the "
                                  f"{window - 1} before it): kept")
    assert [s.status for s in plan.sites if s.kind == "dimension"] == ["convert"]
    [site] = _sequence_sites(m2.plan(model, SMALL.replace(local_attention="convert")))
    assert (site.status, site.layout.window, site.settings["filter_window"]) == ("convert", window, window - 2)


# --- flex-attention ------------------------------------------------------------------------------------

def _llama(attn):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=96, hidden_size=HIDDEN, num_hidden_layers=1,
                                            num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=64,
                                            max_position_embeddings=64, attn_implementation=attn)).eval()


def test_flex_attention_converts_like_eager_attention():
    # CPU flex-attention traces only with frozen parameters and without transformers' data-dependent
    # all-ones mask check: capture retries that way; causality comes from evaluating the mask_mod
    plan = m2.plan(_llama("flex_attention"), SMALL)
    [site] = _sequence_sites(plan)
    assert (site.pattern, site.status, site.causal) == ("flex-attention", "convert", True)
    assert all(p.requires_grad for p in plan.model.parameters())           # restored after the retry
    flex, eager = plan.apply(), m2.convert(_llama("eager"), SMALL)
    ids = torch.randint(1, 96, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                  # left padding: read from the BlockMask's mask_mod
    with torch.no_grad():                            # (each new shape compiles a BlockMask: one call only)
        got = flex(input_ids=ids, attention_mask=mask).logits
        want = eager(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5)


class GatedAttention(nn.Module):
    """Attention whose output is multiplied by act(g(x)) before O: sigmoid is Qwen3-Next's output gate."""

    def __init__(self, act=torch.sigmoid):
        super().__init__()
        self.act = act
        self.q, self.k, self.v, self.g, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(5))

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, HEADS, -1).transpose(1, 2)
        probs = (heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        out = (probs @ heads(self.v(x))).transpose(1, 2).reshape(b, n, HIDDEN)
        return self.o(out * self.act(self.g(x)))


def test_an_output_gate_converts_into_the_mixer():
    torch.manual_seed(0)
    model = nn.Sequential(GatedAttention()).eval()
    plan = m2.plan(model, SMALL, example_inputs=(torch.randn(2, 8, HIDDEN),))
    site = _sequence_sites(plan)[0]
    assert site.status == "convert" and site.layout.output_gate == "sigmoid" and site.roles["gate"].path == "0.g"
    mixer = plan.apply()[0].mixer
    assert torch.equal(mixer.output_gate.weight, model[0].g.weight)
    x, seen = torch.randn(2, 8, HIDDEN), {}
    hook = mixer.out_proj.register_forward_pre_hook(lambda m, a: seen.update(y=a[0]))
    with torch.no_grad():
        mixer(x)
        hook.remove()
        gate, out = mixer.output_gate, mixer.out_proj
        mixer.output_gate, mixer.out_proj = None, nn.Identity()
        ungated = mixer(x)
        mixer.output_gate, mixer.out_proj = gate, out
        fast = mixer(x)
    torch.testing.assert_close(seen["y"], ungated * torch.sigmoid(model[0].g(x)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, out(seen["y"]), atol=1e-5, rtol=1e-5)       # the fast path gates too


def test_kept_heads_of_gated_attention_are_gated_like_the_original():
    """A head-level hybrid of gated attention: the kept heads reproduce the original gated heads exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(GatedAttention()).eval()
    plan = m2.plan(model, SMALL, example_inputs=(torch.randn(2, 8, HIDDEN),))
    _sequence_sites(plan)[0].settings["kept_groups"] = [1]
    adapter = plan.apply()[0]
    seen = {}
    model[0].o.register_forward_pre_hook(lambda mod, a: seen.update(original=a[0]))
    adapter.kept.o_proj.register_forward_pre_hook(lambda mod, a: seen.update(hybrid=a[0]))
    x = torch.randn(2, 8, HIDDEN)
    with torch.no_grad():
        model(x)
        adapter(x)
    channels = adapter.kept.channels
    torch.testing.assert_close(seen["hybrid"][..., channels], seen["original"][..., channels], atol=1e-5, rtol=1e-5)


def test_arithmetic_between_the_core_and_o_is_named_in_the_reason():
    plan = m2.plan(nn.Sequential(GatedAttention(torch.tanh)), SMALL, example_inputs=(torch.randn(2, 8, HIDDEN),))
    site = _sequence_sites(plan)[0]
    assert site.status == "skip"
    assert site.reason.startswith("the attention output reaches the output projection '0.o' through ['aten.mul'], "
                                  "with ['0.g'] (an output gate"), site.reason
