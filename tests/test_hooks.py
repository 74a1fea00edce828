"""Hooks and parametrizations on a converted model's submodules run in every path: the CPU fast paths
(no gradients, eager) step aside when one is present, so inference and training see the same model."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from torch.nn.utils import parametrize, prune

import m2convert as m2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def converted():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=512)
    model = transformers.BertModel(cfg).eval()
    return m2.convert(model, m2.ConvertConfig(filter_order=16, nblocks=4)).eval()


IDS = torch.randint(1, 96, (2, 300), generator=torch.Generator().manual_seed(1))   # long enough to chain


def _both(model):
    """(output without gradients: the fast paths; output with gradients: the reference paths)."""
    with torch.no_grad():
        fast = model(input_ids=IDS).last_hidden_state
    slow = model(input_ids=IDS).last_hidden_state.detach()
    return fast, slow


def _mixer(model):
    return next(m for m in model.modules() if isinstance(m, m2.M2SequenceMixer))


def test_forward_hook_on_out_proj_changes_inference(converted):
    before, _ = _both(converted)
    handle = _mixer(converted).out_proj.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    fast, slow = _both(converted)
    handle.remove()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert (fast - before).abs().max() > 1e-2                         # the hook did change the model


def test_pre_hook_on_in_proj_runs_without_gradients(converted):
    calls = []
    _mixer(converted).in_proj.register_forward_pre_hook(lambda mod, args: calls.append(1) or (args[0] * 0.5,))
    fast, slow = _both(converted)
    assert len(calls) == 2
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_pruning_and_parametrizations_apply_to_inference(converted):
    mixer = _mixer(converted)
    prune.l1_unstructured(mixer.in_proj, "weight", amount=0.5)
    fast, slow = _both(converted)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    prune.remove(mixer.in_proj, "weight")

    class Halve(nn.Module):
        def forward(self, w):
            return 0.5 * w

    before, _ = _both(converted)
    parametrize.register_parametrization(mixer.out_proj, "weight", Halve())
    fast, slow = _both(converted)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert (fast - before).abs().max() > 1e-3


def test_hook_on_a_chained_monarch_projection_sees_and_sets_its_output(converted):
    fc1 = next(m for m in converted.modules() if isinstance(m, m2.MonarchLinear) and m.chain_output)
    seen = []

    def hook(mod, args, out):
        seen.append(type(out))
        return out * 0

    before, _ = _both(converted)
    fc1.register_forward_hook(hook)
    fast, slow = _both(converted)
    assert seen and all(t is torch.Tensor for t in seen)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert (fast - before).abs().max() > 1e-3
