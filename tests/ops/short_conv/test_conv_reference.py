"""Short causal depthwise conv reference: against F.conv1d, state continuation, document boundaries, step form.
Float64 comparisons use rel(a, b) = max|a - b| / max|b| <= 1e-12."""

import pytest
import torch
import torch.nn.functional as F

from olmo_hybrid.ops import causal_conv1d, causal_conv1d_step

W = 4


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def conv1d_reference(x, weight, activation, context=None):
    """F.conv1d with groups=C on [B, C, T]; ``context`` [B, C, W-1] replaces the zero left padding."""
    xt = x.transpose(1, 2)
    if context is None:
        context = xt.new_zeros(*xt.shape[:2], weight.shape[-1] - 1)
    y = F.conv1d(torch.cat([context, xt], -1), weight[:, None, :], groups=x.shape[-1]).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("with_context", [False, True])
def test_matches_conv1d_with_gradients(activation, with_context):
    x = rand(2, 37, 6, seed=1).requires_grad_()
    w = rand(6, W, seed=2).requires_grad_()
    h0 = rand(2, 6, W - 1, seed=3).requires_grad_() if with_context else None
    y, _ = causal_conv1d(x, w, activation=activation, initial_state=h0)
    y_ref = conv1d_reference(x, w, activation, h0)
    assert rel(y, y_ref) < 1e-12
    dy = rand(*y.shape, seed=4)
    leaves = [x, w] + ([h0] if with_context else [])
    grads = torch.autograd.grad((y * dy).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), leaves)
    for got, want in zip(grads, grads_ref):
        assert rel(got, want) < 1e-12


def test_checkpoint_weight_layout_and_dtype():
    x, w = rand(1, 9, 5, seed=5), rand(5, W, seed=6)
    y, _ = causal_conv1d(x, w[:, None, :])  # nn.Conv1d / HF layout [C, 1, W]
    assert rel(y, conv1d_reference(x, w, "silu")) < 1e-12
    y16, s16 = causal_conv1d(x.bfloat16(), w.bfloat16(), output_final_state=True)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.bfloat16
    assert rel(y16, conv1d_reference(x, w, "silu")) < 2e-2


@pytest.mark.parametrize("split", [1, 2, 3, 10])
def test_final_state_continues_the_sequence(split):
    x, w, h0 = rand(2, 16, 3, seed=7), rand(3, W, seed=8), rand(2, 3, W - 1, seed=9)
    whole, whole_state = causal_conv1d(x, w, initial_state=h0, output_final_state=True)
    first, state = causal_conv1d(x[:, :split], w, initial_state=h0, output_final_state=True)
    # The last W-1 inputs, taken from the initial state when the sequence is shorter than W-1.
    assert torch.equal(state, torch.cat([h0, x[:, :split].transpose(1, 2)], -1)[..., -(W - 1):])
    second, final = causal_conv1d(x[:, split:], w, initial_state=state, output_final_state=True)
    assert rel(torch.cat([first, second], 1), whole) < 1e-12
    assert torch.equal(final, whole_state)


def run_documents(x, w, starts, h0_row=None):
    """One row [1, T, C] run document by document (the oracle for packed and reset forms)."""
    bounds = sorted({0, *starts, x.shape[1]})
    outs, states = [], []
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        h0 = h0_row[n:n + 1] if h0_row is not None else None
        y, s = causal_conv1d(x[:, a:b], w, initial_state=h0, output_final_state=True)
        outs.append(y)
        states.append(s)
    return torch.cat(outs, 1), torch.cat(states)


def test_cu_seqlens_equals_separate_documents():
    lengths = [1, 2, 7, 1, 5]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    x, w, h0 = rand(1, sum(lengths), 4, seed=10), rand(4, W, seed=11), rand(len(lengths), 4, W - 1, seed=12)
    y, s = causal_conv1d(x, w, initial_state=h0, cu_seqlens=cu, output_final_state=True)
    y_ref, s_ref = run_documents(x, w, cu.tolist(), h0)
    assert rel(y, y_ref) < 1e-12 and torch.equal(s, s_ref)


def test_reset_mask_equals_separate_documents():
    """Resets clear the context before the token; row b's first document reads initial_state[b] unless reset
    at t = 0; the final state is the last document's last W-1 inputs, zero-padded when it is shorter."""
    T = 12
    resets = [[3, 4, 10], [0, 11]]
    x, w, h0 = rand(2, T, 4, seed=13), rand(4, W, seed=14), rand(2, 4, W - 1, seed=15)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, starts in enumerate(resets):
        mask[b, starts] = True
    y, s = causal_conv1d(x, w, initial_state=h0, reset_mask=mask, output_final_state=True)
    for b, starts in enumerate(resets):
        docs = len(sorted({0, *starts, T})) - 1
        h0_row = torch.cat([h0[b:b + 1], torch.zeros(docs - 1, 4, W - 1, dtype=torch.float64)])
        if starts[0] == 0:
            h0_row[0] = 0
        y_ref, s_ref = run_documents(x[b:b + 1], w, starts, h0_row)
        assert rel(y[b:b + 1], y_ref) < 1e-12
        assert torch.equal(s[b], s_ref[-1])
    assert torch.equal(s[1, :, :2], torch.zeros(4, 2, dtype=torch.float64))  # last document has one token


def test_step_chained_equals_full_op():
    x, w, h0 = rand(3, 9, 5, seed=16), rand(5, W, seed=17), rand(3, 5, W - 1, seed=18)
    y_full, s_full = causal_conv1d(x, w, initial_state=h0, output_final_state=True)
    state, outs = h0, []
    for t in range(9):
        y, state = causal_conv1d_step(x[:, t], state, w)
        outs.append(y)
    assert torch.equal(h0, rand(3, 5, W - 1, seed=18))  # the input state is not modified
    assert rel(torch.stack(outs, 1), y_full) < 1e-12 and torch.equal(state, s_full)


def test_bad_inputs_name_the_tensor():
    x, w = rand(2, 5, 3), rand(3, W)
    with pytest.raises(ValueError, match=r"weight must have shape \[C=3, W\]"):
        causal_conv1d(x, w[:2])
    with pytest.raises(ValueError, match="activation must be"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, C, W-1\] = \[2, 3, 3\]"):
        causal_conv1d(x, w, initial_state=rand(2, 3, W))
    with pytest.raises(ValueError, match="reset_mask must have shape"):
        causal_conv1d(x, w, reset_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="conv_state must have shape"):
        causal_conv1d_step(x[:, 0], rand(2, 3, W), w)
