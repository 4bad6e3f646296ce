"""CUDA graphs of the engine's decode step (CUDA only; the CPU path never imports or calls this).

One graph per row bucket: rows rounded up to a power of two (capped at the slot count). The context length
is not part of the key: the decode attention kernel reads each row's length on the device, so one graph
serves every length. The captured step (``Engine._decode``, a ``HybridLM.forward`` call) reads the engine's
persistent token and active-row buffers and the cache's lengths, so a replay needs no input copies; rows of a
bucket that are free or still prefilling are inactive and keep their state. Graphs are captured when the
engine is created, while every slot is free (so inactive): the warm-up and capture runs change no state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def row_buckets(slots: int) -> list[int]:
    """Powers of two below ``slots``, then ``slots``."""
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


class DecodeGraphs:
    """``step(rows) -> logits [rows, V]`` captured once per row bucket."""

    def __init__(self, step: Callable[[int], torch.Tensor], slots: int, vocab_size: int, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.step = step
        self.row_buckets = row_buckets(slots)
        self.pool = torch.cuda.graph_pool_handle()
        # One output buffer for all graphs (each graph's own logits would stay allocated in the pool).
        self.logits = torch.empty(slots, vocab_size, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Largest first, so that smaller graphs reuse the shared pool's blocks.
        for rows in reversed(self.row_buckets):
            self._capture(rows)

    def _capture(self, rows: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, kernel compilation
            self.step(rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:rows].copy_(self.step(rows))
        self.graphs[rows] = graph

    def decode(self, rows: int) -> torch.Tensor:
        """Replay the bucket covering ``rows``; logits [rows, V] (valid until the next replay)."""
        self.graphs[next(b for b in self.row_buckets if b >= rows)].replay()
        return self.logits[:rows]
