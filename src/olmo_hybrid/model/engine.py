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
With ``prefix_cache_bytes`` the engine also keeps snapshots of prompt prefixes (``model/prefix_cache.py``): a
prompt that starts with a cached prefix restores it into its slot and prefills only the rest.

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
from olmo_hybrid.model.prefix_cache import PrefixBlock, PrefixCache
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
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of prefilled
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, if the request asked for them


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token under the model (log-softmax of the raw logits, before
    temperature, top-k or top-p), and the ``top`` most likely tokens at that position as (token, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_strings: tuple[str, ...]
    stop_tokens: frozenset[int]
    on_token: Callable[..., None] | None
    submitted: float
    logprobs: int | None = None  # None: none; k >= 0: the token's logprob and the top k
    first_token: float | None = None
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of which restored from the prefix cache
    prefix_node: PrefixBlock | None = None  # the stored block at the last boundary reached
    storing: bool = True  # False once the chain of stored blocks broke (its parent evicted)
    generated: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)


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
    step (None: all that fit). cuda_graphs: capture the decode step (CUDA only). prefix_cache_bytes: device
    memory for prefix snapshots (0: no prefix cache), in blocks of ``prefix_block`` tokens; with a prefix cache,
    prefill pieces also end on block boundaries. compile_decode: a ``torch.compile`` backend for the decode step
    ("inductor" fuses the per-layer elementwise glue that otherwise runs as hundreds of small kernels per step;
    None: eager); compiled steps run on row buckets as the CUDA graphs do, one compilation per bucket.
    """

    def __init__(self, model: HybridLM, max_batch: int, max_context: int, device=None, dtype: torch.dtype | None = None,
                 *, memory_budget: int | None = None, tokenizer=None, eos_token_id: int | Iterable[int] | None = None,
                 prefill_chunk: int = 4096, prefill_budget: int | None = None, cuda_graphs: bool = False,
                 prefix_cache_bytes: int = 0, prefix_block: int = 256, compile_decode: str | None = None):
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
        if not isinstance(prefix_cache_bytes, int) or prefix_cache_bytes < 0:
            raise ValueError(f"Engine: prefix_cache_bytes must be an integer >= 0, got {prefix_cache_bytes!r}")
        if cfg.n_attn_layers and max_context > cfg.max_seq_len:
            raise ValueError(f"Engine: max_context={max_context} exceeds the model's max_seq_len={cfg.max_seq_len}")
        weights = sum(p.numel() for p in model.parameters()) * element_size(self.dtype)
        moving = weights if param.device != self.device else 0  # weights that will land on the device
        self.per_sequence = check_pool_fits(cfg, max_batch, max_context, self.dtype, memory_budget, self.device,
                                            prefill_chunk, reserved_bytes=moving + prefix_cache_bytes)
        self.weight_bytes = weights
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.config, self.max_batch, self.max_context = cfg, max_batch, max_context
        self.memory_budget, self.tokenizer, self.prefill_chunk = memory_budget, tokenizer, prefill_chunk
        self.prefill_budget = prefill_budget
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or ())
        self.cache = HybridCache(cfg, max_batch, max_context, self.device, self.dtype)
        self.prefix_cache = PrefixCache(self.cache, prefix_block, prefix_cache_bytes) if prefix_cache_bytes else None
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
        self._decode_fn, self._buckets = self._decode, None
        if compile_decode is not None:
            from olmo_hybrid.model.cuda_graphs import row_buckets

            self._decode_fn, self._buckets = _compiled(self._decode, compile_decode, row_buckets(max_batch))
        if cuda_graphs and self.device.type == "cuda":
            from olmo_hybrid.model.cuda_graphs import DecodeGraphs

            self._graphs = DecodeGraphs(self._decode_fn, max_batch, cfg.vocab_size, self.device)

    # -- public API ----------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Cache bytes per sequence (at ``max_context``), for the whole pool, and the budget."""
        return {"per_sequence": dict(self.per_sequence), "slots": self.max_batch, "max_context": self.max_context,
                "cache_bytes": self.cache.nbytes(), "budget_bytes": self.memory_budget,
                "weight_bytes": self.weight_bytes,
                "prefix_cache_bytes": self.prefix_cache.nbytes if self.prefix_cache is not None else 0}

    @property
    def num_waiting(self) -> int:
        """Requests queued for a free slot."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._prefilling) + len(self._running)

    def submit(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
               sampling: SamplingParams | None = None, stop: Sequence[str] | str | None = None,
               stop_token_ids: Iterable[int] = (), ignore_eos: bool = False,
               on_token: Callable[..., None] | None = None, logprobs: int | None = None) -> int:
        """Queue a request; returns its id. Raises before queuing if it cannot run (see :meth:`check_request`).

        ``on_token(request_id, token_id)`` is called for every new token as soon as it is known (streaming).
        ``logprobs=k`` (0 <= k <= 20) records each token's :class:`TokenLogprob` with the k most likely tokens in
        ``RequestOutput.logprobs``, and passes it to ``on_token`` as a third argument.
        """
        prompt = self._check_prompt(prompt_ids)
        self.check_request(len(prompt), max_new_tokens)
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
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
                       time.perf_counter(), logprobs)
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

    def abort_all(self) -> list[RequestOutput]:
        """Drop every waiting and running request and free every slot (also one that a step which raised half-way
        left without its request)."""
        outs = [self.abort(r.id) for r in [*self._waiting, *self._prefilling, *self._running.values()]]
        self.cache.release_all()
        self._active.zero_()
        self._counter.zero_()
        return outs

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
            logits = self._prefill(req, take)
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
        if self.prefix_cache is not None:
            node = self.prefix_cache.lookup(req.prompt)
            if node is not None:
                req.prefilled = req.cached = self.prefix_cache.restore(slot, node)
                req.prefix_node = node
        self._prefilling.append(req)
        self.stats.prefill_tokens += len(req.prompt) - req.cached

    def _first_token(self, req: _Request, logits: torch.Tensor) -> RequestOutput | None:
        slot, rows = req.slot, slice(req.slot, req.slot + 1)
        token = sample(logits[None], self._temperature[rows], self._top_k[rows], self._top_p[rows], self._seed[rows],
                       self._counter[rows], all_greedy=req.sampling.greedy)
        self._tokens[slot] = token[0]
        self._active[slot], self._counter[slot] = True, 1
        self._running[slot] = req
        self.stats.max_running = max(self.stats.max_running, len(self._running))
        if req.logprobs is None:
            return self._append(slot, int(token[0]))
        (entry,) = _read_logprobs(logits[None], token, req.logprobs)
        return self._append(slot, entry.token, entry)

    @torch.no_grad()
    def _prefill(self, req: _Request, take: int) -> torch.Tensor:
        """Append prompt tokens ``[prefilled, prefilled + take)`` to the request's slot, ``prefill_chunk`` tokens per
        forward call (later pieces attend to earlier ones through the cache); with a prefix cache, pieces also end
        on its block boundaries, and each boundary is stored as a block. The last token's logits [V] in fp32."""
        rows, start, end = slice(req.slot, req.slot + 1), req.prefilled, req.prefilled + take
        ids = torch.tensor(req.prompt[start:end], dtype=torch.long, device=self.device)
        block = self.prefix_cache.block_size if self.prefix_cache is not None else None
        pos = start
        while pos < end:
            stop = min(end, pos + self.prefill_chunk)
            if block is not None:
                stop = min(stop, (pos // block + 1) * block)
            logits = self.model(ids[None, pos - start:stop - start], cache=self.cache.for_prefill(rows, pos),
                                logits_to_keep=1)
            if block is not None and stop % block == 0 and req.storing:
                req.prefix_node = self.prefix_cache.store(req.slot, req.prefix_node, req.prompt[stop - block:stop],
                                                          stop)
                req.storing = req.prefix_node is not None
            pos = stop
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
        if self._graphs is not None:
            logits = self._graphs.decode(n)
        elif self._buckets is not None:  # rows past the running ones are inactive: their states do not change
            logits = self._decode_fn(next(b for b in self._buckets if b >= n))[:n]
        else:
            logits = self._decode(n)
        greedy = all(r.sampling.greedy for r in self._running.values())
        tokens = sample(logits, self._temperature[:n], self._top_k[:n], self._top_p[:n], self._seed[:n],
                        self._counter[:n], all_greedy=greedy)
        self._tokens[:n] = tokens
        self._counter[:n] += self._active[:n]
        top = max((r.logprobs for r in self._running.values() if r.logprobs is not None), default=None)
        # The step's one read of device memory.
        host = tokens.tolist() if top is None else _read_logprobs(logits, tokens, top)
        self.stats.decode_tokens += len(self._running)
        done = []
        for slot, req in list(self._running.items()):
            if top is None:
                out = self._append(slot, host[slot])
            else:
                entry = host[slot]
                out = self._append(slot, entry.token, dataclasses.replace(entry, top=entry.top[:req.logprobs])
                                   if req.logprobs is not None else None)
            if out:
                done.append(out)
        self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - t0
        return done

    def _append(self, slot: int, token: int, logprob: TokenLogprob | None = None) -> RequestOutput | None:
        """Record a new token of the request in ``slot``; finish it (freeing the slot) if it is done."""
        req = self._running[slot]
        req.generated.append(token)
        if logprob is not None:
            req.token_logprobs.append(logprob)
        if req.first_token is None:
            req.first_token = time.perf_counter()
        if req.on_token is not None:
            if logprob is None:
                req.on_token(req.id, token)
            else:
                req.on_token(req.id, token, logprob)
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
        # Of several stop strings this token completed, the text ends before the one that starts first.
        window = max(len(s) for s in req.stop_strings) + 8
        text = self.tokenizer.decode(req.generated[-window:])
        found = [(text.find(s), i) for i, s in enumerate(req.stop_strings) if s in text]
        return req.stop_strings[min(found)[1]] if found else None

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
                             time.perf_counter() - req.submitted, req.cached,
                             list(req.token_logprobs) if req.logprobs is not None else None)


def _compiled(step: Callable[[int], torch.Tensor], backend: str, buckets: list[int]):
    """``step`` compiled with ``backend`` (one graph per row bucket), and the buckets."""
    import torch._dynamo

    # One compilation per bucket: past dynamo's recompile limit it would silently run the step eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(buckets) + 2)
    return torch.compile(step, backend=backend, dynamic=False), buckets


def _read_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Per row of ``logits`` [B, V]: the logprob of ``tokens`` [B] and the ``top`` most likely tokens, read to the
    host in one transfer."""
    logp = logits.float().log_softmax(dim=-1)
    parts = [tokens.double()[:, None], logp.gather(1, tokens[:, None]).double()]
    if top:
        best = logp.topk(top, dim=-1)
        parts += [best.values.double(), best.indices.double()]
    rows = torch.cat(parts, dim=1).tolist()
    return [TokenLogprob(int(r[0]), r[1], tuple(zip(map(int, r[2 + top:]), r[2:2 + top]))) for r in rows]
