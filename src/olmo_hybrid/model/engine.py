"""Generation engine for ``HybridLM``: a static slot cache, chunked prefill, batched decode, continuous batching.

    engine = Engine(model, max_batch=8, max_context=4096, device="cuda", dtype=torch.bfloat16)
    outs = engine.generate([ids_a, ids_b], max_new_tokens=128, sampling=SamplingParams(temperature=0.7, seed=1))

or, for a server loop: ``rid = engine.submit(ids, 128, stop=["\\n\\n"])`` at any time, and ``engine.step()``
(one scheduling round; returns the requests that finished in it) until ``engine.has_work`` is False.

Each step prefills waiting requests into free slots (in chunks; finishing a prompt samples its first token),
then runs one decode step for every running sequence. By default every waiting request that has a free slot
is prefilled completely first (best throughput); ``prefill_budget`` caps the prompt tokens per step instead,
so a long prompt delays running sequences by at most that much per token (best latency). A sequence leaves
when it reaches EOS, a stop token or string, or ``max_new_tokens``; its slot is reused by the next waiting
request in the same step.
The cache is allocated once, sized ``max_batch x max_context``; a request that cannot fit a slot is refused
at ``submit`` and an engine whose cache does not fit the memory budget is refused at construction.

Prefill and decode are ``HybridLM.forward`` calls on rows of the cache (``cache.for_prefill`` /
``cache.for_decode``). A decode step covers the rows ``[0, n)`` up to the highest running slot; rows of free
or still-prefilling slots inside it are inactive, so their GDN states and lengths stay untouched. Per step the
engine reads the sampled tokens back once (``tokens.tolist()``, to stream them and check stop conditions);
nothing in the model's forward reads device memory on the host.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from olmo_hybrid.model.cache import HybridCache
from olmo_hybrid.model.hybrid import HybridLM
from olmo_hybrid.model.memory import (MemoryBudgetError, check_pool_fits, describe_sequence_bytes, element_size,
                                      format_bytes, sequence_bytes)
from olmo_hybrid.model.sampling import SamplingParams, sample


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, including the EOS / stop token that ended the request
    finish_reason: str  # "length" | "eos" | "stop" | "aborted"
    text: str | None = None  # decoded new tokens (without EOS, cut before a stop string); None without tokenizer
    stop: str | int | None = None  # the stop string or stop token that matched
    first_token_s: float | None = None  # from submit to the first new token (None if aborted before it)
    total_s: float = 0.0  # from submit to the end


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_strings: tuple[str, ...]
    stop_tokens: frozenset[int]
    on_token: Callable[[int, int], None] | None
    submitted: float
    first_token: float | None = None
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens produced by decode steps (the first token of each request comes from prefill)
    decode_seconds: float = 0.0
    max_running: int = 0


class Engine:
    """Continuous-batching generation for a ``HybridLM`` (moved to ``device`` and ``dtype`` in place).

    max_batch: cache slots (sequences decoded together). max_context: tokens per slot (prompt + new tokens).
    memory_budget: bytes the cache may take (None: no budget; on CUDA free memory is always checked).
    tokenizer: an object with ``decode(list[int]) -> str``, needed for stop strings and ``RequestOutput.text``.
    eos_token_id: int or ints that end a request (default: the tokenizer's ``eos_token_id`` if any).
    prefill_chunk: prompt tokens per forward call during prefill. prefill_budget: prompt tokens prefilled per
    step (None: all that fit). cuda_graphs: capture the decode step (CUDA only).
    """

    def __init__(self, model: HybridLM, max_batch: int, max_context: int, device=None, dtype: torch.dtype | None = None,
                 *, memory_budget: int | None = None, tokenizer=None, eos_token_id: int | Iterable[int] | None = None,
                 prefill_chunk: int = 4096, prefill_budget: int | None = None, cuda_graphs: bool = False):
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" and "cuda:0" must compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype or param.dtype
        cfg = model.config
        for name, value in (("max_batch", max_batch), ("max_context", max_context), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine: {name} must be a positive integer, got {value!r}")
        if prefill_budget is not None and (not isinstance(prefill_budget, int) or prefill_budget < 1):
            raise ValueError(f"Engine: prefill_budget must be a positive integer or None, got {prefill_budget!r}")
        if cfg.n_attn_layers and max_context > cfg.max_seq_len:
            raise ValueError(f"Engine: max_context={max_context} exceeds the model's max_seq_len={cfg.max_seq_len}")
        weights = sum(p.numel() for p in model.parameters()) * element_size(self.dtype)
        moving = weights if param.device != self.device else 0  # weights that will land on the device
        self.per_sequence = check_pool_fits(cfg, max_batch, max_context, self.dtype, memory_budget, self.device,
                                            prefill_chunk, reserved_bytes=moving)
        self.weight_bytes = weights
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.config, self.max_batch, self.max_context = cfg, max_batch, max_context
        self.memory_budget, self.tokenizer, self.prefill_chunk = memory_budget, tokenizer, prefill_chunk
        self.prefill_budget = prefill_budget
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or ())
        self.cache = HybridCache(cfg, max_batch, max_context, self.device, self.dtype)
        # Per-slot device state of the decode batch (positions are the cache's lengths); free slots are inactive.
        z = dict(device=self.device)
        self._tokens = torch.zeros(max_batch, dtype=torch.long, **z)
        self._active = torch.zeros(max_batch, dtype=torch.bool, **z)
        self._counter = torch.zeros(max_batch, dtype=torch.long, **z)
        self._temperature = torch.zeros(max_batch, **z)
        self._top_k = torch.zeros(max_batch, dtype=torch.long, **z)
        self._top_p = torch.ones(max_batch, **z)
        self._seed = torch.zeros(max_batch, dtype=torch.long, **z)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._prefilling: collections.deque[_Request] = collections.deque()  # holding a slot, prompt not done
        self._running: dict[int, _Request] = {}
        self._next_id = 0
        self.stats = EngineStats()
        self._graphs = None
        if cuda_graphs and self.device.type == "cuda":
            from olmo_hybrid.model.cuda_graphs import DecodeGraphs

            self._graphs = DecodeGraphs(self._decode, max_batch, cfg.vocab_size, self.device)

    # -- public API ----------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Cache bytes per sequence (at ``max_context``), for the whole pool, and the budget."""
        return {"per_sequence": dict(self.per_sequence), "slots": self.max_batch, "max_context": self.max_context,
                "cache_bytes": self.cache.nbytes(), "budget_bytes": self.memory_budget,
                "weight_bytes": self.weight_bytes}

    def submit(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
               sampling: SamplingParams | None = None, stop: Sequence[str] | str | None = None,
               stop_token_ids: Iterable[int] = (), ignore_eos: bool = False,
               on_token: Callable[[int, int], None] | None = None) -> int:
        """Queue a request; returns its id. Raises before queuing if it cannot run (see :meth:`check_request`).

        ``on_token(request_id, token_id)`` is called for every new token as soon as it is known (streaming).
        """
        prompt = self._check_prompt(prompt_ids)
        self.check_request(len(prompt), max_new_tokens)
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if sampling.seed is None and not sampling.greedy:
            sampling = dataclasses.replace(sampling, seed=int(torch.randint(0, 2**62, ()).item()))
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be non-empty strings, got {stops!r}")
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass Engine(..., tokenizer=...)")
        stop_tokens = frozenset(int(t) for t in stop_token_ids) | (frozenset() if ignore_eos else self.eos_token_ids)
        req = _Request(self._next_id, prompt, max_new_tokens, sampling, stops, stop_tokens, on_token,
                       time.perf_counter())
        self._next_id += 1
        self._waiting.append(req)
        return req.id

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ``MemoryBudgetError`` (naming the numbers) if a request cannot fit one cache slot."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        need = prompt_len + max_new_tokens
        if need > self.max_context:
            raise MemoryBudgetError(
                f"request needs {need} tokens of cache (prompt {prompt_len} + max_new_tokens {max_new_tokens}) = "
                f"{describe_sequence_bytes(sequence_bytes(self.config, need, self.dtype))}, but each of the "
                f"{self.max_batch} slots of this engine holds max_context={self.max_context} tokens = "
                f"{format_bytes(self.per_sequence['total'])}")

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def step(self) -> list[RequestOutput]:
        """Prefill waiting requests into free slots (within ``prefill_budget``), then decode one token for every
        running one."""
        done = self._prefill_step()
        if self._running:
            done += self._decode_step()
        return done

    def run_until_done(self) -> Iterator[RequestOutput]:
        """Step until no request is waiting or running, yielding each request as it finishes."""
        while self.has_work:
            yield from self.step()

    def generate(self, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int,
                 sampling: SamplingParams | None = None, stop: Sequence[str] | str | None = None,
                 ignore_eos: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` to completion on an idle engine; outputs in the order of ``prompts``."""
        if self.has_work:
            busy = len(self._waiting) + len(self._prefilling) + len(self._running)
            raise RuntimeError(f"Engine.generate needs an idle engine (it would swallow the outputs of the {busy} "
                               "queued or running requests); use submit() and step() instead")
        ids = []
        try:
            for p in prompts:
                ids.append(self.submit(p, max_new_tokens, sampling, stop, ignore_eos=ignore_eos))
        except Exception:
            for i in ids:  # all or nothing: leave the engine idle
                self.abort(i)
            raise
        got = {out.request_id: out for out in self.run_until_done()}
        return [got[i] for i in ids]

    def abort(self, request_id: int) -> RequestOutput | None:
        """Drop a waiting or running request (freeing its slot); None if it is not known (or already finished)."""
        for req in self._waiting:
            if req.id == request_id:
                self._waiting.remove(req)
                return self._output(req, "aborted")
        for req in self._prefilling:
            if req.id == request_id:
                self._prefilling.remove(req)
                self.cache.release(req.slot)
                return self._output(req, "aborted")
        for slot, req in self._running.items():
            if req.id == request_id:
                self._free(slot)
                return self._output(req, "aborted")
        return None

    # -- scheduling ----------------------------------------------------------------------------------
    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.is_floating_point():
                raise ValueError(f"prompt_ids must be a 1-D integer tensor, got {prompt_ids.dtype} "
                                 f"{list(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: a request needs at least one prompt token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids has token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
        return prompt

    def _prefill_step(self) -> list[RequestOutput]:
        """Prefill prompts, oldest first, within the budget; a finished prompt samples its first token."""
        budget = self.prefill_budget
        done = []
        while budget is None or budget > 0:
            if not self._prefilling:
                if not (self._waiting and self.cache.num_free):
                    break
                self._start(self._waiting.popleft())
            req = self._prefilling[0]
            left = len(req.prompt) - req.prefilled
            take = left if budget is None else min(budget, left)
            t0 = time.perf_counter()
            ids = torch.tensor(req.prompt[req.prefilled:req.prefilled + take], dtype=torch.long, device=self.device)
            logits = self._prefill(req.slot, ids, req.prefilled)
            req.prefilled += take
            budget = None if budget is None else budget - take
            if req.prefilled < len(req.prompt):
                self.stats.prefill_seconds += time.perf_counter() - t0
                continue
            self._prefilling.popleft()
            out = self._first_token(req, logits)  # the host sync in it makes the timing real
            self.stats.prefill_seconds += time.perf_counter() - t0
            if out:
                done.append(out)
        return done

    def _start(self, req: _Request) -> None:
        slot = req.slot = self.cache.allocate()
        s = req.sampling
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = s.temperature, s.top_k, s.top_p
        self._seed[slot], self._counter[slot] = s.seed or 0, 0
        self._prefilling.append(req)
        self.stats.prefill_tokens += len(req.prompt)

    def _first_token(self, req: _Request, logits: torch.Tensor) -> RequestOutput | None:
        slot, rows = req.slot, slice(req.slot, req.slot + 1)
        token = sample(logits[None], self._temperature[rows], self._top_k[rows], self._top_p[rows], self._seed[rows],
                       self._counter[rows], all_greedy=req.sampling.greedy)
        self._tokens[slot] = token[0]
        self._active[slot], self._counter[slot] = True, 1
        self._running[slot] = req
        self.stats.max_running = max(self.stats.max_running, len(self._running))
        return self._append(slot, int(token[0]))

    @torch.no_grad()
    def _prefill(self, slot: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Append ``ids`` [T] to ``slot`` from position ``start``, ``prefill_chunk`` tokens per forward call (later
        chunks attend to earlier ones through the cache); the last token's logits [V] in fp32."""
        rows = slice(slot, slot + 1)
        for s in range(0, ids.shape[0], self.prefill_chunk):
            piece = ids[None, s:s + self.prefill_chunk]
            logits = self.model(piece, cache=self.cache.for_prefill(rows, start + s), logits_to_keep=1)
        return logits[0, -1].float()

    @torch.no_grad()
    def _decode(self, rows: int) -> torch.Tensor:
        """One decode step for slots ``[0, rows)``: the tokens in ``_tokens``, the active rows in ``_active``;
        logits [rows, V] fp32. Reads and writes only device tensors, so a CUDA graph can capture it."""
        tokens = self._tokens[:rows, None]
        return self.model(tokens, cache=self.cache.for_decode(slice(0, rows), self._active[:rows]))[:, 0].float()

    def _decode_step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        n = max(self._running) + 1
        logits = self._graphs.decode(n) if self._graphs is not None else self._decode(n)
        greedy = all(r.sampling.greedy for r in self._running.values())
        tokens = sample(logits, self._temperature[:n], self._top_k[:n], self._top_p[:n], self._seed[:n],
                        self._counter[:n], all_greedy=greedy)
        self._tokens[:n] = tokens
        self._counter[:n] += self._active[:n]
        host = tokens.tolist()  # the step's one read of device memory
        self.stats.decode_tokens += len(self._running)
        done = []
        for slot in list(self._running):
            out = self._append(slot, host[slot])
            if out:
                done.append(out)
        self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - t0
        return done

    def _append(self, slot: int, token: int) -> RequestOutput | None:
        """Record a new token of the request in ``slot``; finish it (freeing the slot) if it is done."""
        req = self._running[slot]
        req.generated.append(token)
        if req.first_token is None:
            req.first_token = time.perf_counter()
        if req.on_token is not None:
            req.on_token(req.id, token)
        reason, stop = None, None
        if token in req.stop_tokens:
            reason, stop = ("eos" if token in self.eos_token_ids else "stop"), token
        elif req.stop_strings and (stop := self._find_stop(req)) is not None:
            reason = "stop"
        elif len(req.generated) >= req.max_new_tokens:
            reason = "length"
        if reason is None:
            return None
        self._free(slot)
        return self._output(req, reason, stop)

    def _find_stop(self, req: _Request) -> str | None:
        # A stop string completed by this token lies within the last len(stop) characters, hence within the
        # last len(stop) tokens (a few more for tokens that decode to partial characters).
        window = max(len(s) for s in req.stop_strings) + 8
        text = self.tokenizer.decode(req.generated[-window:])
        return next((s for s in req.stop_strings if s in text), None)

    def _free(self, slot: int) -> None:
        del self._running[slot]
        self.cache.release(slot)
        self._active[slot], self._counter[slot] = False, 0

    def _output(self, req: _Request, reason: str, stop: str | int | None = None) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            ids = req.generated[:-1] if reason == "eos" else req.generated
            text = self.tokenizer.decode(ids)
            if isinstance(stop, str):
                text = text[:text.find(stop)] if stop in text else text
        first = None if req.first_token is None else req.first_token - req.submitted
        return RequestOutput(req.id, list(req.prompt), list(req.generated), reason, text, stop, first,
                             time.perf_counter() - req.submitted)
