"""Building a server for a model: engine sizing from device memory, end tokens, chat template, the app.

``olmo-hybrid serve`` and the load-test benchmark both come here, so they serve with the same settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from olmo_hybrid.data.chat import ChatTemplate
from olmo_hybrid.model.engine import Engine
from olmo_hybrid.model.memory import (MemoryBudgetError, format_bytes, free_device_bytes, max_sequences,
                                      sequence_bytes, workspace_bytes)
from olmo_hybrid.serve import chat
from olmo_hybrid.serve.protocol import ServedModel

MAX_AUTO_SLOTS = 256
CPU_SLOTS = 8
DEFAULT_PREFIX_CACHE_BYTES = {"cuda": 4 * 2**30, "cpu": 256 * 2**20}


@dataclasses.dataclass
class ServeSettings:
    """How to serve (``olmo-hybrid serve --help`` explains each as a flag). None means: decide from the model and
    the device."""

    name: str = "olmo-hybrid"
    max_batch: int | None = None  # cache slots; None: as many as fit (CUDA), 8 (CPU)
    max_context: int | None = None  # tokens per slot; None: the model's max_seq_len
    max_queue: int = 256  # requests waiting beyond the slots before 429
    prefix_cache_bytes: int | None = None  # 0 disables; None: 4 GiB on CUDA, 256 MiB on the CPU
    prefix_block: int = 256
    prefill_chunk: int = 4096
    prefill_budget: int | None = None
    cuda_graphs: bool = True
    compile_decode: bool = False  # torch.compile (inductor) the decode step
    memory_fraction: float = 0.9  # of the device memory free after loading the weights, for automatic sizing
    shutdown_timeout: float = 30.0
    chat_template: str | None = None  # None: the one the checkpoint's tokenizer carries, else ours


def auto_slots(model, context: int, dtype: torch.dtype, device: torch.device, reserved: int, prefill_chunk: int,
               memory_fraction: float) -> int:
    """Cache slots of ``context`` tokens that fit in ``memory_fraction`` of the free device memory, after
    ``reserved`` bytes (the prefix cache) and the engine's workspace (at most ``MAX_AUTO_SLOTS``)."""
    free = free_device_bytes(device)
    if free is None:
        return CPU_SLOTS
    budget = int(free * memory_fraction) - reserved - workspace_bytes(model.config, prefill_chunk, MAX_AUTO_SLOTS,
                                                                       dtype)
    slots = min(MAX_AUTO_SLOTS, max_sequences(model.config, context, max(0, budget), dtype))
    if slots < 1:
        need = sequence_bytes(model.config, context, dtype)["total"]
        raise MemoryBudgetError(f"not one sequence of {context} tokens ({format_bytes(need)} of cache) fits in "
                                f"{memory_fraction:.0%} of the free memory on {device} ({format_bytes(free)}) after "
                                f"{format_bytes(reserved)} of prefix cache: lower --max-context or "
                                "--prefix-cache-gib")
    return slots


def build_engine(model, tokenizer, settings: ServeSettings, eos_token_ids: set[int]) -> Engine:
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    context = settings.max_context or model.config.max_seq_len
    prefix = settings.prefix_cache_bytes
    if prefix is None:
        prefix = DEFAULT_PREFIX_CACHE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    slots = settings.max_batch or auto_slots(model, context, dtype, device, prefix, settings.prefill_chunk,
                                             settings.memory_fraction)
    return Engine(model, max_batch=slots, max_context=context, tokenizer=tokenizer, eos_token_id=eos_token_ids,
                  prefill_chunk=settings.prefill_chunk, prefill_budget=settings.prefill_budget,
                  cuda_graphs=settings.cuda_graphs and device.type == "cuda", prefix_cache_bytes=prefix,
                  prefix_block=settings.prefix_block, compile_decode="inductor" if settings.compile_decode else None)


def build_app(model, tokenizer, settings: ServeSettings, checkpoint_dir: str | Path | None = None):
    """The Starlette app serving ``model`` (on its device, in its dtype) with ``settings``."""
    from olmo_hybrid.serve.app import create_app

    template = ChatTemplate(tokenizer, settings.chat_template)
    engine = build_engine(model, tokenizer, settings, chat.end_token_ids(tokenizer, template.source, checkpoint_dir))
    served = ServedModel(settings.name, model.config.vocab_size, engine.max_context, tokenizer, template.prompt_ids,
                         max_choices=engine.max_batch + settings.max_queue)
    return create_app(engine, served, max_queue=settings.max_queue, shutdown_timeout=settings.shutdown_timeout)


def describe(app) -> str:
    engine = app.state.server.engine
    report = engine.memory_report()
    pc = engine.prefix_cache
    prefix = (f"prefix cache {format_bytes(pc.nbytes)} ({pc.num_blocks} blocks of {pc.block_size} tokens)"
              if pc is not None else "no prefix cache")
    return (f"{engine.max_batch} slots x {engine.max_context} tokens ({format_bytes(report['cache_bytes'])} of cache), "
            f"{prefix}, {engine.device} {str(engine.dtype).removeprefix('torch.')}")
