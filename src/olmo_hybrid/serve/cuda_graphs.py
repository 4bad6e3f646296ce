"""CUDA graphs of the engine's decode step (CUDA only; the CPU path never imports or calls this).

One graph per row bucket: rows rounded up to a power of two (capped at the slot count). The context length
is not part of the key: the decode attention kernel reads each row's length on the device, so one graph
serves every length. Graphs read the engine's persistent token and position buffers, so a replay needs no
input copies; other rows in a bucket are free or still prefilling slots, which compute into their own rows
(the engine restores the GDN state of prefilling ones). All graphs are captured when the engine is created:
the warm-up run before each capture updates GDN states in place, which is harmless only while every slot is free.
"""

from __future__ import annotations

import torch

from olmo_hybrid.serve.runner import ModelRunner


def row_buckets(slots: int) -> list[int]:
    """Powers of two below ``slots``, then ``slots``."""
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, tokens: torch.Tensor, positions: torch.Tensor):
        if tokens.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got tokens on {tokens.device}")
        if runner.decode_kernel is None:
            raise ValueError("CUDA graphs need the runner's decode attention kernel (per-row lengths on the device)")
        cache = runner.cache
        if cache.num_free != cache.num_slots:
            raise RuntimeError("decode graphs must be captured while every cache slot is free")
        self.runner, self.tokens, self.positions = runner, tokens, positions
        self.row_buckets = row_buckets(cache.num_slots)
        self.pool = torch.cuda.graph_pool_handle()
        # One output buffer for all graphs (each graph's own logits would stay allocated in the pool).
        self.logits = torch.empty(cache.num_slots, runner.config.vocab_size, device=tokens.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Largest first, so that smaller graphs reuse the shared pool's blocks.
        for rows in reversed(self.row_buckets):
            self._capture(rows)

    def _capture(self, rows: int) -> None:
        args = (self.tokens[:rows], self.positions[:rows])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, kernel compilation
            self.runner.decode(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:rows].copy_(self.runner.decode(*args))
        self.graphs[rows] = graph

    def decode(self, rows: int) -> torch.Tensor:
        """Replay the bucket covering ``rows``; logits [rows, V] (valid until the next replay)."""
        self.graphs[next(b for b in self.row_buckets if b >= rows)].replay()
        return self.logits[:rows]
