"""Argument checks shared by the public ops: each error names the op, the argument and what was expected.

None of them reads tensor values (that would synchronise with the device); values are the caller's contract.
"""

from __future__ import annotations

import torch

from olmo_hybrid.config import KernelSettings


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {got}")


def check_shape(op: str, name: str, t: torch.Tensor | None, shape: tuple, layout: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {layout} = {list(shape)}, got {list(t.shape)}")


def check_boundaries(op: str, B: int, T: int, cu_seqlens, reset_mask) -> int:
    """Validate document-boundary arguments; returns N, the number of state rows."""
    if reset_mask is not None:
        check_shape(op, "reset_mask", reset_mask, (B, T), "[B, T]")
        if reset_mask.dtype != torch.bool:
            raise TypeError(f"{op}: reset_mask must be a bool tensor, got {reset_mask.dtype}")
    if cu_seqlens is None:
        return B
    if B != 1:
        raise ValueError(f"{op}: cu_seqlens requires B == 1 (documents packed along T), got B={B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"{op}: cu_seqlens must be a 1-D integer tensor [N+1], got {list(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    return cu_seqlens.numel() - 1


def check_active(op: str, active: torch.Tensor | None, B: int, device: torch.device) -> None:
    """``active``: None, or a bool tensor [B] on the state's device."""
    if active is None:
        return
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool or tuple(active.shape) != (B,):
        got = f"{active.dtype} {list(active.shape)}" if isinstance(active, torch.Tensor) else type(active).__name__
        raise ValueError(f"{op}: active must be a bool tensor [B={B}], got {got}")
    if active.device != device:
        raise ValueError(f"{op}: active must be on the state's device {device}, got {active.device}")


def check_inplace_state(op: str, name: str, state: torch.Tensor, dtype: torch.dtype) -> None:
    """An in-place update writes the new state in ``dtype``; the given state must already hold that dtype."""
    if state.dtype != dtype:
        raise TypeError(f"{op}: inplace=True needs {name} in {dtype} (the dtype of the new state), got {state.dtype}")


_DEFAULT_SETTINGS = KernelSettings()


def resolve_settings(op: str, settings: KernelSettings | None) -> KernelSettings:
    """``settings``, or the defaults for None."""
    if settings is None:
        return _DEFAULT_SETTINGS
    if not isinstance(settings, KernelSettings):
        raise TypeError(f"{op}: settings must be an olmo_hybrid.ops.KernelSettings or None, got "
                        f"{type(settings).__name__}")
    return settings
