"""Attention cores found by dataflow: each way of writing the QK product, the score chain and the product
with V matches once; biases that are no mask leave causality alone; graphs that are not attention do not
match; fused QKV (and gate_up) projections are split into the right rows."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

import m2convert as m2
from m2convert.passes.attention_patterns import match_softmax
from m2convert.passes.capture import capture
from m2convert.passes.graph import GraphIndex

HIDDEN, HEADS, N = 32, 4, 8


class Scores(nn.Module):
    """q, k, v, o projections around one attention core whose scores -> probs step is ``chain``."""

    def __init__(self, chain, product="matmul", with_v=True):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.chain, self.product, self.with_v = chain, product, with_v

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):                                                      # (B, N, H) -> (B, heads, N, d)
            return t.view(b, n, HEADS, -1).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.product == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k)                 # (B, heads, N, N)
        elif self.product == "baddbmm":                                    # Bloom: baddbmm(alibi, q, k^T)
            slopes = torch.arange(1, HEADS + 1, dtype=x.dtype).repeat(b).view(-1, 1, 1) / 4
            alibi = -slopes * torch.arange(n, dtype=x.dtype).view(1, 1, n)         # (B * heads, 1, N)
            scores = torch.baddbmm(alibi, q.reshape(b * HEADS, n, -1), k.reshape(b * HEADS, n, -1).transpose(1, 2))
            scores = scores.view(b, HEADS, n, n)
        else:
            scores = q @ k.transpose(-1, -2)
        probs = self.chain(scores / 8 ** 0.5)
        if not self.with_v:
            return self.o(probs.sum(-1).transpose(1, 2).expand(b, n, HEADS).repeat(1, 1, HIDDEN // HEADS))
        out = probs @ v if self.product != "einsum" else torch.einsum("bhqk,bhkd->bhqd", probs, v)
        return self.o(out.transpose(1, 2).reshape(b, n, HIDDEN))


def _causal(scores):
    n = scores.shape[-1]
    return torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()


def _relative(scores):
    n = scores.shape[-1]
    pos = torch.arange(n)
    return -(pos.view(-1, 1) - pos.view(1, -1)).abs().float() / 4             # (N, N), no -inf anywhere


CHAINS = {  # name -> (scores -> probs, causal)
    "plain": (lambda s: s.softmax(-1), False),
    "additive-causal": (lambda s: (s + torch.zeros_like(s).masked_fill(~_causal(s), float("-inf"))).softmax(-1),
                        True),
    "masked-fill": (lambda s: s.masked_fill(~_causal(s), torch.finfo(s.dtype).min).softmax(-1), True),
    "where": (lambda s: torch.where(_causal(s), s, torch.full_like(s, -1e4)).softmax(-1), True),
    "tanh-cap-then-mask": (lambda s: (torch.tanh(s / 50) * 50).masked_fill(~_causal(s), float("-inf"))
                           .softmax(-1), True),
    "relative-bias-in-place": (lambda s: s.clone().add_(_relative(s)).softmax(-1), False),
    "relative-bias-and-causal": (lambda s: (s + _relative(s)).masked_fill(~_causal(s), -1e4).softmax(-1), True),
    "dropout": (lambda s: nn.functional.dropout(s.float().softmax(-1), 0.1, False), False),
}


def _index(model) -> GraphIndex:
    return GraphIndex(capture(model.eval(), (torch.randn(2, N, HIDDEN),)))


@pytest.mark.parametrize("name", CHAINS)
def test_score_chain_matches_once_and_reads_causality_from_the_mask(name):
    chain, causal = CHAINS[name]
    model = nn.Sequential(Scores(chain))                  # the site is a module below the model
    assert len(match_softmax(_index(model))) == 1
    plan = m2.plan(model, example_inputs=(torch.randn(2, N, HIDDEN),))
    assert [(s.kind, s.status, s.causal) for s in plan.sites] == [("sequence", "convert", causal)]


def _band(scores, window=3):
    pos = torch.arange(scores.shape[-1])
    return (pos.view(-1, 1) - pos.view(1, -1) >= 0) & (pos.view(-1, 1) - pos.view(1, -1) < window)


def test_sliding_window_mask_is_not_read_as_padding():
    # each query sees its last 3 keys: no key is masked for every query, so nothing is padding
    model = nn.Sequential(Scores(lambda s: s.masked_fill(~_band(s), float("-inf")).softmax(-1)))
    plan = m2.plan(model, example_inputs=(torch.randn(2, N, HIDDEN),))
    assert [(s.status, s.causal, s.layout.window) for s in plan.sites] == [("exclude", True, 3)]
    assert plan.sites[0].reason.startswith("local attention (each query sees 3 tokens")


def test_sliding_window_from_config_is_read_even_when_wider_than_the_capture():
    # Gemma2 alternates sliding (window 4096, longer than any capture) and global layers
    torch.manual_seed(0)
    model = T.Gemma2Model(T.Gemma2Config(**{**TEXT, "num_hidden_layers": 2}, num_key_value_heads=2, head_dim=8))
    sites = [s for s in m2.plan(model.eval()).sites if s.kind == "sequence"]
    assert [(s.status, s.causal, s.layout.window) for s in sites] == [("convert", True, 4096), ("convert", True, None)]
    assert sites[0].settings["filter_window"] == 4094 and "filter_window" not in sites[1].settings


@pytest.mark.parametrize("product", ["einsum", "baddbmm"])
def test_products_other_than_matmul_match(product):
    # baddbmm adds ALiBi (a bias that masks nothing): the site stays bidirectional
    assert len(match_softmax(_index(Scores(CHAINS["plain"][0], product)))) == 1
    plan = m2.plan(nn.Sequential(Scores(CHAINS["plain"][0], product)), example_inputs=(torch.randn(2, N, HIDDEN),))
    assert [(s.status, s.causal) for s in plan.sites] == [("convert", False)]


class Classifier(nn.Module):
    """softmax over x @ W (a product with a parameter) then @ another parameter: no attention."""

    def __init__(self):
        super().__init__()
        self.w, self.u = nn.Parameter(torch.randn(HIDDEN, N)), nn.Parameter(torch.randn(N, HIDDEN))

    def forward(self, x):
        return (x @ self.w).softmax(-1) @ self.u


class NoSoftmax(nn.Module):
    """(x x^T) x: the products of attention with no softmax between them."""

    def forward(self, x):
        return (x @ x.transpose(-1, -2) / 8) @ x


class SoftmaxOverHeads(nn.Module):
    """A softmax over a QK product's query dim (not the keys): no attention core."""

    def forward(self, x):
        return (x @ x.transpose(-1, -2)).softmax(-2) @ x


@pytest.mark.parametrize("model", [Classifier(), NoSoftmax(), SoftmaxOverHeads(),
                                   Scores(CHAINS["plain"][0], with_v=False)],
                         ids=["softmax-of-projection", "no-softmax", "softmax-not-over-keys", "probs-not-times-v"])
def test_non_attention_does_not_match(model):
    assert match_softmax(_index(model)) == []


def _site_rows(model, kind="sequence"):
    plan = m2.plan(model.eval())
    site = next(s for s in plan.sites if s.kind == kind)
    assert site.status == "convert", site.reason
    return {r: role.rows for r, role in site.roles.items() if role.rows}


TEXT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0,
            attn_implementation="eager")
HEAD_BLOCKS = [[24 * h + 8 * r, 24 * h + 8 * r + 8] for r in range(3) for h in range(4)]


@pytest.mark.parametrize("family,rows", [
    ("gpt-bigcode", {"q": [[0, 32]], "k": [[32, 40]], "v": [[40, 48]]}),               # multi-query
    ("falcon", {"q": [[0, 32]], "k": [[32, 40]], "v": [[40, 48]]}),                    # multi-query
    ("modernbert", {"q": [[0, 32]], "k": [[32, 64]], "v": [[64, 96]]}),                # (3, heads, d)
    ("phi3", {"q": [[0, 32]], "k": [[32, 48]], "v": [[48, 64]]}),                      # grouped
    ("bloom", {"q": HEAD_BLOCKS[:4], "k": HEAD_BLOCKS[4:8], "v": HEAD_BLOCKS[8:]}),    # (heads, 3, d)
])
def test_fused_qkv_rows(family, rows):
    torch.manual_seed(0)
    model = {
        "gpt-bigcode": lambda: T.GPTBigCodeModel(T.GPTBigCodeConfig(vocab_size=96, n_embd=32, n_layer=1, n_head=4,
                                                                    n_positions=64, bos_token_id=0, eos_token_id=0,
                                                                    attn_implementation="eager")),
        "falcon": lambda: T.FalconModel(T.FalconConfig(**{k: v for k, v in TEXT.items() if k != "intermediate_size"})),
        "modernbert": lambda: T.ModernBertModel(T.ModernBertConfig(**TEXT, cls_token_id=0, sep_token_id=0)),
        "phi3": lambda: T.Phi3Model(T.Phi3Config(**TEXT, num_key_value_heads=2)),
        "bloom": lambda: T.BloomModel(T.BloomConfig(vocab_size=96, hidden_size=32, n_layer=1, n_head=4)),
    }[family]()
    assert _site_rows(model) == rows


def test_fused_gate_up_mlp_rows_and_forward():
    # HF Phi3: gate, up = gate_up_proj(x).chunk(2, -1); down(up * silu(gate))
    torch.manual_seed(0)
    model = T.Phi3Model(T.Phi3Config(**TEXT, num_key_value_heads=2)).eval()
    plan = m2.plan(model)
    site = next(s for s in plan.sites if s.kind == "dimension")
    assert (site.pattern, site.status, site.layout.activation) == ("fused-gated-mlp", "convert", "silu")
    assert {r: role.rows for r, role in site.roles.items()} == {"gate": [[0, 64]], "up": [[64, 128]], "down": None}
    assert site.replaces == ["layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj"]
    converted = plan.apply()
    ids = torch.randint(1, 96, (2, 8))
    assert torch.isfinite(converted(input_ids=ids).last_hidden_state).all()
