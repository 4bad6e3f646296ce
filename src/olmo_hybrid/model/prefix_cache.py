"""Prefix state caching for the engine: snapshots of a cache row at block boundaries, reused by later prompts.

A GDN layer's state summarises every token so far and cannot be cut back to an earlier token the way a KV cache
can, so reusing a prefix needs the state as it was at the end of that prefix. The engine prefills prompts in
pieces that end on multiples of ``block_size``; at each boundary it stores one *block*: the ``block_size`` keys
and values of that block for the attention layers, and a copy of every fixed-size state (GDN recurrent state in
fp32 and the short-conv states, exactly as the live cache holds them) at the boundary. A block is keyed by its
parent block and its own tokens, so a chain of blocks from the root is a token prefix; dictionary lookup compares
the tokens themselves, so two prefixes never share an entry by a hash collision.

A new prompt restores the longest cached chain that ends at least one token before its end (that last token
must run through the model to give the logits of the first new token): the chain's keys and values, and the
fixed-size states of its last block, are copied into the request's slot, and the prefill continues from there.
Prefilled pieces end on the same boundaries with and without a hit, so a restored state is bit-identical to
the one the prefill would have computed.

Storage is one preallocated pool per state tensor (``num_blocks`` blocks, from a byte budget), so the cache never
allocates while serving. When the pool is full the least recently used block without cached children is
evicted (a child needs its parent's keys and values); a lookup touches its chain from the leaf up, so the blocks
near the root of a popular prefix stay.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from olmo_hybrid.model.cache import HybridCache, layer_tensors


@dataclass(eq=False)
class PrefixBlock:
    """One cached block: pool row ``index``, holding tokens ``[end - block_size, end)`` of its prefix."""

    index: int
    parent: PrefixBlock | None
    tokens: tuple[int, ...]
    end: int
    serial: int  # unique for the cache's lifetime: the key of the children of this block
    children: int = 0
    alive: bool = True

    def chain(self) -> list[PrefixBlock]:
        """The blocks from the root to this one."""
        out, node = [], self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up (all but the last of each prompt)
    hit_tokens: int = 0  # prompt tokens restored instead of prefilled
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def prefix_block_bytes(cache: HybridCache, block_size: int) -> int:
    """Bytes of one cached block: ``block_size`` tokens of every per-token field plus every fixed-size state."""
    total = 0
    for state in cache.layers:
        for name, t in layer_tensors(state):
            per_slot = t[0].numel() * t.element_size()
            total += per_slot * block_size // t.shape[2] if name in state.per_token else per_slot
    return total


class PrefixCache:
    """Block snapshots of ``cache`` rows under a byte budget (see the module docstring).

    block_size: tokens per block (the granularity of reuse). budget_bytes: the pool's size; it holds
    ``budget_bytes // prefix_block_bytes(cache, block_size)`` blocks (at least one, else an error).
    """

    def __init__(self, cache: HybridCache, block_size: int, budget_bytes: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"prefix cache block_size must be a positive integer, got {block_size!r}")
        self.cache, self.block_size = cache, block_size
        self.block_bytes = prefix_block_bytes(cache, block_size)
        self.num_blocks = budget_bytes // self.block_bytes if budget_bytes > 0 else 0
        if self.num_blocks < 1:
            raise ValueError(f"prefix cache budget of {budget_bytes} bytes holds no block: one block of "
                             f"{block_size} tokens takes {self.block_bytes} bytes")
        # pools[layer][field]: [num_blocks, ...one slot's tensor, with block_size tokens on a per-token axis].
        self.pools: list[dict[str, torch.Tensor]] = []
        for state in cache.layers:
            pools = {}
            for name, t in layer_tensors(state):
                shape = list(t.shape)
                shape[0] = self.num_blocks
                if name in state.per_token:
                    shape[2] = block_size
                pools[name] = torch.empty(shape, dtype=t.dtype, device=t.device)
            self.pools.append(pools)
        self._free = list(range(self.num_blocks))
        self._index: dict[tuple[int, tuple[int, ...]], PrefixBlock] = {}
        self._lru: collections.OrderedDict[PrefixBlock, None] = collections.OrderedDict()  # oldest first
        self._serials = itertools.count()
        self.stats = PrefixCacheStats()

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def used_blocks(self) -> int:
        return len(self._lru)

    # -- lookup and restore ----------------------------------------------------------------------------
    def lookup(self, prompt: Sequence[int]) -> PrefixBlock | None:
        """The last block of the longest cached chain covering at most ``len(prompt) - 1`` tokens of ``prompt``
        (None: no hit); its chain is marked recently used. Counts the query in ``stats``."""
        b = self.block_size
        self.stats.queried_tokens += len(prompt) - 1
        node = None
        for end in range(b, len(prompt), b):
            found = self._index.get((self._serial(node), tuple(prompt[end - b:end])))
            if found is None:
                break
            node = found
        if node is not None:
            for block in reversed(node.chain()):  # leaf first: parents end up more recent than their children
                self._lru.move_to_end(block)
            self.stats.hit_tokens += node.end
        return node

    @torch.no_grad()
    def restore(self, slot: int, node: PrefixBlock) -> int:
        """Copy ``node``'s chain into cache row ``slot`` (keys and values of every block, the fixed-size states
        of ``node``) and set the row's length; returns the number of tokens restored."""
        chain = node.chain()
        index = torch.tensor([n.index for n in chain], device=self.cache.device)
        for state, pools in zip(self.cache.layers, self.pools):
            for name, live in layer_tensors(state):
                pool = pools[name]
                if name in state.per_token:
                    blocks = pool.index_select(0, index)  # [n, H, block, ...]
                    tokens = blocks.transpose(0, 1).reshape(blocks.shape[1], node.end, *blocks.shape[3:])
                    live[slot, :, :node.end] = tokens
                else:
                    live[slot] = pool[node.index]
        self.cache.lengths[slot] = node.end
        return node.end

    # -- store -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def store(self, slot: int, parent: PrefixBlock | None, tokens: Sequence[int], end: int) -> PrefixBlock | None:
        """Record cache row ``slot`` at boundary ``end`` (its length), whose last block holds ``tokens``, as the
        child of ``parent`` (the block ending at ``end - block_size``; None at the first boundary). Returns the
        block (an existing one if this prefix is cached already), or None when the chain cannot continue: the
        parent was evicted meanwhile, or every block is needed by the chain itself."""
        b = self.block_size
        if len(tokens) != b or end % b or (parent is None) != (end == b) or (parent is not None and
                                                                            parent.end != end - b):
            raise ValueError(f"store: a block of {b} tokens ending at a multiple of {b}, after its parent, "
                             f"got {len(tokens)} tokens ending at {end} after {parent and parent.end}")
        if parent is not None and not parent.alive:
            return None
        key = (self._serial(parent), tuple(int(t) for t in tokens))
        found = self._index.get(key)
        if found is not None:
            self._lru.move_to_end(found)
            return found
        if not self._free and not self._evict(keep=parent):
            return None
        node = PrefixBlock(self._free.pop(), parent, key[1], end, next(self._serials))
        for state, pools in zip(self.cache.layers, self.pools):
            for name, live in layer_tensors(state):
                pools[name][node.index] = live[slot, :, end - b:end] if name in state.per_token else live[slot]
        if parent is not None:
            parent.children += 1
        self._index[key] = node
        self._lru[node] = None
        self.stats.stored_blocks += 1
        return node

    def _evict(self, keep: PrefixBlock | None) -> bool:
        """Free the least recently used block that has no children (never ``keep``); False if there is none."""
        victim = next((n for n in self._lru if n.children == 0 and n is not keep), None)
        if victim is None:
            return False
        self._drop(victim)
        self.stats.evicted_blocks += 1
        return True

    def _drop(self, node: PrefixBlock) -> None:
        del self._lru[node]
        del self._index[(self._serial(node.parent), node.tokens)]
        if node.parent is not None:
            node.parent.children -= 1
        node.alive = False
        self._free.append(node.index)

    @staticmethod
    def _serial(node: PrefixBlock | None) -> int:
        return -1 if node is None else node.serial

    def clear(self) -> None:
        """Drop every block (leaves first)."""
        for node in sorted(self._lru, key=lambda n: -n.end):
            self._drop(node)

    def check(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (a leaked or doubly used block)."""
        nodes = list(self._lru)
        assert len(nodes) == len(self._index) and all(n.alive for n in nodes)
        assert sorted([n.index for n in nodes] + self._free) == list(range(self.num_blocks))
        children = collections.Counter(n.parent for n in nodes if n.parent is not None)
        assert all(n.children == children.get(n, 0) for n in nodes)
        assert all(n.parent is None or n.parent.alive for n in nodes)
