"""CUDA graphs of the engine's decode step (CUDA only; the CPU path never imports or calls this).

One graph per (rows, span) bucket: rows rounded up to a power of two (capped at the slot count), span
(keys attended) up to the next of 2^k and 1.5 * 2^k (capped at the slot capacity), so a step reads at most
half again the KV cache it needs. Graphs read the engine's persistent token and position buffers, so a
replay needs no input copies; other rows in a bucket are free or still prefilling slots, which compute
into their own rows (the engine restores the GDN state of prefilling ones). All graphs are captured when
the engine is created: the warm-up run before each capture updates GDN states in place, which is harmless
only while every slot is free.
"""

from __future__ import annotations

import torch

from olmo_hybrid.serve.runner import ModelRunner


def _buckets(lo: int, hi: int, steps: tuple[float, ...] = (1.0,)) -> list[int]:
    """Sizes s * 2^k (for s in ``steps``) from ``lo`` up to ``hi``, then ``hi`` itself."""
    out, b = set(), 1
    while b < hi:
        out.update(int(s * b) for s in steps if lo <= int(s * b) < hi)
        b *= 2
    return sorted(out) + [hi]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, tokens: torch.Tensor, positions: torch.Tensor, min_span: int = 256):
        if tokens.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got tokens on {tokens.device}")
        cache = runner.cache
        if cache.num_free != cache.num_slots:
            raise RuntimeError("decode graphs must be captured while every cache slot is free")
        self.runner, self.tokens, self.positions = runner, tokens, positions
        self.row_buckets = _buckets(1, cache.num_slots)
        self.span_buckets = _buckets(min(min_span, cache.capacity), cache.capacity, steps=(1.0, 1.5))
        self.pool = torch.cuda.graph_pool_handle()
        # One output buffer for all graphs (each graph's own logits would stay allocated in the pool).
        self.logits = torch.empty(cache.num_slots, runner.config.vocab_size, device=tokens.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # Largest first, so that smaller graphs reuse the shared pool's blocks.
        for rows in reversed(self.row_buckets):
            for span in reversed(self.span_buckets):
                self._capture(rows, span)

    def _capture(self, rows: int, span: int) -> None:
        args = (self.tokens[:rows], self.positions[:rows], span)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, kernel autotuning
            self.runner.decode(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:rows].copy_(self.runner.decode(*args))
        self.graphs[(rows, span)] = graph

    def decode(self, rows: int, span: int) -> torch.Tensor:
        """Replay the bucket covering ``rows`` and ``span``; logits [rows, V] (valid until the next replay)."""
        r = next(b for b in self.row_buckets if b >= rows)
        s = next(b for b in self.span_buckets if b >= span)
        self.graphs[(r, s)].replay()
        return self.logits[:rows]
