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


INF = math.inf
# name -> (mixer dims, transformers' chunk_size, T, use_bias, use_conv_bias, time_step_limit, norm eps): groups of
# one head and of several, head dims and state sizes that are not powers of two, T of 1, T just past one of our
# 64-token chunks, transformers chunks that do not divide T, dt clamped from either side.
HF_CASES = {
    "T100-2-groups": (DIMS, 16, 100, False, True, (0.0, INF), 1e-5),
    "T100-bias-limit": (DIMS, 16, 100, True, True, (0.0, 0.3), 1e-5),
    "T1-5-groups": (dict(d_model=40, num_heads=10, head_dim=8, state_size=16, n_groups=5, conv_kernel=4), 7, 1,
                    False, True, (0.0, INF), 1e-5),
    "T17-odd-dims-no-conv-bias": (dict(d_model=30, num_heads=4, head_dim=15, state_size=12, n_groups=2,
                                       conv_kernel=3), 16, 17, True, False, (0.01, 0.2), 1e-6),
    "T66-chunk-5-conv-2": (dict(d_model=36, num_heads=6, head_dim=12, state_size=10, n_groups=3, conv_kernel=2), 5,
                           66, False, False, (0.0, 0.05), 1e-3),
    "T65-group-per-head-conv-5": (dict(d_model=24, num_heads=8, head_dim=6, state_size=7, n_groups=8,
                                       conv_kernel=5), 64, 65, True, True, (0.1, INF), 1e-5),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_equals_transformers_mamba2_mixer(name):
    """Outputs and every gradient (inputs and parameters) equal to transformers' PyTorch path."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    dims, chunk, t, use_bias, conv_bias, limit, eps = HF_CASES[name]
    ours = random_mixer(**dims, use_bias=use_bias, use_conv_bias=conv_bias, time_step_limit=limit, norm_eps=eps)
    d, h, p = dims["d_model"], dims["num_heads"], dims["head_dim"]
    cfg = Mamba2Config(hidden_size=d, num_heads=h, head_dim=p, expand=h * p // d, state_size=dims["state_size"],
                       n_groups=dims["n_groups"], conv_kernel=dims["conv_kernel"], chunk_size=chunk,
                       num_hidden_layers=1, use_bias=use_bias, use_conv_bias=conv_bias, layer_norm_epsilon=eps,
                       time_step_limit=limit)
    hf = HFMamba2Mixer(cfg, layer_idx=0)
    assert {k: v.shape for k, v in hf.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, t, d)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, want = ours(xs[0], NO_CACHE), hf(xs[1])
    assert rel_err(y, want) < 1e-4
    w = torch.randn_like(want)
    (y * w).sum().backward()
    (want * w).sum().backward()
    assert rel_err(xs[0].grad, xs[1].grad) < 1e-4
    theirs = dict(hf.named_parameters())
    for n, param in ours.named_parameters():  # T = 1 from a zero state: A's gradient is exactly zero on both sides
        ref = theirs[n].grad
        assert torch.equal(param.grad, ref) if not ref.any() else rel_err(param.grad, ref) < 1e-4, n


def test_decode_equals_the_full_forward_with_a_time_step_limit():
    """Prefill (from a cache row holding another sequence's state), then one token at a time: the conv and SSM
    states carry exactly, and dt is clamped as in the full forward."""
    from olmo_hybrid.model.cache import Mamba2LayerState

    dims = dict(d_model=30, num_heads=4, head_dim=15, state_size=11, n_groups=2, conv_kernel=3)
    m = random_mixer(**dims, use_conv_bias=False, time_step_limit=(0.05, 0.2))
    x = torch.randn(2, 70, 30)
    state = Mamba2LayerState(conv=torch.randn(2, m.conv_dim, 2), ssm=torch.randn(2, 4, 15, 11))  # stale rows
    with torch.no_grad():
        full = m(x, NO_CACHE)
        steps = [m(x[:, :33], ForwardContext(rope=None, start=0), state)]
        for t in range(33, 70):
            pos = torch.full((2,), t)
            steps.append(m(x[:, t:t + 1], ForwardContext(rope=None, positions=pos, lengths=pos + 1), state))
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


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
