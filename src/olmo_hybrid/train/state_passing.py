"""State-passing context parallelism for the gated delta rule: each rank runs its slice of every sequence, and
the ranks exchange one fixed-size summary per head instead of the activations.

Per value head, in the ops' [K, V] state layout, a token maps the state S to M_t S + beta_t k_t v_t^T with
M_t = exp(g_t) (I - beta_t k_t k_t^T) (k L2-normalised in the op). Over a slice the map from the entering state
S_in to the leaving one is therefore affine,

    S_out = A S_in + B,   A = M_T ... M_1 [K, K] (0 once a document starts in the slice),   B = S_out from zero,

and every output is affine in S_in too: o_t = o_t(0) + S_in^T p_t with p_t = scale (M_t ... M_1)^T q_t.

One chunked pass computes all of it: the values extended by K zero columns and the state entering from
[0 | I] carry the identity through the same recurrence (value columns never interact), so the final state is
[B | A] and the extra output columns are p_t. The ranks all-gather their [A | B] (n x B x HV x K x (K+V) floats,
independent of the sequence length), each composes those of the ranks before it, S_{j+1} = A_j S_j + B_j from
S_0 = 0, and adds S_in^T p_t to its outputs: exact, at (V+K)/V times the cost of one pass. Gradients flow back
through the all-gather (a reduce-scatter in backward) into the ranks that produced the summaries.
"""

from __future__ import annotations

import torch
from torch import nn

from olmo_hybrid.train.cp_comm import CPGroup, all_gather, refuse_state


def delta_rule_with_transition(op, q, k, v, g, beta, reset_mask=None):
    """One pass of ``op`` (a ``DeltaRuleOp``) over [B, T, ...] from a zero state, carrying the identity.

    Returns ``(o, p, a, b)``: outputs o [B, T, HV, V] from a zero state, p [B, T, HV, K] (o_t would gain
    S_in^T p_t from an entering state S_in), the transition a [B, HV, K, K] and the final state b [B, HV, K, V]
    from zero, so that the state leaving the sequence is ``a @ S_in + b`` (a and b in float32, or float64)."""
    bsz, t, hv, dv = v.shape
    dk = k.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    start = torch.zeros(bsz, hv, dk, dv + dk, dtype=dtype, device=q.device)
    start[..., dv:] = torch.eye(dk, dtype=dtype, device=q.device)
    o, final = op(q, k, torch.cat([v, v.new_zeros(bsz, t, hv, dk)], dim=-1), g, beta, reset_mask=reset_mask,
                  initial_state=start, output_final_state=True)
    return o[..., :dv], o[..., dv:], final[..., dv:], final[..., :dv]


def incoming_state(summaries: torch.Tensor, rank: int, dk: int) -> torch.Tensor:
    """The state entering slice ``rank`` from the gathered ``summaries`` [n, B, HV, K, K+V] (each [A | B]): the
    scan S_{j+1} = A_j S_j + B_j from S_0 = 0 over the ranks before it.

    Every rank runs all n-1 steps, keeping the state where j >= rank, so that every rank's graph uses every
    gathered summary and all of them run the same backward (see ``cp_comm``)."""
    a, b = summaries[..., :dk], summaries[..., dk:]
    before = torch.arange(summaries.shape[0] - 1, device=summaries.device) < rank
    s = torch.zeros_like(b[0])
    for j in range(summaries.shape[0] - 1):
        s = torch.where(before[j], a[j] @ s + b[j], s)
    return s


class StatePassingDeltaRule(nn.Module):
    """``DeltaRuleOp`` over this rank's slice, corrected by the state the earlier slices leave (module
    docstring). ``reset_mask`` is the whole sequences' ([B, T] or None)."""

    def __init__(self, inner: nn.Module, cp: CPGroup):
        super().__init__()
        self.inner, self.cp = inner, cp

    def forward(self, q, k, v, g, beta, reset_mask=None, initial_state=None, output_final_state=False):
        refuse_state(initial_state, output_final_state)
        local_reset = None if reset_mask is None else self.cp.local(reset_mask)
        o, p, a, b = delta_rule_with_transition(self.inner, q, k, v, g, beta, local_reset)
        summaries = all_gather(torch.cat([a, b], dim=-1), self.cp, "delta_rule_state")
        s_in = incoming_state(summaries, self.cp.rank, k.shape[-1])
        return (o.to(s_in.dtype) + torch.einsum("bthk,bhkv->bthv", p.to(s_in.dtype), s_in)).to(o.dtype), None
