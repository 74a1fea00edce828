"""The pattern registries: a new attention or MLP pattern is one matcher plus its registration.

The toy patterns below live only in this file; registering them is all it takes for plan, apply, diff
and save/load to handle a model whose attention (or MLP) is written in a way the built-in patterns miss.
"""

import torch
from torch import nn

import m2convert as m2
from m2convert.layers import M2Attention, MonarchLinear
from m2convert.passes.attention import ATTENTION_PATTERNS, AttentionCore, attention_pattern
from m2convert.passes.graph import op_name, users
from m2convert.passes.mlp import MLP_PATTERNS, MLPMatch, register_mlp_pattern, unregister_mlp_pattern


class SigmoidAttention(nn.Module):
    """Attention with sigmoid instead of softmax: sigmoid(Q K^T / sqrt(d)) V, then O."""

    def __init__(self, hidden=32, heads=2):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, hidden_states):
        b, n, h = hidden_states.shape

        def split(x):                                                       # (B, N, H) -> (B, heads, N, d)
            return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(hidden_states)), split(self.k(hidden_states)), split(self.v(hidden_states))
        probs = torch.sigmoid(q @ k.transpose(-2, -1) / self.head_dim ** 0.5)    # (B, heads, N, N)
        out = (probs @ v).transpose(1, 2).reshape(b, n, h)                       # (B, N, H)
        return self.o(out)


class AbsProductMLP(nn.Module):
    """fc2(h * |h|) with h = fc1(x): an elementwise chain with no activation the built-in patterns know."""

    def __init__(self, hidden=32, inner=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * h.abs())


class ToyModel(nn.Module):
    def __init__(self, vocab=50, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.attn, self.mlp = SigmoidAttention(hidden), AbsProductMLP(hidden)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, input_ids):
        x = self.embed(input_ids)                                           # (B, N, H)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def match_sigmoid_attention(index):
    # ToyModel: probs = sigmoid(matmul(q, k^T) [/ scale]);  out = matmul(probs, v)
    cores = []
    for sig in index.calls("aten.sigmoid"):
        scores = sig.args[0]
        while op_name(scores) in ("aten.div", "aten.mul"):
            scores = scores.args[0]
        out = next((u for u in users(sig) if op_name(u) == "aten.matmul" and u.args[0] is sig), None)
        if op_name(scores) == "aten.matmul" and out is not None:
            cores.append(AttentionCore(out, "", scores.args[0], scores.args[1], out.args[1]))
    return cores


def match_abs_product_mlp(index, down, region, sources):
    # ToyModel: fc2(h * |h|) with h = fc1(x)
    if len(sources) == 1 and any(op_name(n) == "aten.abs" for n in region):
        return MLPMatch({"fc1": sources[0], "fc2": down}, None, "abs-product-mlp")
    return None


def _model():
    torch.manual_seed(0)
    return ToyModel().eval()


def test_unregistered_toy_patterns_are_not_found():
    plan = m2.plan(_model(), example_inputs={"input_ids": torch.randint(0, 50, (2, 16))})
    # The MLP's h * |h| is named by no pattern: the elementwise fallback still finds it, the attention not.
    assert [(s.kind, s.pattern) for s in plan.sites] == [("dimension", "elementwise-mlp")]
    assert any("no attention sites" in note for note in plan.notes)


def test_registered_attention_pattern_converts_the_toy_model(tmp_path):
    model = _model()
    ids = torch.randint(0, 50, (3, 16))
    before = len(ATTENTION_PATTERNS)
    with attention_pattern("sigmoid-attention", match_sigmoid_attention):
        plan = m2.plan(model, example_inputs={"input_ids": ids})
        converted = plan.apply()
    assert len(ATTENTION_PATTERNS) == before                               # the registration is gone again
    [site] = [s for s in plan.sites if s.kind == "sequence"]
    assert (site.fqn, site.pattern, site.status, site.causal) == ("attn", "sigmoid-attention", "convert", False)
    assert {r: role.path for r, role in site.roles.items()} == {r: f"attn.{r}" for r in "qkvo"}
    assert site.layout.heads == 2 and site.layout.hidden == 32 and site.layout.arg_names == ["hidden_states"]
    assert isinstance(converted.attn, M2Attention) and isinstance(model.attn, SigmoidAttention)
    with torch.no_grad():
        out = converted(ids)
    assert out.shape == (3, 16, 32) and torch.isfinite(out).all()
    assert "sigmoid-attention" in plan.to_json() and "M2Attention" in str(m2.diff(model, converted, example_inputs={"input_ids": ids}))


def test_registered_mlp_pattern_converts_the_toy_mlp():
    model = _model()
    ids = torch.randint(0, 50, (2, 16))
    register_mlp_pattern("abs-product-mlp")(match_abs_product_mlp)
    try:
        plan = m2.plan(model, example_inputs={"input_ids": ids}, config=m2.ConvertConfig(nblocks=2))
        converted = plan.apply()
    finally:
        unregister_mlp_pattern("abs-product-mlp")
    assert all(p.name != "abs-product-mlp" for p in MLP_PATTERNS)
    [site] = plan.sites
    assert (site.pattern, site.replaces, site.layout.activation) == ("abs-product-mlp", ["mlp.fc1", "mlp.fc2"], None)
    assert isinstance(converted.mlp.fc1, MonarchLinear) and isinstance(converted.mlp.fc2, MonarchLinear)
    with torch.no_grad():
        assert converted(ids).shape == (2, 16, 32)
