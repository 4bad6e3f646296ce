"""SSD: Mamba2's selective state space (scalar decay per head), the op behind ``model/mamba2.py``.

    from olmo_hybrid.ops.ssd import ssd, ssd_step
    y, state = ssd(x, dt, A, B, C, D, initial_state=h0, output_final_state=True, reset_mask=reset)

Per head h, with the state S [P, N] (transformers' / mamba_ssm's layout) and group g = h // (H // G):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T;        y_t = S_t C_t + D_h x_t

Layouts (time-major, as the GDN ops): x [B, T, H, P]; dt [B, T, H] (the step after softplus, bias and clamp:
positive, not checked, to avoid a device sync); A [H] (negative: -exp(A_log)); B, C [B, T, G, N] with H a
multiple of G; D [H] or None; states [N_rows, H, P, N] in float32 (float64 for float64 inputs). Document
boundaries (``cu_seqlens``, ``reset_mask``) have the GDN ops' meaning (``olmo_hybrid.ops.api``): a reset clears
the state before its token. Every full-sequence op is differentiable wrt x, dt, A, B, C, D and initial_state.

Backends: "torch" (``reference.py``: chunked, token loop, step) and "triton" (``triton_*.py``: chunked
forward/backward and the decode step, CUDA or Triton's CPU interpreter); "auto" (the default) takes Triton for
CUDA tensors it supports, else torch; ``backend=None`` follows ``olmo_hybrid.ops.set_backend``.
"""

from __future__ import annotations

import importlib

import torch

from ..api import _check_boundaries, _check_float, _check_shape
from ..backend import BackendUnavailableError, get_backend, logger
from .reference import recurrent_ssd_torch, ssd_step_torch, ssd_torch

_TORCH = {"ssd": ssd_torch, "recurrent_ssd": recurrent_ssd_torch, "ssd_step": ssd_step_torch}
_warned: set[tuple[str, str]] = set()
_triton: dict = {}  # "impls" or "error", filled by the first call that needs the kernels


def _triton_impl(op: str, kwargs: dict):
    """(fn, None) when the Triton kernels can run ``op`` on these arguments, else (None, reason)."""
    if op == "recurrent_ssd":
        return None, "the token loop is a torch reference only"
    if not _triton:  # imported once: torch.compile then traces only the dictionary lookups below
        try:
            _triton["impls"] = importlib.import_module("olmo_hybrid.ops.ssd.custom_ops").IMPLS
        except ImportError as e:
            _triton["error"] = f"olmo_hybrid.ops.ssd.custom_ops could not be imported ({e})"
    if "error" in _triton:
        return None, _triton["error"]
    fn, supports = _triton["impls"][op]
    why = supports(**kwargs)
    return (None, why) if why is not None else (fn, None)


def _resolve(op: str, backend: str | None, device: torch.device, kwargs: dict):
    name = get_backend() if backend is None else backend
    if name not in ("auto", "torch", "triton"):
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: expected auto, torch or triton")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return _TORCH[op]
    fn, why = _triton_impl(op, kwargs)
    if fn is not None:
        return fn
    if name == "triton":
        raise BackendUnavailableError(f"{op}: backend 'triton' is unavailable: {why}")
    if (op, why) not in _warned:
        _warned.add((op, why))
        logger.warning("%s: using the slow PyTorch reference on CUDA because %s", op, why)
    return _TORCH[op]


def _check_params(op: str, H: int, A, D) -> None:
    _check_float(op, A=A)
    _check_shape(op, "A", A, (H,), "[H]")
    if D is not None:
        _check_float(op, D=D)
        _check_shape(op, "D", D, (H,), "[H] (one skip weight per head)")


def _check_bc(op: str, lead: tuple, H: int, B, C) -> int:
    layout = "[B, T, G, N]" if len(lead) == 2 else "[B, G, N]"
    if B.dim() != len(lead) + 2 or tuple(B.shape[:len(lead)]) != lead or H % B.shape[-2]:
        raise ValueError(f"{op}: B must have shape {layout} with leading dims {list(lead)} and H={H} a multiple "
                         f"of G, got {list(B.shape)}")
    _check_shape(op, "C", C, B.shape, f"{layout} (as B)")
    return B.shape[-1]


def _check_full(op, x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask) -> None:
    _check_float(op, x=x, dt=dt, B=B, C=C)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must have shape [B, T, H, P], got {list(x.shape)}")
    Bsz, T, H, P = x.shape
    _check_shape(op, "dt", dt, (Bsz, T, H), "[B, T, H]")
    N = _check_bc(op, (Bsz, T), H, B, C)
    _check_params(op, H, A, D)
    rows = _check_boundaries(op, Bsz, T, cu_seqlens, reset_mask)
    if initial_state is not None:
        _check_float(op, initial_state=initial_state)
        _check_shape(op, "initial_state", initial_state, (rows, H, P, N), "[N_rows, H, P, N]")


def ssd(x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, cu_seqlens=None, reset_mask=None,
        backend=None):
    """Chunked SSD over full sequences. Returns ``(y, final_state)``.

    Layouts and boundaries: see the module docstring. initial_state: [N_rows, H, P, N] (N_rows = B, or the
    number of documents with cu_seqlens), None for zeros. output_final_state: return the state after the last
    token of each row / document (float32), else None. y: [B, T, H, P] in x's dtype, D's skip included.
    """
    _check_full("ssd", x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, reset_mask=reset_mask)
    return _resolve("ssd", backend, x.device, args)(**args)


def recurrent_ssd(x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                  reset_mask=None, backend=None):
    """Same op and arguments as :func:`ssd`, token by token: the float64 oracle of the tests (float64 inputs
    compute in float64). Only the torch backend implements it."""
    _check_full("recurrent_ssd", x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, reset_mask=reset_mask)
    return _resolve("recurrent_ssd", backend, x.device, args)(**args)


def ssd_step(x, dt, A, B, C, state, D=None, *, inplace=False, active=None, backend=None):
    """One decode token. Returns ``(y, state_out)``.

    x [B, H, P]; dt [B, H]; B, C [B, G, N]; state [B, H, P, N] (float32; may be a row slice of a larger pool).
    y: [B, H, P] in x's dtype. With ``inplace=True`` ``state`` is updated and returned, else it is unchanged and
    a new state is returned. ``active`` (bool [B] on the device, or None = all rows): rows that are False keep
    their state (their y is unspecified).
    """
    op = "ssd_step"
    _check_float(op, x=x, dt=dt, B=B, C=C, state=state)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have shape [B, H, P], got {list(x.shape)}")
    Bsz, H, P = x.shape
    _check_shape(op, "dt", dt, (Bsz, H), "[B, H]")
    N = _check_bc(op, (Bsz,), H, B, C)
    _check_params(op, H, A, D)
    _check_shape(op, "state", state, (Bsz, H, P, N), "[B, H, P, N]")
    if active is not None and (active.dtype != torch.bool or tuple(active.shape) != (Bsz,)):
        raise ValueError(f"{op}: active must be a bool tensor [B={Bsz}], got {active.dtype} {list(active.shape)}")
    args = dict(x=x, dt=dt, A=A, B=B, C=C, state=state, D=D, inplace=inplace, active=active)
    return _resolve(op, backend, x.device, args)(**args)


__all__ = ["recurrent_ssd", "ssd", "ssd_step"]
