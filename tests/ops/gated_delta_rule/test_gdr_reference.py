"""Gated delta rule references: the float32 chunked op against a float64 token loop, gradients included.

Error metric everywhere: rel(a, b) = max|a - b| / max|b|, with b the float64 oracle. Tolerance 2e-5 for float32
against float64 (the chunked op measures ~1e-6 on these inputs).
"""

import pytest
import torch
import torch.nn.functional as F

from olmo_hybrid.ops import (
    gated_delta_rule,
    gated_delta_rule_step,
    recurrent_gated_delta_rule,
    reset_mask_from_doc_ids,
)

TOL = 2e-5
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def make_inputs(B, T, H, K, V, HV=None, N=None, gates="mixed", beta_max=1.0, normalized_k=True, seed=0):
    """Fresh random float64 inputs; k unit-norm unless the op normalises (keeps I - beta k k^T contractive)."""
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    if normalized_k:
        k = F.normalize(k, dim=-1)
    else:  # the in-kernel l2norm must cope with arbitrary scales
        q, k = q * 3.0, k * 0.2
    v = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64)
    u = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    g = {"mixed": -u * 2.0, "near_zero": -u * 1e-3, "strong": -5.0 - 25.0 * u}[gates]
    beta = (0.02 + 0.96 * torch.rand(B, T, HV, generator=gen, dtype=torch.float64)) * beta_max
    h0 = torch.randn(N or B, HV, K, V, generator=gen, dtype=torch.float64)
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)


def run(fn, inputs, dtype, seed=1, **kwargs):
    """Run ``fn`` on leaf copies of ``inputs`` in ``dtype``; backprop random cotangents of o and the final state.
    Returns (o, final_state, {name: grad})."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}
    o, s = fn(**leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s)
    ((o * do).sum() + (s * ds).sum()).backward()
    return o.detach(), s.detach(), {n: t.grad for n, t in leaves.items()}


def assert_close(got, want, tol=TOL):
    o, s, grads = got
    o_ref, s_ref, grads_ref = want
    errors = {"o": rel(o, o_ref), "final_state": rel(s, s_ref)}
    errors.update({f"d{n}": rel(grads[n], grads_ref[n]) for n in grads_ref})
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def check_chunk_vs_loop(inputs, **kwargs):
    want = run(recurrent_gated_delta_rule, inputs, torch.float64, **kwargs)
    got = run(gated_delta_rule, inputs, torch.float32, **kwargs)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(got, want)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_chunk_matches_float64_loop(T):
    check_chunk_vs_loop(make_inputs(2, T, 2, 16, 12, seed=T))


@pytest.mark.parametrize("gates", ["near_zero", "strong"])
def test_gate_extremes(gates):
    check_chunk_vs_loop(make_inputs(2, 130, 2, 16, 12, gates=gates, seed=3))


def test_beta_up_to_two():
    inputs = make_inputs(2, 150, 2, 16, 12, beta_max=2.0, seed=4)
    assert inputs["beta"].max() > 1.9
    check_chunk_vs_loop(inputs)


def test_grouped_value_heads_and_l2norm():
    inputs = make_inputs(2, 100, 2, 16, 8, HV=4, normalized_k=False, seed=5)
    check_chunk_vs_loop(inputs, use_qk_l2norm_in_kernel=True, scale=0.3)


def test_grouped_value_heads_read_their_key_head():
    """HV = 2H equals H = HV with q/k repeated so that value head h uses key head h // 2."""
    x = make_inputs(1, 30, 2, 8, 4, HV=4, seed=16)
    grouped = gated_delta_rule(**x, output_final_state=True)
    repeated = {**x, "q": x["q"].repeat_interleave(2, 2), "k": x["k"].repeat_interleave(2, 2)}
    plain = gated_delta_rule(**repeated, output_final_state=True)
    assert rel(grouped[0], plain[0]) < 1e-12 and rel(grouped[1], plain[1]) < 1e-12


def test_l2norm_matches_explicit_normalisation():
    inputs = make_inputs(1, 70, 2, 16, 8, normalized_k=False, seed=6)
    fused = run(gated_delta_rule, inputs, torch.float64, use_qk_l2norm_in_kernel=True)
    def explicit(q, k, **kw):
        norm = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
        return recurrent_gated_delta_rule(norm(q), norm(k), **kw)
    assert_close(fused, run(explicit, inputs, torch.float64), tol=1e-10)


def test_matches_definition_without_initial_state():
    """The float64 loop itself against the recurrence written out with explicit [V, K] matrices (HF/paper form:
    S_t = a_t S_{t-1} (I - b_t k k^T) + b_t v k^T, o_t = S_t q_t), so the oracle is not only checked by itself."""
    x = make_inputs(1, 20, 1, 6, 5, beta_max=2.0, seed=7)
    q, k, v, g, beta = (x[n][0, :, 0] for n in ("q", "k", "v", "g", "beta"))
    S, outs = torch.zeros(5, 6, dtype=torch.float64), []
    for t in range(20):
        S = g[t].exp() * S @ (torch.eye(6, dtype=torch.float64) - beta[t] * torch.outer(k[t], k[t]))
        S = S + beta[t] * torch.outer(v[t], k[t])
        outs.append(S @ q[t] * 6 ** -0.5)
    o, s = recurrent_gated_delta_rule(*(x[n] for n in ("q", "k", "v", "g", "beta")), output_final_state=True)
    assert rel(o[0, :, 0], torch.stack(outs)) < 1e-12
    assert rel(s[0, 0], S.T) < 1e-12


def test_low_precision_inputs_keep_dtype():
    x = make_inputs(1, 80, 2, 16, 8, seed=8)
    bf = {n: t.to(torch.bfloat16) for n, t in x.items() if n != "initial_state"}
    o, s = gated_delta_rule(**bf, initial_state=x["initial_state"].float(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = recurrent_gated_delta_rule(**{n: t.double() for n, t in bf.items()},
                                              initial_state=x["initial_state"], output_final_state=True)
    assert rel(o, o_ref) < 1e-2 and rel(s, s_ref) < 1e-5


DOC_LENGTHS = [1, 63, 1, 1, 130, 5, 64]


def test_cu_seqlens_equals_separate_documents():
    lengths = DOC_LENGTHS
    x = make_inputs(1, sum(lengths), 2, 16, 8, HV=4, N=len(lengths), beta_max=2.0, seed=9)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)

    def per_document(q, k, v, g, beta, initial_state, output_final_state):
        outs, states = [], []
        for n in range(len(lengths)):
            sl = slice(int(cu[n]), int(cu[n + 1]))
            o, s = recurrent_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                              initial_state=initial_state[n:n + 1], output_final_state=True)
            outs.append(o)
            states.append(s)
        return torch.cat(outs, 1), torch.cat(states, 0)

    want = run(per_document, x, torch.float64)
    assert_close(run(gated_delta_rule, x, torch.float32, cu_seqlens=cu), want)
    assert_close(run(recurrent_gated_delta_rule, x, torch.float64, cu_seqlens=cu), want, tol=1e-12)


def test_cu_seqlens_long_document():
    lengths = [3, 2000, 1]
    x = make_inputs(1, sum(lengths), 1, 8, 4, N=3, seed=10)
    cu = torch.tensor([0] + lengths).cumsum(0)
    x32 = {n: t.float() for n, t in x.items()}
    o, s = gated_delta_rule(**x32, cu_seqlens=cu, output_final_state=True)
    o_ref, s_ref = recurrent_gated_delta_rule(**x, cu_seqlens=cu, output_final_state=True)
    assert rel(o, o_ref) < TOL and rel(s, s_ref) < TOL
    o_mid, s_mid = gated_delta_rule(**{n: t[:, 3:2003] for n, t in x32.items() if n != "initial_state"},
                                    initial_state=x32["initial_state"][1:2], output_final_state=True)
    assert rel(o[:, 3:2003], o_mid) < 1e-5 and rel(s[1:2], s_mid) < 1e-5


def test_reset_mask_equals_cu_seqlens():
    """Two rows of several documents each (resets at t = 0, at chunk edges 63/64, and adjacent ones) against
    each row run as packed documents: row b's first document starts from initial_state[b] unless reset at t=0,
    later documents from zeros; the final state is the last document's."""
    T = 150
    resets = [[5, 6, 63, 64, 100], [0, 1, 2, 64, 149]]
    x = make_inputs(2, T, 2, 16, 8, beta_max=2.0, seed=11)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, starts in enumerate(resets):
        mask[b, starts] = True
    got = run(gated_delta_rule, x, torch.float32, reset_mask=mask)
    got_loop = run(recurrent_gated_delta_rule, x, torch.float64, reset_mask=mask)

    def rows_as_documents(q, k, v, g, beta, initial_state, output_final_state):
        outs, states = [], []
        for b, starts in enumerate(resets):
            cu = torch.tensor(sorted({0, *starts, T}))
            h0 = torch.zeros(len(cu) - 1, *initial_state.shape[1:], dtype=initial_state.dtype)
            if starts[0] != 0:  # a reset at t = 0 discards the initial state
                h0 = torch.cat([initial_state[b:b + 1], h0[1:]])
            row = [t[b:b + 1] for t in (q, k, v, g, beta)]
            o, s = recurrent_gated_delta_rule(*row, initial_state=h0, cu_seqlens=cu, output_final_state=True)
            outs.append(o)
            states.append(s[-1:])
        return torch.cat(outs), torch.cat(states)

    want = run(rows_as_documents, x, torch.float64)
    assert_close(got, want)
    assert_close(got_loop, want, tol=1e-12)


def test_reset_mask_from_doc_ids():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 4], [2, 3, 3, 3, 3, 3]])
    expected = torch.tensor([[0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(reset_mask_from_doc_ids(doc_ids), expected)


def test_step_chained_equals_full_op():
    x = make_inputs(2, 70, 2, 16, 8, HV=4, normalized_k=False, seed=12)
    x32 = {n: t.float() for n, t in x.items()}
    o_full, s_full = gated_delta_rule(**x32, use_qk_l2norm_in_kernel=True, output_final_state=True)
    state, outs = x32["initial_state"], []
    for t in range(70):
        before = state.clone()
        o, state = gated_delta_rule_step(*(x32[n][:, t] for n in ("q", "k", "v", "g", "beta")), state,
                                         use_qk_l2norm_in_kernel=True)
        assert state.dtype == torch.float32 and not torch.equal(state, before)
        outs.append(o)
    assert torch.equal(x32["initial_state"], x["initial_state"].float())  # the input state is not modified
    assert rel(torch.stack(outs, 1), o_full) < TOL and rel(state, s_full) < TOL


def test_bad_inputs_name_the_tensor():
    x = {n: t.float() for n, t in make_inputs(2, 10, 2, 8, 4, seed=13).items()}
    with pytest.raises(ValueError, match="v must have shape"):
        gated_delta_rule(x["q"], x["k"], x["v"][:, :, :, None], x["g"], x["beta"])
    with pytest.raises(ValueError, match="beta must have shape"):
        gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"][:, :5])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        gated_delta_rule(**{**x, "initial_state": x["initial_state"][:1]})
    with pytest.raises(ValueError, match="cu_seqlens requires B == 1"):
        gated_delta_rule(**x, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="non-decreasing from 0 to T=10"):
        gated_delta_rule(**{n: t[:1] for n, t in x.items() if n != "initial_state"},
                         cu_seqlens=torch.tensor([0, 6, 4, 10]))
    with pytest.raises(TypeError, match="reset_mask must be a bool"):
        gated_delta_rule(**x, reset_mask=torch.zeros(2, 10))
    with pytest.raises(TypeError, match="g must be a floating-point"):
        gated_delta_rule(x["q"], x["k"], x["v"], x["g"].long(), x["beta"])
    with pytest.raises(ValueError, match="state must have shape"):
        gated_delta_rule_step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["g"][:, 0], x["beta"][:, 0],
                              x["initial_state"][:, :, :4])


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = make_inputs(2, 150, 2, 16, 8, HV=4, beta_max=2.0, normalized_k=False, seed=17)
    mask = torch.rand(2, 150, generator=torch.Generator().manual_seed(0)) < 0.05
    kwargs = dict(use_qk_l2norm_in_kernel=True, reset_mask=mask, backend="torch")
    want = run(recurrent_gated_delta_rule, x, torch.float64, **kwargs)
    got = run(gated_delta_rule, {n: t.cuda() for n, t in x.items()}, torch.float32,
              **{**kwargs, "reset_mask": mask.cuda()})
    assert_close(tuple(t.cpu() if torch.is_tensor(t) else {n: g.cpu() for n, g in t.items()} for t in got), want)
