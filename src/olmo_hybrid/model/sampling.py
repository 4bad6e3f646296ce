"""Per-request sampling on the device: greedy, temperature, top-k, top-p, seeded, one batched call per step.

Each row of a decode batch carries its own parameters. Random draws come from a counter-based hash of
(request seed, index of the token being sampled, candidate token id) instead of a stateful generator, so
a request's samples do not depend on which other requests share its batch (continuous batching gives
the same output as running it alone), no host sync is needed, and the whole call is CUDA-graph safe.

Sampling is the exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i is token i with
probability p_i (the same trick as gpt-fast, which uses it to avoid ``torch.multinomial``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # multiplier of a well-known 32-bit integer hash (three xorshift-multiply rounds)
_GOLDEN = 0x9E3779B1  # 2^32 / golden ratio: spreads consecutive token ids before hashing


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token. ``temperature=0`` is greedy (argmax); the others then do not matter.

    top_k: keep the k most likely tokens (0 = all). top_p: keep the smallest set of most likely tokens whose
    probability reaches top_p (1.0 = all). seed: makes the draws reproducible (None = a fresh random seed).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        # The one place sampling settings are checked: the engine, ``HybridLM.generate`` and the CLI all build
        # a SamplingParams, so they accept and refuse the same values (NaN fails every comparison below).
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not (number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                          and 0 <= self.seed < 2**63):
            raise ValueError(f"SamplingParams.seed must be an integer in [0, 2**63) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Hash int64 values in [0, 2^32) to [0, 2^32); every product stays below 2^59 (no int64 overflow)."""
    x = (((x >> 16) ^ x) * _MIX) & _M32
    x = (((x >> 16) ^ x) * _MIX) & _M32
    return (x >> 16) ^ x


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in (0, 1), a pure function of (seed [B], counter [B], token_ids [B, N])."""
    row = _mix32(_mix32((seed & _M32) ^ _mix32((seed >> 32) & _M32)) ^ (counter & _M32))
    x = _mix32(_mix32(row[:, None] ^ ((token_ids * _GOLDEN) & _M32)))
    # 24 bits so that the float32 value is exact and never 0 or 1.
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, counter: torch.Tensor, all_greedy: bool = False) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V] -> LongTensor [B], with per-row parameters (each [B]).

    temperature float (0 = argmax), top_k long (0 = no limit), top_p float, seed long, counter long (index of
    the token being sampled within its request, so every draw of a request gets fresh noise). ``all_greedy``
    skips the sort when the caller knows every row is greedy.
    """
    greedy = logits.argmax(dim=-1)
    if all_greedy:
        return greedy
    vocab = logits.shape[-1]
    scaled = logits.float() / temperature.clamp(min=1e-5)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    keep = (top_k[:, None] <= 0) | (rank[None] < top_k[:, None])
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    # Drop a token once the probability mass before it already reaches top_p (the top token always stays).
    keep &= probs.cumsum(dim=-1) - probs < top_p[:, None]
    probs = probs * keep
    race = probs / -uniform_noise(seed, counter, order).log()
    sampled = order.gather(1, race.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, sampled, greedy)
