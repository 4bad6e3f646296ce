"""The state-passing algorithm of ``train/state_passing.py`` in one process, without communication: the
transition it computes against the product of the per-token maps, and slices composed by the scan against the
whole sequence (outputs and every input gradient), on the PyTorch reference in float64 (1e-10) and on the Triton
kernels in float32 (interpreter on the CPU, compiled on a GPU; relative L2 error 1e-4, the kernels' own tolerance
in tests/ops/gated_delta_rule/test_gdr_triton.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from olmo_hybrid import ops
from olmo_hybrid.config import KernelSettings
from olmo_hybrid.model.gated_deltanet import DeltaRuleOp
from olmo_hybrid.train.state_passing import delta_rule_with_transition, incoming_state

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, t, h, hv, dk, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((b, t, h, dk), (b, t, h, dk), (b, t, hv, dv)))
    g = F.logsigmoid(torch.randn(b, t, hv, generator=gen) + 3.0)  # decays near 1: states carry across slices
    beta = 2.0 * torch.rand(b, t, hv, generator=gen)  # (0, 2): negative eigenvalues allowed
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v, g, beta)]


def test_transition_is_the_product_of_the_per_token_maps_and_resets_clear_it():
    q, k, v, g, beta = _inputs(2, 70, 2, 4, 8, 6, torch.float64)
    reset = torch.zeros(2, 70, dtype=torch.bool, device=DEVICE)
    reset[1, 40] = True
    op = DeltaRuleOp(KernelSettings())
    with ops.use_backend("torch"), torch.no_grad():
        o, p, a, b = delta_rule_with_transition(op, q, k, v, g, beta, reset)
        kn = ops.l2norm(k)
        for head in range(4):  # value head `head` reads key head head // 2
            m = torch.eye(8, dtype=torch.float64, device=DEVICE)
            for t in range(70):
                kt = kn[0, t, head // 2]
                m = g[0, t, head].exp() * (torch.eye(8, dtype=torch.float64, device=DEVICE)
                                           - beta[0, t, head] * torch.outer(kt, kt)) @ m
            torch.testing.assert_close(a[0, head], m, rtol=1e-10, atol=1e-12)
        assert a[1].abs().max() == 0  # a document starts inside: nothing of the entering state survives
        s_in = torch.randn(2, 4, 8, 6, dtype=torch.float64, device=DEVICE)
        want_o, want_s = op(q, k, v, g, beta, reset_mask=reset, initial_state=s_in, output_final_state=True)
        torch.testing.assert_close(o + torch.einsum("bthk,bhkv->bthv", p, s_in), want_o, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a @ s_in + b, want_s, rtol=1e-10, atol=1e-12)


def _slices_against_whole(backend, dtype, t, n, dk, dv, tol):
    """Split [B, t] rows into n slices, run each from zero, compose the summaries, correct the outputs; compare
    with the whole rows (outputs and the gradients of a random projection of them)."""
    x = _inputs(2, t, 2, 4, dk, dv, dtype)
    reset = torch.zeros(2, t, dtype=torch.bool, device=DEVICE)
    tl = t // n
    reset[0, tl] = True  # a document starting exactly at a slice
    reset[1, 5] = True  # and one that spans every later slice
    weight = torch.randn(2, t, 4, dv, dtype=dtype, device=DEVICE)
    op = DeltaRuleOp(KernelSettings())
    with ops.use_backend(backend):
        want, _ = op(*x, reset_mask=reset)
        (want * weight).sum().backward()
        want_grads = [t_.grad.clone() for t_ in x]
        for t_ in x:
            t_.grad = None
        parts = [delta_rule_with_transition(op, *(t_[:, i * tl:(i + 1) * tl] for t_ in x),
                                            reset[:, i * tl:(i + 1) * tl]) for i in range(n)]
    summaries = torch.stack([torch.cat([a, b], dim=-1) for _, _, a, b in parts])
    got = torch.cat([o + torch.einsum("bthk,bhkv->bthv", p.to(summaries.dtype), incoming_state(summaries, r, dk))
                     for r, (o, p, _, _) in enumerate(parts)], dim=1)
    (got * weight).sum().backward()

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(got, want) < tol
    for name, g_got, g_want in zip("q k v g beta".split(), (t_.grad for t_ in x), want_grads):
        assert rel(g_got, g_want) < tol, name


def test_slices_composed_by_the_scan_equal_the_whole_sequence():
    _slices_against_whole("torch", torch.float64, t=210, n=3, dk=8, dv=6, tol=1e-10)


@pytest.mark.slow  # ~30 s in the Triton interpreter
def test_slices_composed_by_the_scan_equal_the_whole_sequence_on_the_triton_kernels():
    pytest.importorskip("triton")
    _slices_against_whole("triton", torch.float32, t=48, n=2, dk=16, dv=16, tol=1e-4)


@pytest.mark.gpu
def test_slices_on_the_compiled_triton_kernels_at_a_realistic_head_size():
    _slices_against_whole("triton", torch.float32, t=1024, n=4, dk=128, dv=128, tol=1e-4)
