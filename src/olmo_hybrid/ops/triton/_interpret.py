"""Running the Triton kernels without a GPU: Triton's CPU interpreter (slow; meant for the test suite).

Triton decides at kernel-definition time whether ``@triton.jit`` builds GPU code or an interpreted function,
from ``TRITON_INTERPRET``. Without a CUDA device the compiled path cannot run at all, so this module (imported
before any kernel module) turns the interpreter on in that case.

Triton 3.6's interpreter turns loop bounds into Python ints with ``int(array)`` on 1-element arrays, which
recent NumPy (2.4 here) rejects ("only 0-dimensional arrays can be converted"); loops whose bound comes from
``tl.program_id`` or a load then fail. ``_patch_index`` makes that conversion take the single element.
Its bf16 ``tl.dot`` is also wrong (garbage values), so the kernels emulate bf16/tf32 operand rounding in fp32
when interpreting (``gdn_chunk._dot_precision``).
"""

from __future__ import annotations

import os
import sys

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def setup() -> None:
    # TRITON_INTERPRET=0 set explicitly keeps compiled kernels (ahead-of-time compile checks on a CPU machine).
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        if "triton.language" in sys.modules:  # its own @jit helpers (tl.sum, tl.cdiv, ...) are already compiled
            raise ImportError("no CUDA device, and triton was imported before TRITON_INTERPRET=1 could be set; "
                              "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU")
        os.environ["TRITON_INTERPRET"] = "1"
    if interpreting():
        _patch_index()
