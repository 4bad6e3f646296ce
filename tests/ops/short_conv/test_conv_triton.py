"""Triton short causal conv kernels vs the float64 PyTorch reference: outputs, final states and gradients.

Tolerances (relative L2 error): 1e-5 for float32 inputs (a 4-tap sum in fp32), 5e-3 for bfloat16 (rounding of
the bf16 outputs and gradients). Runs in Triton's interpreter without a GPU; ``gpu`` tests at model sizes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of triton (see ops/triton_runtime.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from olmo_hybrid.ops import causal_conv1d, causal_conv1d_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


def rel_err(x, ref):
    assert torch.isfinite(x).all()
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check(B, T, C, W, dtype, activation="silu", use_h0=True, cu_seqlens=None, reset_mask=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    x = torch.randn(B, T, C, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(C, W, generator=gen).to(dtype).to(DEVICE)
    h0 = torch.randn(N, C, W - 1, generator=gen).to(dtype).to(DEVICE) if use_h0 else None
    cu = torch.tensor(cu_seqlens, device=DEVICE) if cu_seqlens is not None else None
    reset = reset_mask.to(DEVICE) if reset_mask is not None else None
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, h0)]
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, h0)]
    kw = dict(activation=activation, output_final_state=True, cu_seqlens=cu, reset_mask=reset)
    y, s = causal_conv1d(ours[0], ours[1], initial_state=ours[2], backend="triton", **kw)
    y_ref, s_ref = causal_conv1d(ref[0], ref[1], initial_state=ref[2], backend="torch", **kw)
    assert y.dtype == dtype and s.shape == s_ref.shape
    dy = torch.randn_like(y_ref)
    ds = torch.randn_like(s_ref)
    ((y.double() * dy).sum() + (s.double() * ds).sum()).backward()
    ((y_ref * dy).sum() + (s_ref * ds).sum()).backward()
    errs = {"y": rel_err(y, y_ref), "final_state": rel_err(s, s_ref) if s_ref.abs().sum() > 0 else 0.0}
    for name, a, b in zip(["dx", "dweight", "dh0"], ours, ref):
        if a is not None:
            errs[name] = rel_err(a.grad, b.grad)
    bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]}: {bad} (all {errs})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", None])
def test_conv_fixed_length(dtype, activation):
    check(B=2, T=70, C=40, W=4, dtype=dtype, activation=activation)


@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_conv_rows_shorter_and_longer_than_the_window(T):
    # T < W-1: the final state still holds part of the initial state (the gather path); T >= W-1: a slice of x.
    check(B=2, T=T, C=8, W=4, dtype=torch.float32, seed=T)


def test_conv_packed_documents_without_initial_state():
    check(B=1, T=100, C=24, W=4, dtype=torch.float32, use_h0=False, cu_seqlens=[0, 1, 3, 50, 100], seed=1)


def test_conv_packed_documents_and_resets():
    gen = torch.Generator().manual_seed(2)
    reset = torch.rand(1, 90, generator=gen) < 0.1
    reset[0, 31] = True
    reset[0, 89] = True  # a one-token last document: the final state is mostly zeros
    check(B=1, T=90, C=16, W=4, dtype=torch.float32, cu_seqlens=[0, 2, 30, 90], reset_mask=reset, seed=2)


def test_conv_resets_fixed_rows_window3():
    reset = torch.zeros(2, 40, dtype=torch.bool)
    reset[0, 0] = True  # discards row 0's initial state
    reset[1, 17] = True
    check(B=2, T=40, C=8, W=3, dtype=torch.float32, reset_mask=reset, seed=3)


@pytest.mark.parametrize("inplace", [False, True])
def test_conv_step(inplace):
    B, C, W = 3, 300, 4
    x = torch.randn(B, C, device=DEVICE)
    state = torch.randn(B, C, W - 1, device=DEVICE)
    w = torch.randn(C, W, device=DEVICE)
    y_ref, s_ref = causal_conv1d_step(x.double(), state.double(), w.double(), backend="torch")
    before = state.clone()
    y, s = causal_conv1d_step(x, state, w, backend="triton", inplace=inplace)
    if inplace:
        assert s is state
    else:
        assert torch.equal(state, before)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) == 0.0


def test_conv_compile_fullgraph():
    x = torch.randn(1, 12, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 4, device=DEVICE, requires_grad=True)

    def f(x, w):
        return causal_conv1d(x, w, backend="triton")[0].square().sum()

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend="aot_eager")(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    f(x, w).backward()
    assert rel_err(gx, x.grad) < 1e-6 and rel_err(gw, w.grad) < 1e-6


def test_conv_custom_ops_pass_opcheck():
    import olmo_hybrid.ops.short_conv.custom_ops  # noqa: F401  (defines the torch.ops.olmo_hybrid conv ops)
    from olmo_hybrid.ops.short_conv.kernels import conv_bounds

    x = torch.randn(1, 10, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    h0 = torch.randn(2, 8, 3, device=DEVICE, requires_grad=True)
    doc_start, init_row = conv_bounds(1, 10, torch.tensor([0, 4, 10], device=DEVICE), None, DEVICE)
    state = torch.randn(2, 8, 3, device=DEVICE)
    pool = torch.randn(5, 8, 3, device=DEVICE)
    active = torch.tensor([True, False], device=DEVICE)
    step = (x[0, :2].detach(), state, w.detach())
    strided = (x[0, :2].detach(), pool[1::2], w.detach())  # every other row of a pool, one row inactive
    cases = [
        (torch.ops.olmo_hybrid.causal_conv1d_fwd.default, (x, w, None, None, None, True)),
        (torch.ops.olmo_hybrid.causal_conv1d_fwd.default, (x, w, h0, doc_start, init_row, False)),
        (torch.ops.olmo_hybrid.causal_conv1d_step.default, (*step, None, True)),
        (torch.ops.olmo_hybrid.causal_conv1d_step_.default, (*step, None, True)),
        (torch.ops.olmo_hybrid.causal_conv1d_step.default, (*strided, active, True)),
        (torch.ops.olmo_hybrid.causal_conv1d_step_.default, (*strided, active, False)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.gpu
def test_gpu_conv_model_size_bf16():
    lengths = [1, 3, 2000, 500, 1592]
    cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    check(B=1, T=sum(lengths), C=3 * 2880, W=4, dtype=torch.bfloat16, cu_seqlens=cu, seed=4)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,C", [(4, 32, 32), (2, 1, 48), (3, 63, 16)])
def test_gpu_conv_small_and_odd_shapes(B, T, C):
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, T // 2] = True
    check(B=B, T=T, C=C, W=4, dtype=torch.bfloat16, reset_mask=reset, seed=5)
