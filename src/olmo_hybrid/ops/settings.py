"""Numerics and launch settings of the GDN Triton kernels, passed to the ops as ``settings=``.

A model records the settings it trained with in its config; the ops receive them per call (never from the
environment), and the custom ops receive them as plain arguments, so eager runs, fake implementations and
``torch.compile`` graphs all see the same values. This module imports nothing but the standard library: the model
config embeds a :class:`KernelSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass

DOT_PRECISIONS = ("bf16", "tf32", "tf32r")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class KernelSettings:
    """Dot precision and tile/warp choices of the chunked gated-delta-rule kernels; the defaults are the settings
    measured fastest at the stated accuracy on an H100 (docs/benchmarks.md). The torch and fla backends and the
    decode-step kernel have no such choices and ignore them."""

    dot: str = "bf16"
    """Dot-product operands for bfloat16/float16 inputs: "bf16" (bf16 operands, fp32 accumulation; the products
    with the UT inverses stay tf32), "tf32" (every product tf32: two thirds of the error at 1.6x the time), or
    "tf32r" (tf32 with operands rounded to nearest first; Triton feeds tf32 tensor cores truncated fp32).
    float32 inputs always use exact fp32 products."""

    backward_dot: str | None = None
    """The same choice for the backward kernels alone; None uses ``dot``."""

    block_v: int | None = None
    """V tile of the sequential kernels (forward, backward state pass), a power of two, clamped to
    [16, next power of two of V]; None: 64 with bf16 operands, else 32 (16 for key heads over 128)."""

    warps: int = 4
    """Warps per program of the sequential kernels."""

    stages: int = 1
    """Software-pipelining stages of the sequential kernels."""

    backward_block_v: int | None = None
    """V tile of the parallel backward kernels (dq, dk), a power of two, at most the next power of two of V
    (at least 16); None: 64 with bf16 operands, else 16."""

    backward_warps: int = 4
    """Warps per program of the parallel backward kernels (8 miscompiled small heads with tf32 operands on
    Triton 3.6, docs/benchmarks.md)."""

    backward_stages: int = 1
    """Software-pipelining stages of the parallel backward kernels."""

    def __post_init__(self):
        for name in ("dot", "backward_dot"):
            value = getattr(self, name)
            if value is not None and value not in DOT_PRECISIONS:
                raise ValueError(f"KernelSettings.{name}={value!r}: expected one of {', '.join(DOT_PRECISIONS)}")
        for name in ("block_v", "warps", "backward_block_v", "backward_warps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not _power_of_two(value)):
                raise ValueError(f"KernelSettings.{name}={value!r}: expected a power of two")
        for name in ("stages", "backward_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelSettings.{name}={value!r}: expected an integer >= 1")

    @property
    def dot_backward(self) -> str:
        """The backward kernels' dot precision (``backward_dot``, else ``dot``)."""
        return self.dot if self.backward_dot is None else self.backward_dot
