"""The Mamba2 mixer against transformers' ``Mamba2Mixer`` (its PyTorch path) on the same weights, and its
document-reset contract (the model-level decode, packing and checkpoint tests are in test_mamba2_model.py).

Tolerance against transformers: 1e-4 relative (both float32 on the CPU; measured ~2e-7).
"""

from __future__ import annotations

import math

import pytest
import torch

from olmo_hybrid.model.context import ForwardContext
from olmo_hybrid.model.mamba2 import Mamba2Mixer

NO_CACHE = ForwardContext(rope=None)

DIMS = dict(d_model=48, num_heads=8, head_dim=12, state_size=16, n_groups=2, conv_kernel=4)


def rel_err(x, ref) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def random_mixer(seed=0, **kw) -> Mamba2Mixer:
    torch.manual_seed(seed)
    m = Mamba2Mixer(**{**DIMS, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        m.A_log.copy_(torch.rand(m.num_heads).log())  # A in (-1, 0): states that remember over many chunks
        m.dt_bias.copy_(torch.randn(m.num_heads) - 1)
    return m


@pytest.mark.parametrize("use_bias,limit", [(False, (0.0, math.inf)), (True, (0.0, 0.3))])
def test_equals_transformers_mamba2_mixer(use_bias, limit):
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    ours = random_mixer(use_bias=use_bias, time_step_limit=limit, norm_eps=1e-5).eval()
    cfg = Mamba2Config(hidden_size=48, num_heads=8, head_dim=12, expand=2, state_size=16, n_groups=2,
                       conv_kernel=4, chunk_size=16, num_hidden_layers=1, use_bias=use_bias, use_conv_bias=True,
                       layer_norm_epsilon=1e-5, time_step_limit=limit)
    hf = HFMamba2Mixer(cfg, layer_idx=0).eval()
    assert {k: v.shape for k, v in hf.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 100, 48)  # T = 100: several of transformers' 16-token chunks (and two of ours)
    with torch.no_grad():
        assert rel_err(ours(x, NO_CACHE), hf(x)) < 1e-4


def test_reset_starts_a_fresh_document():
    """With a reset at token r (conv context and state cleared), outputs from r on equal a fresh run over
    tokens r.. and outputs before r are unaffected; the gradient never crosses the boundary."""
    m = random_mixer(seed=2)
    x = torch.randn(2, 50, 48, requires_grad=True)
    r = 23
    reset = torch.zeros(2, 50, dtype=torch.bool)
    reset[:, r] = True
    y = m(x, ForwardContext(rope=None, reset_mask=reset))
    with torch.no_grad():
        assert rel_err(y[:, r:], m(x[:, r:], NO_CACHE)) < 1e-5
        assert rel_err(y[:, :r], m(x[:, :r], NO_CACHE)) < 1e-5
    y[:, r:].sum().backward()
    assert x.grad[:, :r].abs().max() == 0 and x.grad[:, r:].abs().max() > 0


def test_init_follows_mamba_ssm():
    m = Mamba2Mixer(**DIMS)
    m.reset_ssm_parameters(torch.Generator().manual_seed(0))
    A = -m.A_log.exp()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((A <= -1) & (A >= -16)).all() and torch.equal(m.D, torch.ones(8))
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()


def test_groups_must_divide_heads():
    with pytest.raises(ValueError, match="n_groups=3"):
        Mamba2Mixer(**{**DIMS, "n_groups": 3})
