"""Which implementation computes an op: the (op, backend) table, the backend context and the "auto" rule.

Backends:

- ``"torch"``:  the PyTorch references (``<op>/reference.py``): any device, any float dtype.
- ``"triton"``: the Triton kernels behind ``torch.library`` custom ops (``<op>/custom_ops.py``).
- ``"fla"``:    flash-linear-attention's kernels, for cross-checks (``fla_backend.py``; gated delta rule only).
  The SSD (Mamba2) ops have torch and triton implementations; their token loop is torch only.
- ``"auto"``:   ``"triton"`` for CUDA tensors when it is installed and accepts the arguments, else ``"torch"``;
  falling back to ``"torch"`` on CUDA logs a warning once per (op, reason).

Choosing: an op's ``backend=`` argument wins; otherwise the innermost ``with use_backend(...)`` of the calling
thread or task (a context variable: blocks nest, threads do not see each other's choice, and a thread started
inside a block does not inherit it); otherwise "auto". Autograd's device threads (which recompute checkpointed
activations) see the choice of the thread that called ``backward()``: torch from 2.13 hands them that thread's
context; with older torch, a device thread takes the innermost block open in the process, and refuses when
threads have different blocks open (it cannot tell whose backward it runs). Under ``torch.compile`` the choice in
effect when a graph is traced is part of that graph.

:func:`implementation` is the table. It imports a backend's module on first use, so importing ``olmo_hybrid.ops``
imports neither triton nor fla. Every implementation of an op takes the op's keyword arguments as its public
function passes them after validation (``scale`` resolved to a float, ``backend`` removed); the fast backends
come with a check that returns why it cannot take some arguments (None when it can): ``"auto"`` then falls back
to torch, while an explicitly requested backend raises :class:`BackendUnavailableError` with that reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from typing import Callable, Iterator

import torch

from olmo_hybrid.errors import OlmoHybridError

logger = logging.getLogger("olmo_hybrid.ops")

BACKENDS = ("auto", "torch", "triton", "fla")
OPS = (
    "gated_delta_rule",
    "recurrent_gated_delta_rule",
    "gated_delta_rule_step",
    "causal_conv1d",
    "causal_conv1d_step",
    "decode_attention",
    "ssd",
    "recurrent_ssd",
    "ssd_step",
)

Check = Callable[..., "str | None"]


class BackendUnavailableError(OlmoHybridError, RuntimeError):
    """Raised when an explicitly requested backend cannot run an op."""


def implementation(op: str, backend: str) -> tuple[Callable, Check | None]:
    """The (op, backend) table: the function computing ``op`` on ``backend`` and its argument check (None: it
    takes every valid argument). Raises LookupError for a pair that has no implementation, ImportError when the
    backend's package is missing."""
    match op, backend:
        case "gated_delta_rule", "torch":
            from .gated_delta_rule.reference import chunk_gated_delta_rule_torch
            return chunk_gated_delta_rule_torch, None
        case "gated_delta_rule", "triton":
            from .gated_delta_rule.custom_ops import chunk_gated_delta_rule_triton, triton_chunk_refusal
            return chunk_gated_delta_rule_triton, triton_chunk_refusal
        case "gated_delta_rule", "fla":
            from .fla_backend import chunk_gated_delta_rule_fla, fla_refusal
            return chunk_gated_delta_rule_fla, fla_refusal
        case "recurrent_gated_delta_rule", "torch":
            from .gated_delta_rule.reference import recurrent_gated_delta_rule_torch
            return recurrent_gated_delta_rule_torch, None
        case "recurrent_gated_delta_rule", "fla":
            from .fla_backend import fla_refusal, recurrent_gated_delta_rule_fla
            return recurrent_gated_delta_rule_fla, fla_refusal
        case "gated_delta_rule_step", "torch":
            from .gated_delta_rule.reference import gated_delta_rule_step_torch
            return gated_delta_rule_step_torch, None
        case "gated_delta_rule_step", "triton":
            from .gated_delta_rule.custom_ops import gated_delta_rule_step_triton, triton_step_refusal
            return gated_delta_rule_step_triton, triton_step_refusal
        case "gated_delta_rule_step", "fla":
            from .fla_backend import fla_step_refusal, gated_delta_rule_step_fla
            return gated_delta_rule_step_fla, fla_step_refusal
        case "causal_conv1d", "torch":
            from .short_conv.reference import causal_conv1d_torch
            return causal_conv1d_torch, None
        case "causal_conv1d", "triton":
            from .short_conv.custom_ops import causal_conv1d_triton, triton_conv_refusal
            return causal_conv1d_triton, triton_conv_refusal
        case "causal_conv1d_step", "torch":
            from .short_conv.reference import causal_conv1d_step_torch
            return causal_conv1d_step_torch, None
        case "causal_conv1d_step", "triton":
            from .short_conv.custom_ops import causal_conv1d_step_triton, triton_conv_step_refusal
            return causal_conv1d_step_triton, triton_conv_step_refusal
        case "decode_attention", "torch":
            from .decode_attention.reference import decode_attention_torch
            return decode_attention_torch, None
        case "decode_attention", "triton":
            from .decode_attention.kernel import decode_attention_triton, triton_decode_attention_refusal
            return decode_attention_triton, triton_decode_attention_refusal
        case "ssd", "torch":
            from .ssd.reference import ssd_torch
            return ssd_torch, None
        case "ssd", "triton":
            from .ssd.custom_ops import ssd_triton, triton_ssd_refusal
            return ssd_triton, triton_ssd_refusal
        case "recurrent_ssd", "torch":
            from .ssd.reference import recurrent_ssd_torch
            return recurrent_ssd_torch, None
        case "ssd_step", "torch":
            from .ssd.reference import ssd_step_torch
            return ssd_step_torch, None
        case "ssd_step", "triton":
            from .ssd.custom_ops import ssd_step_triton, triton_ssd_step_refusal
            return ssd_step_triton, triton_ssd_step_refusal
    raise LookupError(f"backend {backend!r} has no implementation of {op}")


_DEFAULT = {op: "auto" for op in OPS}
# op -> backend for ops called with backend=None; a fresh dict per `use_backend` block, never mutated.
_chosen: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("olmo_hybrid_ops_backend", default=_DEFAULT)
# (op, backend) -> (implementation, check), or why the pair cannot be used (failed import, no implementation).
_loaded: dict[tuple[str, str], tuple[Callable, Check | None] | str] = {}
# Python thread id -> the choices of its open `use_backend` blocks, innermost last: what an autograd device thread
# reads when torch does not hand it the context of the thread that called backward() (torch < 2.13).
_open_blocks: dict[int, list[dict[str, str]]] = {}
_open_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()


def _check_name(name: str, what: str, allowed: tuple[str, ...]) -> None:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(allowed)}")


@contextlib.contextmanager
def use_backend(name: str, ops: tuple[str, ...] | None = None) -> Iterator[None]:
    """Within the block, ops called with ``backend=None`` use ``name`` ("auto", "torch", "triton" or "fla");
    ``ops`` limits that to some op names (the others keep the enclosing choice)::

        with ops.use_backend("torch"):
            loss = model(x)          # every op on the PyTorch references
    """
    _check_name(name, "backend", BACKENDS)
    for op in ops or ():
        _check_name(op, "op", OPS)
    chosen = {**_chosen.get(), **{op: name for op in (ops or OPS)}}
    token = _chosen.set(chosen)
    thread = threading.get_ident()
    with _open_lock:
        _open_blocks.setdefault(thread, []).append(chosen)
    try:
        yield
    finally:
        _chosen.reset(token)
        with _open_lock:
            blocks = _open_blocks[thread]
            blocks.remove(chosen)  # not always the last: async tasks of one thread close blocks in any order
            if not blocks:
                del _open_blocks[thread]


def current_backend(op: str) -> str:
    """The backend that ``op`` uses when called with ``backend=None`` here."""
    chosen = _chosen.get()
    if chosen is _DEFAULT and torch._C._is_key_in_tls("context"):
        # An autograd device thread (CUDA backward; activation checkpointing recomputes the forward there): torch
        # stashes the context of the thread that called backward(), so the recomputation uses the same backends.
        stashed = torch._C._get_obj_in_tls("context")
        if stashed is not None:
            chosen = stashed.get(_chosen, _DEFAULT)
    elif chosen is _DEFAULT and isinstance(threading.current_thread(), threading._DummyThread):
        chosen = _choice_of_open_blocks(op)
    return chosen[op]


def _choice_of_open_blocks(op: str) -> dict[str, str]:
    """For a thread started outside Python (an autograd device thread of torch < 2.13, which gets no context):
    the innermost open block's choice when all threads with open blocks agree on ``op``."""
    with _open_lock:
        innermost = [blocks[-1] for blocks in _open_blocks.values()]
    if len({b[op] for b in innermost}) > 1:
        raise RuntimeError(
            f"{op} runs in a thread started outside Python (an autograd device thread, e.g. recomputing "
            f"checkpointed activations), and threads have use_backend blocks with different backends open "
            f"({', '.join(sorted({b[op] for b in innermost}))}): this torch ({torch.__version__}) does not say "
            f"which thread called backward(). Pass backend= to the op, or use torch >= 2.13.")
    return innermost[0] if innermost else _DEFAULT


# torch.compile cannot trace ContextVar.get: it calls this function while tracing and keeps the result as a graph
# constant. This is what torch.compiler.assume_constant_result does, without importing torch._dynamo (which
# imports triton) when olmo_hybrid.ops is imported.
current_backend._dynamo_marked_constant = True


def _load(op: str, backend: str) -> tuple[Callable, Check | None] | str:
    key = (op, backend)
    if key not in _loaded:
        try:
            _loaded[key] = implementation(op, backend)
        except LookupError as e:
            _loaded[key] = str(e.args[0])
        except ImportError as e:  # the backend's optional dependency is missing
            _loaded[key] = f"its module could not be imported ({e})"
    return _loaded[key]


def _usable(op: str, backend: str, args: dict) -> tuple[Callable | None, str | None]:
    """(implementation, None), or (None, why ``backend`` cannot run ``op`` with ``args``)."""
    found = _load(op, backend)
    if isinstance(found, str):
        return None, found
    fn, check = found
    why = check(**args) if check is not None else None
    return (None, why) if why is not None else (fn, None)


def available_backends(op: str) -> list[str]:
    """Backends with an importable implementation of ``op`` (arguments not checked). Imports their modules: call
    it before ``torch.compile`` so that no import happens inside a compiled region."""
    _check_name(op, "op", OPS)
    return [b for b in BACKENDS[1:] if not isinstance(_load(op, b), str)]


def _warn_once(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        logger.warning("%s: using the slow PyTorch reference on CUDA because %s", op, reason)


def select(op: str, backend: str | None, device: torch.device, args: dict) -> Callable:
    """The implementation of ``op`` to call with ``args`` on ``device``: ``backend``, or the context's choice
    when None, with "auto" resolved as described in the module docstring."""
    name = current_backend(op) if backend is None else backend
    _check_name(name, "backend", BACKENDS)
    if name == "auto":
        if device.type == "cuda":
            fn, why = _usable(op, "triton", args)
            if fn is not None:
                return fn
            _warn_once(op, why)
        name = "torch"
    fn, why = _usable(op, name, args)
    if fn is None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {why}")
    return fn
