"""The SSD op's PyTorch reference (``olmo_hybrid.ops.ssd``): the chunked form against the float64 token loop
(outputs, final states, every gradient), document boundaries against separate runs, the decode step, and
transformers' own chunked scan as a peer.

Tolerances (relative L2 error): float64 chunked vs float64 loop 1e-10 (the same math, reassociated); float32
chunked vs float64 loop 2e-5 (float32 rounding over a few hundred tokens, measured ~1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from olmo_hybrid.ops import recurrent_ssd, ssd, ssd_step


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(Bsz, T, H, P, G, N, rows=None, decay="normal", seed=0, dtype=torch.float32):
    """x, dt, A, B, C, D, h0 as Mamba2 produces them: dt = softplus(.) > 0, A < 0."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    dt = F.softplus(rand(Bsz, T, H) - 1.0)
    if decay == "normal":
        A = -(0.5 + 4 * torch.rand(H, generator=gen))
    else:  # "fast": exp(dt A) underflows within a few tokens; the chunk's cumulative decay reaches ~1e-300
        A = -(200 + 100 * torch.rand(H, generator=gen))
    tensors = (rand(Bsz, T, H, P), dt, A, rand(Bsz, T, G, N) / N ** 0.5, rand(Bsz, T, G, N), rand(H),
               rand(rows or Bsz, H, P, N))
    return [t.to(dtype) for t in tensors]


def run_both(inputs, chunk_dtype, use_d=True, use_h0=True, cu_seqlens=None, reset_mask=None):
    """Chunked (in chunk_dtype) and float64 loop, forward and backward with random cotangents; returns the
    relative error of every output and gradient."""
    names = ["x", "dt", "A", "B", "C", "D", "h0"]
    keep = [True] * 5 + [use_d, use_h0]
    ours = [t.detach().to(chunk_dtype).clone().requires_grad_() if k else None for t, k in zip(inputs, keep)]
    ref = [t.detach().double().requires_grad_() if k else None for t, k in zip(inputs, keep)]
    kw = dict(output_final_state=True, cu_seqlens=cu_seqlens, reset_mask=reset_mask)
    y, s = ssd(*ours[:6], initial_state=ours[6], backend="torch", **kw)
    y_ref, s_ref = recurrent_ssd(*ref[:6], initial_state=ref[6], backend="torch", **kw)
    assert y.dtype == chunk_dtype and s.dtype == torch.promote_types(chunk_dtype, torch.float32)
    dy, ds = torch.randn_like(y_ref), torch.randn_like(s_ref)
    ((y.double() * dy).sum() + (s.double() * ds).sum()).backward()
    ((y_ref * dy).sum() + (s_ref * ds).sum()).backward()
    errs = {"y": rel_err(y, y_ref), "final_state": rel_err(s, s_ref)}
    errs.update({"d" + n: rel_err(a.grad, b.grad) for n, a, b, k in zip(names, ours, ref, keep) if k})
    return errs


def assert_close(errs: dict, tol: float) -> None:
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("decay", ["normal", "fast"])
def test_chunked_matches_float64_token_loop(dtype, tol, decay):
    inputs = make_inputs(Bsz=2, T=150, H=4, P=8, G=2, N=16, decay=decay, seed=1)
    assert_close(run_both(inputs, dtype), tol)


def test_chunked_matches_loop_without_skip_or_initial_state_one_group():
    inputs = make_inputs(Bsz=1, T=70, H=3, P=5, G=1, N=6, seed=2)
    assert_close(run_both(inputs, torch.float32, use_d=False, use_h0=False), 2e-5)


def test_packed_documents_and_resets_match_the_loop():
    lengths = [1, 2, 63, 64, 65, 90]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    T = sum(lengths)
    reset = torch.rand(1, T, generator=torch.Generator().manual_seed(3)) < 0.04
    reset[0, 0] = reset[0, 64] = True
    inputs = make_inputs(Bsz=1, T=T, H=2, P=4, G=2, N=8, rows=len(lengths), seed=3)
    assert_close(run_both(inputs, torch.float32, cu_seqlens=cu, reset_mask=reset), 2e-5)


def test_reset_equals_separate_documents():
    """A reset at token r: the row's outputs from r on and its final state are those of a fresh run over
    tokens r.., and outputs before r those of a run over tokens ..r from the initial state."""
    x, dt, A, B, C, D, h0 = make_inputs(Bsz=2, T=100, H=2, P=4, G=1, N=8, seed=4)
    r = 37
    reset = torch.zeros(2, 100, dtype=torch.bool)
    reset[:, r] = True
    y, s = ssd(x, dt, A, B, C, D, initial_state=h0, output_final_state=True, reset_mask=reset)
    y1, _ = ssd(x[:, :r], dt[:, :r], A, B[:, :r], C[:, :r], D, initial_state=h0)
    y2, s2 = ssd(x[:, r:], dt[:, r:], A, B[:, r:], C[:, r:], D, output_final_state=True)
    assert rel_err(y[:, :r], y1) < 1e-6 and rel_err(y[:, r:], y2) < 1e-6 and rel_err(s, s2) < 1e-6


def test_cu_seqlens_equals_separate_documents():
    x, dt, A, B, C, D, h0 = make_inputs(Bsz=1, T=90, H=2, P=4, G=2, N=8, rows=3, seed=5)
    cu = torch.tensor([0, 20, 21, 90])
    y, s = ssd(x, dt, A, B, C, D, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        yi, si = ssd(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], D, initial_state=h0[i:i + 1],
                     output_final_state=True)
        assert rel_err(y[:, a:b], yi) < 1e-6 and rel_err(s[i:i + 1], si) < 1e-6


def test_matches_transformers_chunk_scan():
    """transformers' PyTorch Mamba2 scan (its own chunking, chunk 16; it computes in float32) on the same inputs."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    x, dt, A, B, C, D, h0 = make_inputs(Bsz=2, T=100, H=4, P=8, G=2, N=16, seed=6)
    y_ref, s_ref = mamba2_chunk_scan(x, dt, A, B, C, chunk_size=16, D=D, initial_states=h0,
                                     return_final_states=True)
    y, s = ssd(x, dt, A, B, C, D, initial_state=h0, output_final_state=True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_step_matches_loop_and_honours_inplace_and_active():
    x, dt, A, B, C, D, _ = make_inputs(Bsz=3, T=1, H=4, P=8, G=2, N=16, seed=7)
    pool = torch.randn(5, 4, 8, 16)
    before = pool.clone()
    state = pool[1:4]  # a row slice of a larger pool
    y_ref, s_ref = recurrent_ssd(x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                                 initial_state=state.double(), output_final_state=True)
    y, s = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state, D)
    assert torch.equal(pool, before), "the out-of-place step must not modify its state"
    assert rel_err(y, y_ref[:, 0]) < 1e-6 and rel_err(s, s_ref) < 1e-6
    active = torch.tensor([True, False, True])
    y, s = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state, D, inplace=True, active=active)
    assert s.data_ptr() == state.data_ptr()
    assert torch.equal(pool[[0, 2, 4]], before[[0, 2, 4]]), "inactive rows and rows outside the slice changed"
    assert rel_err(pool[[1, 3]], s_ref[[0, 2]]) < 1e-6 and rel_err(y[active], y_ref[active, 0]) < 1e-6


@pytest.mark.parametrize("change,message", [
    (dict(dt=torch.rand(1, 5, 3)), r"dt must have shape \[B, T, H\]"),
    (dict(A=torch.rand(3)), r"A must have shape \[H\]"),
    (dict(B=torch.rand(1, 5, 3, 4)), r"B must have shape \[B, T, G, N\].*H=2 a multiple of G"),
    (dict(C=torch.rand(1, 5, 1, 3)), r"C must have shape"),
    (dict(D=torch.rand(2, 4)), r"D must have shape \[H\]"),
    (dict(initial_state=torch.rand(1, 2, 4, 3)), r"initial_state must have shape \[N_rows, H, P, N\]"),
    (dict(x=torch.ones(1, 5, 2, 4, dtype=torch.long)), r"x must be a floating-point tensor"),
])
def test_bad_arguments_are_refused_by_name(change, message):
    args = dict(x=torch.rand(1, 5, 2, 4), dt=torch.rand(1, 5, 2), A=-torch.rand(2), B=torch.rand(1, 5, 1, 4),
                C=torch.rand(1, 5, 1, 4), D=torch.rand(2), initial_state=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ssd(**args)
