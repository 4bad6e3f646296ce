"""The decode step's in-place update and active-row mask through the public op, on the torch reference (the
specification) and the Triton kernel (interpreted without a GPU), on fresh random inputs.

In-place and out-of-place run the same arithmetic, so they must agree bit for bit, and rows marked inactive must
keep their state bit for bit. Active rows against the float64 reference: relative L2 error 1e-5 for the float32
state (and for the output of float32 inputs), 5e-3 for bfloat16 outputs (their own rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # without a GPU, tests/conftest.py has asked for its interpreter

from olmo_hybrid.ops import BackendUnavailableError, gated_delta_rule_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def step_inputs(B, H, HV, K, V, dtype, seed):
    """q, k, v, g, beta for one token, a float32 state pool of 2B + 2 rows, and an active mask with both values."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, K, generator=gen), torch.randn(B, H, K, generator=gen)
    v = torch.randn(B, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, HV, generator=gen) + 2.0)
    beta = 2.0 * torch.rand(B, HV, generator=gen)
    pool = torch.randn(2 * B + 2, HV, K, V, generator=gen)
    active = torch.rand(B, generator=gen) < 0.5
    active[0], active[-1] = True, False
    inputs = [x.to(dtype).to(DEVICE) for x in (q, k, v, g, beta)]
    return inputs, pool.to(DEVICE), active.to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_out_of_place_and_skips_inactive_rows(backend, dtype):
    B = 5
    inputs, pool, active = step_inputs(B, H=2, HV=4, K=16, V=32, dtype=dtype, seed=1)
    kw = dict(use_qk_l2norm_in_kernel=True, backend=backend)
    state = pool[1:2 * B:2]  # every other row of a larger pool: a row stride of two rows
    others = torch.ones(len(pool), dtype=torch.bool, device=DEVICE)
    others[1:2 * B:2] = False
    before = pool.clone()
    o, new = gated_delta_rule_step(*inputs, state, active=active, **kw)
    assert torch.equal(pool, before), "the out-of-place step must not modify its input state"
    assert torch.equal(new[~active], state[~active]) and new.dtype == torch.float32
    assert torch.equal(o[~active], torch.zeros_like(o[~active]))

    o_in, out = gated_delta_rule_step(*inputs, state, active=active, inplace=True, **kw)
    assert out.data_ptr() == state.data_ptr() and out.shape == state.shape
    assert torch.equal(o_in, o) and torch.equal(state, new)
    assert torch.equal(pool[others], before[others]), "rows outside the view changed"
    assert torch.equal(state[~active], before[1:2 * B:2][~active]), "inactive rows changed"

    o_ref, s_ref = gated_delta_rule_step(*(x.double() for x in inputs), before[1:2 * B:2].double(),
                                         use_qk_l2norm_in_kernel=True, backend="torch")
    assert rel_err(o[active], o_ref[active]) < OUT_TOL[dtype]
    assert rel_err(new[active], s_ref[active]) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_rows_active_equals_no_mask(backend):
    inputs, pool, _ = step_inputs(3, H=1, HV=2, K=16, V=16, dtype=torch.float32, seed=2)
    kw = dict(use_qk_l2norm_in_kernel=True, backend=backend)
    o, s = gated_delta_rule_step(*inputs, pool[:3], **kw)
    o_all, s_all = gated_delta_rule_step(*inputs, pool[:3], active=torch.ones(3, dtype=torch.bool, device=DEVICE),
                                         **kw)
    assert torch.equal(o, o_all) and torch.equal(s, s_all)
    state = pool[:3].clone()
    o_in, _ = gated_delta_rule_step(*inputs, state, inplace=True, **kw)
    assert torch.equal(o_in, o) and torch.equal(state, s)


def test_triton_step_matches_the_reference_on_strided_rows():
    """A state whose rows are not contiguous: out of place the kernel reads a copy; in place it refuses by name."""
    inputs, pool, active = step_inputs(4, H=2, HV=2, K=16, V=16, dtype=torch.float32, seed=3)
    state = pool[:4].transpose(2, 3).contiguous().transpose(2, 3)  # [B, HV, K, V] with K and V strides swapped
    o, s = gated_delta_rule_step(*inputs, state, active=active, backend="triton")
    o_ref, s_ref = gated_delta_rule_step(*inputs, state, active=active, backend="torch")
    assert rel_err(o[active], o_ref[active]) < 1e-5 and torch.equal(s[~active], state[~active])
    assert rel_err(s, s_ref) < 1e-5
    with pytest.raises(BackendUnavailableError, match=r"state row state\[b\] contiguous"):
        gated_delta_rule_step(*inputs, state, inplace=True, backend="triton")


def test_bad_step_arguments_name_the_argument():
    inputs, pool, active = step_inputs(2, H=1, HV=1, K=8, V=8, dtype=torch.float32, seed=4)
    with pytest.raises(ValueError, match=r"active must be a bool tensor \[B=2\]"):
        gated_delta_rule_step(*inputs, pool[:2], active=active.long())
    with pytest.raises(ValueError, match=r"active must be a bool tensor \[B=2\]"):
        gated_delta_rule_step(*inputs, pool[:2], active=active[:1])
    with pytest.raises(TypeError, match="inplace=True needs state in torch.float32"):
        gated_delta_rule_step(*inputs, pool[:2].bfloat16(), inplace=True)
    with pytest.raises(TypeError, match="settings must be an olmo_hybrid.ops.KernelSettings"):
        gated_delta_rule_step(*inputs, pool[:2], settings={"dot": "tf32"})
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="active must be on the state's device"):
            gated_delta_rule_step(*inputs, pool[:2], active=active.to("meta"))


@pytest.mark.gpu
def test_gpu_inplace_active_step_in_a_cuda_graph():
    """The in-place, active-row step captured in a CUDA graph: replays read the mask, the inputs and the pool rows
    as they are at replay time (no host sync, nothing baked in at capture)."""
    B, H, HV, K, V = 8, 2, 4, 128, 128
    inputs, pool, active = step_inputs(B, H, HV, K, V, dtype=torch.bfloat16, seed=5)
    state = pool[1:2 * B:2]
    others = torch.ones(len(pool), dtype=torch.bool, device=DEVICE)
    others[1:2 * B:2] = False
    kw = dict(use_qk_l2norm_in_kernel=True, inplace=True, backend="triton")
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gated_delta_rule_step(*inputs, state, active=active, **kw)  # warm-up (compiles the kernel)
        with torch.cuda.graph(graph, stream=stream):
            o, _ = gated_delta_rule_step(*inputs, state, active=active, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (6, 7):
        fresh, fresh_pool, fresh_active = step_inputs(B, H, HV, K, V, dtype=torch.bfloat16, seed=seed)
        for dst, src in zip(inputs, fresh):
            dst.copy_(src)
        pool.copy_(fresh_pool)
        active.copy_(fresh_active)
        before = pool.clone()
        graph.replay()
        torch.cuda.synchronize()
        o_ref, s_ref = gated_delta_rule_step(*fresh, before[1:2 * B:2], active=fresh_active,
                                             use_qk_l2norm_in_kernel=True, backend="torch")
        assert torch.equal(state[~fresh_active], before[1:2 * B:2][~fresh_active])
        assert torch.equal(pool[others], before[others])
        assert rel_err(state, s_ref) < 1e-5 and rel_err(o[fresh_active], o_ref[fresh_active]) < 5e-3
        assert torch.equal(o[~fresh_active], torch.zeros_like(o[~fresh_active]))


@pytest.mark.gpu
def test_gpu_inplace_active_step_at_the_7b_head_shape():
    B, H, HV, K, V = 64, 30, 30, 96, 192
    inputs, pool, active = step_inputs(B, H, HV, K, V, dtype=torch.bfloat16, seed=8)
    before = pool.clone()
    o, s = gated_delta_rule_step(*inputs, pool[2:B + 2], active=active, inplace=True, use_qk_l2norm_in_kernel=True,
                                 backend="triton")
    o_ref, s_ref = gated_delta_rule_step(*(x.double() for x in inputs), before[2:B + 2].double(), active=active,
                                         use_qk_l2norm_in_kernel=True, backend="torch")
    assert torch.equal(pool[:2], before[:2]) and torch.equal(pool[B + 2:], before[B + 2:])
    assert torch.equal(s[~active], before[2:B + 2][~active])
    assert rel_err(s, s_ref) < 1e-5 and rel_err(o[active], o_ref[active]) < 5e-3
