"""Synthetic probe data: state tracking (parity, modular arithmetic, S5) and associative recall (MQAR).

Every generator returns ``(input_ids, labels)``, both ``[batch, length]`` int64, with ``labels = -100``
where nothing is scored. State-tracking tasks are "token tagging" (Merrill et al. 2024; Grazzi et al.
2025): the label at each scored position is the state after reading the input up to and including it.

- ``parity``: bits (ids 0/1); label = running XOR. The Grazzi et al. test of negative eigenvalues.
- ``modular``: ``d0 op d1 op d2 ...`` with digits mod ``m`` and ops ``+ - *`` (ids m, m+1, m+2),
  evaluated left to right; label at each digit = running value mod m. (Grazzi et al. evaluate with
  operator precedence and score only the final answer; left-to-right keeps every prefix a well-defined
  state, which makes the tagging target exact.)
- ``s5``: ids 0..119 are the permutations of 5 items; label = index of the running composition.
  S5 is non-solvable: no fixed-depth transformer tracks it at arbitrary length (Merrill et al.).
- ``mqar``: Zoology's multi-query associative recall: ``k1 v1 ... kn vn`` then the keys again at
  power-law-distributed gaps among random filler; label at each queried key = its value.
- ``state_recall``: the OLMo Hybrid paper's "state-based recall" (Merrill et al. 2026, arXiv:2604.03444), in
  tokens: a memory of slot/value pairs, registers pointing at slots, a run of register swaps (permutation
  tracking), then queries "value of the slot register r points to now" (recall through tracked state). Longer
  sequences mean more swaps; the memory stays the same size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

IGNORE = -100

S5_PERMS = list(itertools.permutations(range(5)))
_S5_INDEX = {p: i for i, p in enumerate(S5_PERMS)}
# S5_COMPOSE[a, b] = index of "apply a, then b" (b o a): the state after reading a then b.
S5_COMPOSE = torch.tensor([[_S5_INDEX[tuple(S5_PERMS[b][S5_PERMS[a][i]] for i in range(5))]
                            for b in range(120)] for a in range(120)], dtype=torch.long)
S5_IDENTITY = _S5_INDEX[tuple(range(5))]


def _check(batch: int, length: int, minimum: int = 1):
    if batch <= 0 or length < minimum:
        raise ValueError(f"need batch > 0 and length >= {minimum}, got batch={batch}, length={length}")


def parity(batch: int, length: int, gen: torch.Generator | None = None):
    _check(batch, length)
    bits = torch.randint(0, 2, (batch, length), generator=gen)
    return bits, bits.cumsum(1) % 2


def modular(batch: int, length: int, gen: torch.Generator | None = None, m: int = 5):
    """``length`` tokens, digit first (odd lengths end on a digit, even ones on an operator); digits 0..m-1, ops
    m (+), m+1 (-), m+2 (*)."""
    _check(batch, length)
    n_digits = length // 2 + 1  # one digit more than fits when the length is even; cut below
    digits = torch.randint(0, m, (batch, n_digits), generator=gen)
    ops = torch.randint(0, 3, (batch, max(n_digits - 1, 0)), generator=gen)
    ids = torch.empty(batch, 2 * n_digits - 1, dtype=torch.long)
    ids[:, 0::2] = digits
    ids[:, 1::2] = ops + m
    labels = torch.full_like(ids, IGNORE)
    value = digits[:, 0].clone()
    labels[:, 0] = value
    for j in range(1, n_digits):
        d, op = digits[:, j], ops[:, j - 1]
        value = torch.where(op == 0, value + d, torch.where(op == 1, value - d, value * d)) % m
        labels[:, 2 * j] = value
    return ids[:, :length], labels[:, :length]


def s5(batch: int, length: int, gen: torch.Generator | None = None):
    _check(batch, length)
    ids = torch.randint(0, 120, (batch, length), generator=gen)
    labels = torch.empty_like(ids)
    state = torch.full((batch,), S5_IDENTITY, dtype=torch.long)
    for t in range(length):
        state = S5_COMPOSE[state, ids[:, t]]
        labels[:, t] = state
    return ids, labels


def mqar(batch: int, length: int, gen: torch.Generator | None = None, num_kv: int = 8, vocab: int = 128,
         power_a: float = 0.01):
    """Keys from [1, vocab/2), values from [vocab/2, vocab), as in Zoology's ``multiquery_ar``."""
    _check(batch, length, 4 * num_kv)
    if num_kv >= vocab // 2:
        raise ValueError(f"mqar: num_kv={num_kv} needs vocab > {2 * num_kv}, got vocab={vocab}")
    half = vocab // 2
    keys = torch.stack([torch.randperm(half - 1, generator=gen)[:num_kv] + 1 for _ in range(batch)])
    values = torch.randint(half, vocab, (batch, num_kv), generator=gen)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)  # random filler ("random_non_queries")
    ids[:, 0:2 * num_kv:2] = keys
    ids[:, 1:2 * num_kv:2] = values
    labels = torch.full_like(ids, IGNORE)
    slots = (length - 2 * num_kv) // 2  # queries sit at even offsets of the query region
    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    probs = (power_a * gaps ** (power_a - 1)).expand(batch, slots)
    chosen = torch.multinomial(probs, num_kv, replacement=False, generator=gen)  # distinct slots
    pos = 2 * num_kv + 2 * chosen
    ids.scatter_(1, pos, keys)
    labels.scatter_(1, pos, values)
    return ids, labels


def state_recall(batch: int, length: int, gen: torch.Generator | None = None, num_slots: int = 32,
                 num_regs: int = 4, num_values: int = 4):
    """``P v`` x slots (shuffled), ``R_j P`` x regs, swaps ``S_ij`` (the rest), ``Q``, then every register once.

    Ids: values [0, V), slots [V, V+M), registers [V+M, V+M+K), swaps (one per register pair), ``Q`` last.
    """
    pairs = list(itertools.combinations(range(num_regs), 2))
    fixed = 2 * num_slots + 2 * num_regs + 1 + num_regs
    _check(batch, length, fixed + 1)
    slot0, reg0 = num_values, num_values + num_slots
    swap0, query = reg0 + num_regs, reg0 + num_regs + len(pairs)
    n_swaps = length - fixed
    values = torch.randint(0, num_values, (batch, num_slots), generator=gen)
    order = torch.stack([torch.randperm(num_slots, generator=gen) for _ in range(batch)])
    memory = torch.stack([order + slot0, values.gather(1, order)], dim=2).reshape(batch, 2 * num_slots)
    ptr = torch.stack([torch.randperm(num_slots, generator=gen)[:num_regs] for _ in range(batch)])
    regs = torch.arange(num_regs).expand(batch, num_regs)
    init = torch.stack([regs + reg0, ptr + slot0], dim=2).reshape(batch, 2 * num_regs)
    swaps = torch.randint(0, len(pairs), (batch, n_swaps), generator=gen)
    pair_i = torch.tensor([i for i, _ in pairs])
    pair_j = torch.tensor([j for _, j in pairs])
    rows = torch.arange(batch)
    for t in range(n_swaps):
        i, j = pair_i[swaps[:, t]], pair_j[swaps[:, t]]
        pi, pj = ptr[rows, i].clone(), ptr[rows, j].clone()
        ptr[rows, i], ptr[rows, j] = pj, pi
    asked = torch.stack([torch.randperm(num_regs, generator=gen) for _ in range(batch)])
    ids = torch.cat([memory, init, swaps + swap0, torch.full((batch, 1), query), asked + reg0], dim=1)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -num_regs:] = values.gather(1, ptr.gather(1, asked))
    return ids, labels


@dataclass(frozen=True)
class ProbeTask:
    name: str
    vocab_size: int
    make: callable  # (batch, length, generator) -> (input_ids, labels)
    description: str


TASKS = {
    "parity": ProbeTask("parity", 2, parity, "running parity of a bit string"),
    "modular": ProbeTask("modular", 8, modular, "running value of a mod-5 expression, left to right"),
    "s5": ProbeTask("s5", 120, s5, "running composition of permutations of 5 items (S5 word problem)"),
    "mqar": ProbeTask("mqar", 128, mqar, "multi-query associative recall, 8 key-value pairs"),
    "state_recall": ProbeTask("state_recall", 4 + 32 + 4 + 6 + 1, state_recall,
                              "recall the value under a pointer tracked through register swaps (32 slots, 4 registers)"),
}
