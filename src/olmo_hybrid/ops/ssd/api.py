"""The SSD ops' public functions: argument checks, documentation and the call into the chosen backend
(layouts and semantics in ``olmo_hybrid/ops/ssd/__init__.py``; backends in ``olmo_hybrid/ops/dispatch.py``)."""

from __future__ import annotations

import torch

from ..checks import check_active, check_boundaries, check_float, check_inplace_state, check_shape, resolve_settings
from ..dispatch import select
from olmo_hybrid.config import KernelSettings


def _check_params(op: str, H: int, A, D) -> None:
    check_float(op, A=A)
    check_shape(op, "A", A, (H,), "[H]")
    if D is not None:
        check_float(op, D=D)
        check_shape(op, "D", D, (H,), "[H] (one skip weight per head)")


def _check_bc(op: str, lead: tuple, H: int, B, C) -> int:
    layout = "[B, T, G, N]" if len(lead) == 2 else "[B, G, N]"
    if B.dim() != len(lead) + 2 or tuple(B.shape[:len(lead)]) != lead or H % B.shape[-2]:
        raise ValueError(f"{op}: B must have shape {layout} with leading dims {list(lead)} and H={H} a multiple "
                         f"of G, got {list(B.shape)}")
    check_shape(op, "C", C, B.shape, f"{layout} (as B)")
    return B.shape[-1]


def _check_sequence_args(op, x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask) -> None:
    check_float(op, x=x, dt=dt, B=B, C=C)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must have shape [B, T, H, P], got {list(x.shape)}")
    Bsz, T, H, P = x.shape
    check_shape(op, "dt", dt, (Bsz, T, H), "[B, T, H]")
    N = _check_bc(op, (Bsz, T), H, B, C)
    _check_params(op, H, A, D)
    rows = check_boundaries(op, Bsz, T, cu_seqlens, reset_mask)
    if initial_state is not None:
        check_float(op, initial_state=initial_state)
        check_shape(op, "initial_state", initial_state, (rows, H, P, N), "[N_rows, H, P, N]")


def ssd(x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, cu_seqlens=None, reset_mask=None, *,
        settings: KernelSettings | None = None, backend=None):
    """Chunked SSD over full sequences. Returns ``(y, final_state)``.

    x [B, T, H, P]; dt [B, T, H] (positive); A [H] (negative); B, C [B, T, G, N]; D [H] or None.
    initial_state: [N_rows, H, P, N] (N_rows = B, or the number of documents with cu_seqlens), None for zeros.
    output_final_state: return the state after the last token of each row / document (float32; float64 for
    float64 inputs), else None. cu_seqlens / reset_mask: document boundaries (a reset clears the state before its
    token). settings: the Triton kernels' dot precision (only ``dot="bf16"`` is implemented for 16-bit inputs;
    the GDN tile fields do not apply). backend: "auto" | "torch" | "triton", or None for the enclosing
    ``ops.use_backend`` (else "auto"). y: [B, T, H, P] in x's dtype, D's skip included; differentiable wrt x,
    dt, A, B, C, D and initial_state.
    """
    op = "ssd"
    _check_sequence_args(op, x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, reset_mask=reset_mask, settings=resolve_settings(op, settings))
    return select(op, backend, x.device, args)(**args)


def recurrent_ssd(x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                  reset_mask=None, *, backend=None):
    """Same op and arguments as :func:`ssd`, token by token: the float64 oracle of the tests (float64 inputs
    compute in float64). Only the torch backend implements it."""
    op = "recurrent_ssd"
    _check_sequence_args(op, x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, reset_mask=reset_mask)
    return select(op, backend, x.device, args)(**args)


def ssd_step(x, dt, A, B, C, state, D=None, *, inplace=False, active=None, settings: KernelSettings | None = None,
             backend=None):
    """One decode token. Returns ``(y, state_out)``.

    x [B, H, P]; dt [B, H]; B, C [B, G, N]; state [B, H, P, N] (float32), e.g. rows ``pool[i:j]`` of a larger
    state pool. y: [B, H, P] in x's dtype.
    inplace: False returns a new state (float32; float64 for float64 inputs) and leaves ``state`` unchanged;
    True writes the new state into ``state`` (which must already have that dtype) and returns it.
    active: bool [B] on the state's device, or None for all rows. Rows where it is False keep their state bit for
    bit (copied through when not in place); their outputs are zeros. Read on the device: no host sync.
    settings: accepted for uniformity with the other ops; the decode step has no tunable numerics.
    """
    op = "ssd_step"
    check_float(op, x=x, dt=dt, B=B, C=C, state=state)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have shape [B, H, P], got {list(x.shape)}")
    Bsz, H, P = x.shape
    check_shape(op, "dt", dt, (Bsz, H), "[B, H]")
    N = _check_bc(op, (Bsz,), H, B, C)
    _check_params(op, H, A, D)
    check_shape(op, "state", state, (Bsz, H, P, N), "[B, H, P, N]")
    check_active(op, active, Bsz, state.device)
    if inplace:
        check_inplace_state(op, "state", state, torch.promote_types(x.dtype, torch.float32))
    resolve_settings(op, settings)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, state=state, D=D, inplace=bool(inplace), active=active)
    return select(op, backend, x.device, args)(**args)
