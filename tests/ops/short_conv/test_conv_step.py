"""The conv decode step's in-place update and active-row mask through the public op, on the torch reference
(the specification) and the Triton kernel (interpreted without a GPU), on fresh random inputs.

The new state is a shift of the inputs (exact), so states are compared bit for bit everywhere: in-place against
out-of-place, inactive rows against their old values, and the Triton kernel against the reference. Outputs of
active rows against the float64 reference: relative L2 error 1e-5 for float32, 5e-3 for bfloat16 (its rounding).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, tests/conftest.py has asked for its interpreter

from olmo_hybrid.ops import BackendUnavailableError, causal_conv1d_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def step_inputs(B, C, W, dtype, seed):
    """x [B, C], weight [C, W], a state pool of 2B + 2 rows [.., C, W-1] and an active mask with both values."""
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(B, C, generator=gen), torch.randn(C, W, generator=gen)
    pool = torch.randn(2 * B + 2, C, W - 1, generator=gen)
    active = torch.rand(B, generator=gen) < 0.5
    active[0], active[-1] = True, False
    return x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), pool.to(dtype).to(DEVICE), active.to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_out_of_place_and_skips_inactive_rows(backend, dtype):
    B, C = 5, 40
    x, w, pool, active = step_inputs(B, C, 4, dtype, seed=1)
    state = pool[1:2 * B:2]  # every other row of a larger pool: a row stride of two rows
    others = torch.ones(len(pool), dtype=torch.bool, device=DEVICE)
    others[1:2 * B:2] = False
    before = pool.clone()
    y, new = causal_conv1d_step(x, state, w, active=active, backend=backend)
    assert torch.equal(pool, before), "the out-of-place step must not modify its input state"
    assert torch.equal(new[~active], state[~active]) and new.dtype == dtype
    assert torch.equal(new[active], torch.cat([state[..., 1:], x[..., None]], -1)[active])
    assert torch.equal(y[~active], torch.zeros_like(y[~active]))

    y_in, out = causal_conv1d_step(x, state, w, active=active, inplace=True, backend=backend)
    assert out.data_ptr() == state.data_ptr() and out.shape == state.shape
    assert torch.equal(y_in, y) and torch.equal(state, new)
    assert torch.equal(pool[others], before[others]), "rows outside the view changed"
    assert torch.equal(state[~active], before[1:2 * B:2][~active]), "inactive rows changed"

    y_ref, _ = causal_conv1d_step(x.double(), before[1:2 * B:2].double(), w.double(), backend="torch")
    assert rel_err(y[active], y_ref[active]) < OUT_TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_rows_active_equals_no_mask(backend):
    x, w, pool, _ = step_inputs(3, 24, 3, torch.float32, seed=2)
    y, s = causal_conv1d_step(x, pool[:3], w, activation=None, backend=backend)
    y_all, s_all = causal_conv1d_step(x, pool[:3], w, activation=None, backend=backend,
                                      active=torch.ones(3, dtype=torch.bool, device=DEVICE))
    assert torch.equal(y, y_all) and torch.equal(s, s_all)
    state = pool[:3].clone()
    y_in, _ = causal_conv1d_step(x, state, w, activation=None, inplace=True, backend=backend)
    assert torch.equal(y_in, y) and torch.equal(state, s)


def test_triton_step_on_strided_rows_and_refusal_in_place():
    x, w, pool, active = step_inputs(4, 16, 4, torch.float32, seed=3)
    state = pool[:4].transpose(1, 2).contiguous().transpose(1, 2)  # rows [C, W-1] stored column-major
    y, s = causal_conv1d_step(x, state, w, active=active, backend="triton")
    y_ref, s_ref = causal_conv1d_step(x, state, w, active=active, backend="torch")
    assert torch.equal(s, s_ref) and rel_err(y, y_ref) < 1e-5
    with pytest.raises(BackendUnavailableError, match=r"conv_state\[b\] contiguous"):
        causal_conv1d_step(x, state, w, inplace=True, backend="triton")


def test_bad_step_arguments_name_the_argument():
    x, w, pool, active = step_inputs(2, 8, 4, torch.float32, seed=4)
    with pytest.raises(ValueError, match=r"active must be a bool tensor \[B=2\]"):
        causal_conv1d_step(x, pool[:2], w, active=active.float())
    with pytest.raises(ValueError, match=r"active must be a bool tensor \[B=2\]"):
        causal_conv1d_step(x, pool[:2], w, active=active[None])


@pytest.mark.gpu
def test_gpu_inplace_active_conv_step_in_a_cuda_graph():
    """Captured once, replayed with new inputs, pool contents and mask: each replay reads them at replay time."""
    B, C, W = 16, 3 * 2880, 4
    x, w, pool, active = step_inputs(B, C, W, torch.bfloat16, seed=5)
    state = pool[1:2 * B:2]
    others = torch.ones(len(pool), dtype=torch.bool, device=DEVICE)
    others[1:2 * B:2] = False
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        causal_conv1d_step(x, state, w, active=active, inplace=True, backend="triton")  # warm-up
        with torch.cuda.graph(graph, stream=stream):
            y, _ = causal_conv1d_step(x, state, w, active=active, inplace=True, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (6, 7):
        fx, _, fpool, factive = step_inputs(B, C, W, torch.bfloat16, seed=seed)
        x.copy_(fx)
        pool.copy_(fpool)
        active.copy_(factive)
        before = pool.clone()
        graph.replay()
        torch.cuda.synchronize()
        y_ref, s_ref = causal_conv1d_step(fx, before[1:2 * B:2], w, active=factive, backend="torch")
        assert torch.equal(state, s_ref) and rel_err(y, y_ref) < 5e-3
        assert torch.equal(pool[others], before[others]), "rows outside the view changed"
