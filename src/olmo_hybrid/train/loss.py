"""Training loss (cross-entropy + z-loss) and validation loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from olmo_hybrid.data.loader import IGNORE_LABEL as IGNORE_INDEX


def loss_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy, summed z-loss term and the number of scored tokens.

    The z-loss (PaLM; OLMo-core's ``z_loss_multiplier``) is ``logsumexp(logits)^2`` per token: it keeps
    the softmax normaliser near 1 so logits do not drift, which matters most in low precision. Both are
    computed in fp32 whatever the autocast dtype. Labels equal to -100 are not scored.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1)
    mask = target != IGNORE_INDEX
    ce = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    lse = torch.logsumexp(flat, dim=-1)
    z = (lse.pow(2) * mask).sum()
    return ce, z, mask.sum()


def _chunk_terms(logits: torch.Tensor, y: torch.Tensor, z_coef: float, scale: float, need_grad: bool,
                 grad_dtype: torch.dtype):
    """Summed cross-entropy and z-loss of one chunk of logits [c, vocab] and, if ``need_grad``, the gradient of
    ``(ce + z_coef * z) * scale`` wrt the logits, in ``grad_dtype``. With d(ce)/d(logit) = softmax - onehot and
    d(lse^2)/d(logit) = 2 lse softmax, a scored token's logit gradient is softmax * (1 + 2 z_coef lse) - onehot.
    In place on an fp32 copy, so eager mode holds one [c, vocab] fp32 buffer; compiled, it fuses into a
    reduction and one elementwise pass."""
    logits = logits.float()
    mask = y != IGNORE_INDEX
    target = y.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    ce = ((lse - logits.gather(1, target[:, None])[:, 0]) * mask).sum()
    z = (lse.pow(2) * mask).sum()
    if not need_grad:
        return ce, z, None
    g = logits.sub_(lse[:, None]).exp_().mul_((1 + 2 * z_coef * lse)[:, None])
    g.scatter_add_(1, target[:, None], -torch.ones_like(lse)[:, None])
    g.mul_((mask * scale)[:, None])
    return ce, z, g.to(grad_dtype)


_compiled_chunk_terms = None


def _chunk_terms_fn(compiled: bool):
    global _compiled_chunk_terms
    if not compiled:
        return _chunk_terms
    if _compiled_chunk_terms is None:
        _compiled_chunk_terms = torch.compile(_chunk_terms)
    return _compiled_chunk_terms


class _ChunkedLMLoss(torch.autograd.Function):
    """``(ce_sum + z_coef * z_sum) * scale`` of ``hidden @ weight.T`` without the [N, vocab] logits.

    The forward walks the tokens in chunks; for each chunk it computes the logits (in the compute dtype,
    accumulated in fp32), the two loss terms, and at once the gradients wrt the chunk's hidden states and
    the head weight (``_chunk_terms``), so at most one chunk of logits is alive. The backward only scales
    the stored gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, z_coef, scale, compute_dtype, need_grad, compiled):
        n = hidden.shape[0]
        terms = _chunk_terms_fn(compiled)
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros_like(ce_sum)
        for start in range(0, n, chunk):
            hc = h[start:start + chunk]
            ce, z, g = terms(hc @ w.t(), labels[start:start + chunk], z_coef, scale, need_grad, compute_dtype)
            ce_sum += ce
            z_sum += z
            if need_grad:
                grad_h[start:start + chunk] = g @ w
                grad_w += (g.t() @ hc).float()
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce_sum, z_sum)
        return (ce_sum + z_coef * z_sum) * scale, ce_sum, z_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype),
                None, None, None, None, None, None, None)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, z_coef: float,
                    scale: float | torch.Tensor, chunk_tokens: int, compiled: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce_sum, z_sum)`` for the LM head ``weight`` [vocab, d] applied to ``hidden`` [..., d].

    ``loss = (ce_sum + z_coef * z_sum) * scale`` is differentiable wrt ``hidden`` and ``weight``; the two
    sums are :func:`loss_terms`' (detached). Peak memory is one chunk of ``chunk_tokens`` x vocab fp32
    logits instead of all of them (``scale`` may be a 0-d tensor on the device, so that a count known only
    there needs no host sync). Matmuls run in the autocast dtype when autocast is on (else in
    ``hidden``'s dtype), with fp32 softmax and fp32 accumulation of the weight gradient. ``compiled``
    fuses the per-chunk softmax and gradient arithmetic with ``torch.compile`` (the matmuls stay cuBLAS).
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLMLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                    chunk_tokens, float(z_coef), scale if torch.is_tensor(scale) else float(scale),
                                    dtype, need_grad, compiled)


@dataclass
class ValResult:
    loss: float  # mean nats per scored token
    tokens: int


@torch.no_grad()
def evaluate(score: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], batches: Iterable[dict],
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ValResult:
    """Mean cross-entropy over ``batches``; ``score(batch)`` returns (summed nats, scored tokens).

    ``reduce`` sums the [nats, tokens] totals over processes (an all-reduce) when each scores a shard.
    """
    nats, tokens = None, None
    for batch in batches:
        ce, n = score(batch)
        nats = ce.double() if nats is None else nats + ce.double()
        tokens = n if tokens is None else tokens + n
    totals = torch.stack([nats, tokens.double()]) if nats is not None else torch.zeros(2, dtype=torch.float64)
    if reduce is not None:
        totals = reduce(totals)
    nats, tokens = totals.tolist()
    if tokens == 0:
        raise ValueError("validation set is empty: no tokens to score")
    return ValResult(loss=nats / tokens, tokens=int(tokens))
