"""Incremental decoding of causal mixers equals recomputing the whole sequence."""

import pytest
import torch

import m2convert as m2
from m2convert.errors import ConfigError
from m2convert.layers.decode import decode_step, prefill


@pytest.mark.parametrize("mode", ["causal", "causal-monarch"])
@pytest.mark.parametrize("residual", [True, False])
def test_steps_match_full_recompute(mode, residual):
    torch.manual_seed(0)
    m = m2.M2SequenceMixer(24, mode=mode, residual_conv=residual).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(2, 21, 24, dtype=torch.float64)
        y_full = m(x)
        y_pre, state = prefill(m, x[:, :5], capacity=8)  # capacity grows past 8 on the way
        torch.testing.assert_close(y_pre, y_full[:, :5])
        for t in range(5, 21):
            torch.testing.assert_close(decode_step(m, x[:, t:t + 1], state), y_full[:, t:t + 1],
                                       rtol=1e-9, atol=1e-9)


def test_left_padded_prompt():
    torch.manual_seed(1)
    m = m2.M2SequenceMixer(16, mode="causal").double().eval()
    seq = torch.randn(1, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        alone = m(seq)
        x = torch.cat([torch.full((1, 3, 16), 5.0, dtype=torch.float64), seq[:, :6]], dim=1)
        mask = torch.tensor([[0, 0, 0] + [1] * 6])
        _, state = prefill(m, x, mask)
        outs = [decode_step(m, seq[:, t:t + 1], state) for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), alone[:, 6:9], rtol=1e-9, atol=1e-9)


def test_bidirectional_mixer_refuses():
    m = m2.M2SequenceMixer(8, mode="bidirectional")
    with pytest.raises(ConfigError, match="causal"):
        prefill(m, torch.randn(1, 3, 8))
