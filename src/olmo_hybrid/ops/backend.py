"""Backend registry and dispatch for the ops.

Every public op (see ``olmo_hybrid.ops``) is dispatched by name to one implementation per backend:

- ``"torch"``:  the pure-PyTorch references in this package (any device, any float dtype; always registered).
- ``"triton"``: Triton kernels, registered by ``olmo_hybrid.ops.triton`` when that package is imported.
- ``"fla"``:    flash-linear-attention kernels (``fla.ops``), registered by ``olmo_hybrid.ops.fla_backend``.
- ``"auto"``:   ``"triton"`` for CUDA tensors when it is installed, has the op and accepts the arguments;
  otherwise ``"torch"``. Falling back to ``"torch"`` on CUDA logs a warning once per (op, reason).

Backend modules are imported lazily, on the first call that needs them, so importing ``olmo_hybrid.ops`` never
imports triton or fla. A backend module registers its implementations with :func:`register`::

    from olmo_hybrid.ops.backend import register
    register("gated_delta_rule", "triton", my_fn, supports=my_check)

``my_fn`` receives the op's keyword arguments after validation by the public wrapper (``scale`` already
resolved to a float, ``backend`` removed); see the torch implementation of each op for the exact signature.
``supports(**kwargs)`` (optional) returns ``None`` when the implementation can run those arguments, or a short
reason why not (e.g. ``"reset_mask is not supported"``): ``"auto"`` then falls back to torch, while an
explicitly requested backend raises :class:`BackendUnavailableError` with that reason.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger("olmo_hybrid.ops")

BACKENDS = ("auto", "torch", "triton", "fla")
OPS = (
    "gated_delta_rule",
    "recurrent_gated_delta_rule",
    "gated_delta_rule_step",
    "causal_conv1d",
    "causal_conv1d_step",
    "decode_attention",
)

# Importing these modules registers the backend's implementations ("torch" registers from gdn_reference.py and
# conv.py, which the public API imports eagerly).
_BACKEND_MODULES = {
    "triton": "olmo_hybrid.ops.triton",
    "fla": "olmo_hybrid.ops.fla_backend",
}


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot run an op."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    supports: Callable[..., str | None] | None


_registry: dict[tuple[str, str], _Impl] = {}
_load_errors: dict[str, str] = {}
_loaded: set[str] = {"torch"}
_warned: set[tuple[str, str]] = set()
_default_backend = "auto"


def _check_name(name: str, what: str, allowed: tuple[str, ...]) -> None:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(allowed)}")


def register(op: str, backend: str, fn: Callable, supports: Callable[..., str | None] | None = None) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (replacing any earlier one)."""
    _check_name(op, "op", OPS)
    _check_name(backend, "backend", BACKENDS[1:])
    _registry[(op, backend)] = _Impl(fn, supports)


def set_backend(name: str) -> None:
    """Set the backend used by ops called with ``backend=None`` (the default); initially ``"auto"``."""
    global _default_backend
    _check_name(name, "backend", BACKENDS)
    _default_backend = name


def get_backend() -> str:
    """The backend used by ops called with ``backend=None``."""
    return _default_backend


def _load(backend: str) -> str | None:
    """Import the backend's module once; returns why it is unavailable, or None."""
    if backend not in _loaded:
        _loaded.add(backend)
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
        except ImportError as e:  # the backend's optional dependency (or the backend itself) is missing
            _load_errors[backend] = f"{_BACKEND_MODULES[backend]} could not be imported ({e})"
    return _load_errors.get(backend)


def _lookup(op: str, backend: str, kwargs: dict) -> tuple[Callable | None, str | None]:
    why = _load(backend)
    if why is not None:
        return None, why
    impl = _registry.get((op, backend))
    if impl is None:
        return None, f"backend {backend!r} has no implementation of {op}"
    why = impl.supports(**kwargs) if impl.supports is not None else None
    return (None, why) if why is not None else (impl.fn, None)


def available_backends(op: str) -> list[str]:
    """Backends that have an implementation of ``op`` registered and importable (arguments not checked)."""
    _check_name(op, "op", OPS)
    return [b for b in BACKENDS[1:] if _load(b) is None and (op, b) in _registry]


def _warn_once(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        logger.warning("%s: using the slow PyTorch reference on CUDA because %s", op, reason)


def resolve(op: str, backend: str | None, device: torch.device, kwargs: dict) -> Callable:
    """The implementation of ``op`` to call with ``kwargs`` on ``device`` for the requested backend."""
    name = _default_backend if backend is None else backend
    _check_name(name, "backend", BACKENDS)
    if name == "auto":
        if device.type == "cuda":
            fn, why = _lookup(op, "triton", kwargs)
            if fn is not None:
                return fn
            _warn_once(op, why)
        name = "torch"
    fn, why = _lookup(op, name, kwargs)
    if fn is None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {why}")
    return fn
