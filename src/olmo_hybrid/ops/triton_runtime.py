"""The one place that imports Triton: every kernel module takes ``triton`` and ``tl`` from here.

Without a CUDA device the kernels run in Triton's CPU interpreter (slow; meant for the test suite). Triton decides
at kernel-definition time whether ``@triton.jit`` builds GPU code or an interpreted function, from
``TRITON_INTERPRET``; this module turns the interpreter on before importing triton when there is no CUDA device
(``TRITON_INTERPRET=0`` set explicitly keeps compiled kernels: ahead-of-time compile checks on a CPU machine).

Triton 3.6's interpreter turns loop bounds into Python ints with ``int(array)`` on 1-element arrays, which
recent NumPy (2.4 here) rejects ("only 0-dimensional arrays can be converted"); loops whose bound comes from
``tl.program_id`` or a load then fail. ``_patch_index`` makes that conversion take the single element.
Its bf16 ``tl.dot`` is also wrong (garbage values), so the kernels emulate bf16/tf32 operand rounding in fp32
when interpreting (``gated_delta_rule/chunk_common.py::dot_precision``).
"""

from __future__ import annotations

import os
import sys

import torch


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def device_refusal(t: torch.Tensor) -> str | None:
    """Why the kernels cannot run on ``t``'s device (CUDA, or the CPU under the interpreter), or None."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return None
    return f"Triton kernels need CUDA tensors, got {t.device.type}"


def dtype_refusal(**tensors: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors' dtypes (float32, bfloat16, float16), or None."""
    for name, t in tensors.items():
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
    return None


def rows_contiguous(t: torch.Tensor) -> bool:
    """Whether each row t[b] is contiguous: what the decode-step kernels need of a state, which they address
    through a row stride (rows of a larger pool)."""
    return t.shape[0] == 0 or t[0].is_contiguous()


def _patch_index() -> None:
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_olmo_hybrid_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._olmo_hybrid_patched = True
    interpreter._patch_lang_tensor = patched


def _setup() -> None:
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        if "triton.language" in sys.modules:  # its own @jit helpers (tl.sum, tl.cdiv, ...) are already compiled
            raise ImportError("no CUDA device, and triton was imported before TRITON_INTERPRET=1 could be set; "
                              "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU")
        os.environ["TRITON_INTERPRET"] = "1"
    if interpreting():
        _patch_index()


_setup()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["KERNEL_DTYPES", "device_refusal", "dtype_refusal", "interpreting", "rows_contiguous", "tl", "triton"]
