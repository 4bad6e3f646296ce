"""Triton SSD kernels vs the float64 token-loop reference: outputs, final states and every gradient (x, dt, A,
B, C, D, initial state), packed documents, resets, the decode step, torch.compile and the custom-op contract.

Without a GPU the kernels run in Triton's interpreter (tiny shapes); the ``gpu`` tests run the compiled kernels
at Mamba2's head shape (P = 64, N = 128) and at odd small shapes (``pytest -m gpu`` on the device machine).

Tolerances (relative L2 error): float32 inputs 1e-4 (exact fp32 dots; measured ~1e-6 in the interpreter).
bfloat16 x, B, C (dt, A in float32, as the mixer passes them): the kernels use bf16 dot operands with fp32
accumulation; 2e-2 in the interpreter (whose fp32 -> bf16 casts truncate; measured up to 9e-3) and 1e-2 on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of triton (see ops/triton_runtime.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from test_ssd_reference import make_inputs, rel_err  # noqa: E402  (this folder is on sys.path under pytest)

from olmo_hybrid.ops import BackendUnavailableError, KernelSettings, recurrent_ssd, ssd, ssd_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2 if DEVICE == "cpu" else 1e-2}


def check_against_reference(inputs, dtype, use_d=True, use_h0=True, cu_seqlens=None, reset_mask=None, tol=None,
                            loss_on_state=True):
    """Triton (x, B, C in ``dtype``; dt, A, D, h0 float32) against the float64 loop on the same rounded values."""
    tol = TOL[dtype] if tol is None else tol
    names = ["x", "dt", "A", "B", "C", "D", "h0"]
    keep = [True] * 5 + [use_d, use_h0]
    cast = [dtype, torch.float32, torch.float32, dtype, dtype, torch.float32, torch.float32]
    ours = [t.detach().to(DEVICE, c).requires_grad_() if k else None for t, c, k in zip(inputs, cast, keep)]
    ref = [t.detach().double().requires_grad_() if k else None for t, k in zip(ours, keep)]
    kw = dict(output_final_state=True, cu_seqlens=cu_seqlens, reset_mask=reset_mask)
    y, s = ssd(*ours[:6], initial_state=ours[6], backend="triton", **kw)
    y_ref, s_ref = recurrent_ssd(*ref[:6], initial_state=ref[6], backend="torch", **kw)
    assert y.dtype == dtype and s.dtype == torch.float32
    def loss(y, s, dy, ds):
        # without loss_on_state the final state gets no gradient at all (None, not zeros) in the backward
        return (y.double() * dy).sum() + ((s.double() * ds).sum() if loss_on_state else 0)

    dy, ds = torch.randn_like(y_ref), torch.randn_like(s_ref)
    loss(y, s, dy, ds).backward()
    loss(y_ref, s_ref, dy, ds).backward(retain_graph=True)
    # dA and dD hold one value per head, each a sum over every token of terms of either sign: with few heads, one
    # draw of dy can cancel a sum far below its terms, while the kernel's rounding error stays the terms' size
    # (in the interpreter, this kernel's bf16 dA error against float64 was 3.6e-3..1.3e-1 over 32 draws at
    # B4 T32 H2: benchmarks/results/ssd_bf16_error_spread_cpu_2026-12-07.log). So a gradient's error is taken
    # relative to the larger of its own norm and its typical norm: the RMS over three more draws of dy and ds.
    leaves = [b for b, k in zip(ref, keep) if k]
    draws = [torch.autograd.grad(loss(y_ref, s_ref, torch.randn_like(y_ref), torch.randn_like(s_ref)), leaves,
                                 retain_graph=True, allow_unused=True, materialize_grads=True) for _ in range(3)]
    typical = [torch.stack([g.norm() for g in gs]).square().mean().sqrt() for gs in zip(*draws)]
    errs = {"y": rel_err(y, y_ref), "final_state": rel_err(s, s_ref)}
    grads = [(n, a) for n, a, k in zip(names, ours, keep) if k]
    for (n, a), b, size in zip(grads, leaves, typical):
        assert torch.isfinite(a.grad).all(), f"d{n} has non-finite values"
        scale = torch.maximum(b.grad.norm(), size).clamp_min(1e-30)
        errs["d" + n] = ((a.grad.double() - b.grad).norm() / scale).item()
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_matches_reference_grouped_heads(dtype):
    inputs = make_inputs(Bsz=1, T=77, H=4, P=24, G=2, N=20, seed=1)
    check_against_reference(inputs, dtype)


def test_chunk_several_state_and_head_tiles():
    """N = P = 80: two N tiles in the sequential kernels and two P tiles everywhere (the ladder's P = 256 loops
    over four on the GPU), the last of each partial."""
    inputs = make_inputs(Bsz=1, T=40, H=2, P=80, G=1, N=80, seed=9)
    check_against_reference(inputs, torch.float32)


def test_chunk_fast_decay_no_skip_no_initial_state():
    inputs = make_inputs(Bsz=1, T=70, H=2, P=16, G=1, N=16, decay="fast", seed=2)
    check_against_reference(inputs, torch.float32, use_d=False, use_h0=False, loss_on_state=False)


def test_chunk_packed_documents_with_resets():
    lengths = [1, 2, 63, 64, 65, 130]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=DEVICE)
    T = sum(lengths)
    reset = torch.rand(1, T, generator=torch.Generator().manual_seed(3)) < 0.03
    reset[0, 0] = reset[0, 64] = True  # a reset discarding the initial state, and one at a chunk start
    inputs = make_inputs(Bsz=1, T=T, H=2, P=16, G=1, N=16, rows=len(lengths), seed=3)
    check_against_reference(inputs, torch.float32, cu_seqlens=cu, reset_mask=reset.to(DEVICE))


@pytest.mark.parametrize("inplace", [False, True])
def test_decode_step_matches_reference(inplace):
    x, dt, A, B, C, D, _ = (t.to(DEVICE) for t in make_inputs(Bsz=3, T=1, H=4, P=24, G=2, N=20, seed=4))
    pool = torch.randn(5, 4, 24, 20, device=DEVICE)
    before = pool.clone()
    state = pool[1:4]  # a row slice of a larger pool
    active = torch.tensor([True, False, True], device=DEVICE)
    step_args = (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    y_ref, s_ref = ssd_step(*(t.double() for t in step_args), state.double(), D.double(), backend="torch")
    y, s = ssd_step(*step_args, state, D, inplace=inplace, active=active, backend="triton")
    assert rel_err(y[active], y_ref[active]) < 1e-5 and rel_err(s[active], s_ref[active]) < 1e-5
    assert torch.equal(s[1], before[2]), "an inactive row changed"
    assert torch.equal(y[1], torch.zeros_like(y[1])), "an inactive row's output must be zeros"
    if inplace:
        assert s.data_ptr() == state.data_ptr() and torch.equal(pool[[0, 4]], before[[0, 4]])
    else:
        assert torch.equal(pool, before), "the out-of-place step must not modify its input state"


def test_decode_steps_continue_the_chunked_prefill():
    x, dt, A, B, C, D, h0 = (t.to(DEVICE) for t in make_inputs(Bsz=2, T=40, H=2, P=16, G=1, N=16, seed=5))
    with torch.no_grad():
        y_all, _ = ssd(x, dt, A, B, C, D, initial_state=h0, backend="triton")
        _, state = ssd(x[:, :30], dt[:, :30], A, B[:, :30], C[:, :30], D, initial_state=h0,
                       output_final_state=True, backend="triton")
        for t in range(30, 40):
            y_t, _ = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D, inplace=True, backend="triton")
            assert rel_err(y_t, y_all[:, t]) < 1e-4


def test_compile_fullgraph_traces_custom_ops():
    """torch.compile traces forward and backward through the fake implementations without graph breaks."""
    inputs = [t.to(DEVICE) for t in make_inputs(Bsz=1, T=20, H=2, P=16, G=1, N=16, seed=6)][:6]

    def layer(x, dt, A, B, C, D):
        y, s = ssd(x, dt, A, B, C, D, output_final_state=True, backend="triton")
        return (y * y).sum() + s.sum()

    eager = [t.clone().requires_grad_() for t in inputs]
    layer(*eager).backward()  # first: loads the kernels (the import itself is not traced)
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = torch.compile(layer, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    assert rel_err(loss.detach(), layer(*inputs).detach()) < 1e-6
    for a, b in zip(leaves, eager):
        assert rel_err(a.grad, b.grad) < 1e-6


def test_custom_ops_pass_opcheck():
    """Schemas, fake (meta) implementations, autograd registration and AOT dispatch of the custom ops."""
    from olmo_hybrid.ops.ssd import custom_ops  # noqa: F401  (defines the torch.ops.olmo_hybrid.ssd_* ops)

    x, dt, A, B, C, D, h0 = (t.to(DEVICE) for t in make_inputs(Bsz=1, T=20, H=2, P=16, G=1, N=16, rows=2, seed=7))
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
    cu = torch.tensor([0, 5, 20], device=DEVICE)
    state = torch.randn(1, 2, 16, 16, device=DEVICE)
    step = (*(t[:, 0].detach() for t in (x, dt)), A.detach(), *(t[:, 0].detach() for t in (B, C)), D.detach(),
            state, torch.tensor([True], device=DEVICE))
    cases = [
        (torch.ops.olmo_hybrid.ssd_chunk_fwd.default, (*leaves, None, None, None, "bf16", "bf16")),
        (torch.ops.olmo_hybrid.ssd_chunk_fwd.default, (*(t.detach() for t in leaves), h0, cu, None, "bf16", "bf16")),
        (torch.ops.olmo_hybrid.ssd_step_.default, step),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_backend_selection_and_refusals():
    x, dt, A, B, C, D, _ = make_inputs(Bsz=1, T=5, H=2, P=4, G=1, N=8, seed=8)
    if DEVICE == "cpu":  # auto picks the reference on CPU tensors even though the interpreter could run them
        assert torch.equal(ssd(x, dt, A, B, C, D, backend="auto")[0], ssd(x, dt, A, B, C, D, backend="torch")[0])
    with pytest.raises(BackendUnavailableError, match="float64"):
        ssd(x.double(), dt, A, B, C, D, backend="triton")
    big = torch.randn(1, 5, 1, 256)
    with pytest.raises(BackendUnavailableError, match="N=256"):
        ssd(x.to(DEVICE), dt.to(DEVICE), A.to(DEVICE), big.to(DEVICE), big.to(DEVICE), backend="triton")
    with pytest.raises(BackendUnavailableError, match="no implementation of recurrent_ssd"):
        recurrent_ssd(x, dt, A, B, C, D, backend="triton")
    tf32 = KernelSettings(dot="tf32")
    args16 = [t.to(DEVICE, torch.bfloat16) if i in (0, 3, 4) else t.to(DEVICE) for i, t in enumerate((x, dt, A, B, C))]
    with pytest.raises(BackendUnavailableError, match=r"KernelSettings.dot='tf32'"):
        ssd(*args16, settings=tf32, backend="triton")
    ssd(*(t.float() for t in args16), settings=tf32, backend="triton")  # fp32 inputs: exact products, no choice


# ---------------------------------------------------------------------------------------------------------------
# GPU: Mamba2's head shape, bf16, long packed documents, small and odd shapes.


@pytest.mark.gpu
@pytest.mark.parametrize("P,G,N", [(256, 1, 128), (64, 1, 128), (64, 8, 128), (128, 2, 64), (32, 1, 16)])
def test_gpu_chunk_head_shapes(P, G, N):
    inputs = make_inputs(Bsz=2, T=300, H=8, P=P, G=G, N=N, seed=10)  # P=256, N=128: the 1b ladder head
    check_against_reference(inputs, torch.bfloat16)
    check_against_reference(inputs, torch.float32)


@pytest.mark.gpu
def test_gpu_chunk_packed_documents_bf16():
    gen = torch.Generator().manual_seed(11)
    lengths = [1, 2000] + torch.randint(1, 200, (4,), generator=gen).tolist()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=DEVICE)
    T = sum(lengths)
    reset = (torch.rand(1, T, generator=gen) < 0.002).to(DEVICE)
    inputs = make_inputs(Bsz=1, T=T, H=4, P=64, G=1, N=128, rows=len(lengths), seed=11)
    check_against_reference(inputs, torch.bfloat16, cu_seqlens=cu, reset_mask=reset)


@pytest.mark.gpu
@pytest.mark.parametrize("Bsz,T,H,P,G,N,resets", [
    (4, 32, 2, 16, 1, 16, False),  # a tiny trainer-sized layer
    (4, 32, 2, 16, 2, 16, True),
    (2, 1, 2, 16, 1, 16, False),  # one token: a single 1-row chunk
    (3, 63, 4, 24, 2, 20, True),  # sizes that are not powers of two
    (1, 65, 2, 64, 1, 128, False),
])
def test_gpu_small_and_odd_shapes(Bsz, T, H, P, G, N, resets):
    reset = None
    if resets:
        reset = torch.rand(Bsz, T, generator=torch.Generator().manual_seed(12)) < 0.1
        reset[:, 0] = True
        reset = reset.to(DEVICE)
    inputs = make_inputs(Bsz=Bsz, T=T, H=H, P=P, G=G, N=N, seed=12)
    check_against_reference(inputs, torch.float32, reset_mask=reset)
    check_against_reference(inputs, torch.bfloat16, reset_mask=reset)


@pytest.mark.gpu
def test_gpu_decode_batch():
    x, dt, A, B, C, D, _ = (t.to(DEVICE) for t in make_inputs(Bsz=128, T=1, H=64, P=64, G=1, N=128, seed=13))
    state = torch.randn(128, 64, 64, 128, device=DEVICE)
    args = (x[:, 0].bfloat16(), dt[:, 0], A, B[:, 0].bfloat16(), C[:, 0].bfloat16())
    y_ref, s_ref = ssd_step(*(t.double() for t in args), state.double(), D.double(), backend="torch")
    y, _ = ssd_step(*args, state, D, inplace=True, backend="triton")
    assert rel_err(y, y_ref) < 5e-3 and rel_err(state, s_ref) < 1e-5
