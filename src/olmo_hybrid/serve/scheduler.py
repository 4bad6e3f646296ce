"""The engine behind an asyncio server: one engine thread, continuous batching, a bounded queue, aborts, shutdown.

The engine is not thread-safe, so one thread owns it: it takes commands (submit, abort) from a queue between
steps, runs ``Engine.step()`` while there is work, and hands every step's tokens and finished requests to the
event loop in one ``call_soon_threadsafe`` call. Each request has a :class:`RequestHandle` whose asyncio queue
receives its tokens and its end.

Admission: the engine's cache holds ``max_batch`` slots of ``max_context`` tokens, sized against the device's
memory when the engine was built; a request that cannot fit a slot is refused before it is queued (HTTP 400),
and one that fits waits for a free slot. At most ``max_batch + max_queue`` requests are in flight; past that a
new request is refused at once (HTTP 429) instead of waiting without bound.

Failure: an exception inside ``Engine.step()`` ends every in-flight request with that error (their slots are
freed) and the loop keeps serving. A client that goes away aborts its request at the next step boundary.
Shutdown stops new requests, lets in-flight ones finish for up to ``timeout`` seconds, then aborts the rest.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from olmo_hybrid.model.engine import Engine, RequestOutput
from olmo_hybrid.model.sampling import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


class ShuttingDownError(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass
class GenerationRequest:
    """What the engine needs for one request, validated (see ``serve/protocol.py``)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None


@dataclass(eq=False)
class RequestHandle:
    """One request as the event loop sees it: ``events`` yields ``("token", id, engine.TokenLogprob | None)``, then one
    ``("done", RequestOutput)`` or ``("error", exception)``."""

    request: GenerationRequest
    events: asyncio.Queue
    accepted: asyncio.Future  # the engine's request id once submitted, or the exception that refused it
    submitted: float = field(default_factory=time.perf_counter)
    engine_id: int | None = None
    cancelled: bool = False
    finished: bool = False


class EngineLoop:
    """Runs ``engine`` on its own thread for an asyncio server (see the module docstring)."""

    def __init__(self, engine: Engine, max_queue: int = 256, tokens_per_s_window: float = 10.0):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine, self.max_queue = engine, max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[int, RequestHandle] = {}  # engine request id -> handle (engine thread only)
        self._in_flight: set[RequestHandle] = set()  # accepted, not yet ended (event loop only)
        self._batch: list = []  # events of the current step (engine thread only)
        self._accepting = True
        self._drain_until: float | None = None  # shutdown: finish in-flight work until then, then abort it
        self._stop = False
        # Counters for /metrics, written by the engine thread only.
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.step_errors = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._window = tokens_per_s_window

    # -- lifecycle (event loop) ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="olmo-hybrid-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to ``timeout`` seconds, abort the rest (a second
        call waits for the first)."""
        self._accepting = False
        if self._drain_until is None:
            log.info("shutting down: %d requests in flight may finish for up to %g s", len(self._in_flight), timeout)
            self._drain_until = time.monotonic() + timeout
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # -- requests (event loop) -------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request`` for the engine; raises :class:`QueueFullError` or :class:`ShuttingDownError` at once.
        Await ``handle.accepted`` for the engine's verdict."""
        if not self.accepting:
            raise ShuttingDownError("the server is shutting down" if self.alive else "the engine thread has stopped")
        limit = self.engine.max_batch + self.max_queue
        if len(self._in_flight) >= limit:
            raise QueueFullError(f"the server is at capacity: {self.engine.max_batch} running and {self.max_queue} "
                                 "queued requests; retry later")
        loop = asyncio.get_running_loop()
        handle = RequestHandle(request, asyncio.Queue(), loop.create_future())
        self._in_flight.add(handle)
        self._commands.put(("submit", handle))
        self._wake.set()
        return handle

    def release(self, handle: RequestHandle) -> None:
        """The caller is done with ``handle`` (finished, failed or gone): abort it if it still runs."""
        self._in_flight.discard(handle)
        if not handle.finished:
            handle.cancelled = True
            self._commands.put(("abort", handle))
            self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last ``tokens_per_s_window`` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if t >= now - self._window]
        return sum(n for _, n in recent) / self._window if recent else 0.0

    # -- engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            self._take_commands()
            if self._drain_until is not None and (not engine.has_work or time.monotonic() > self._drain_until):
                if engine.has_work:
                    log.info("shutdown timeout: aborting %d requests", engine.num_running + engine.num_waiting)
                self._abort_all()
                self._flush()
                return
            if not engine.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                done = engine.step()
            except Exception as e:  # a failed step must not take the server down: fail its requests instead
                log.exception("engine step failed; ending every in-flight request with the error")
                self.step_errors += 1
                self._abort_all(e)
            else:
                for out in done:
                    self._finish(out)
            self._flush()

    def _take_commands(self) -> None:
        while True:
            try:
                kind, handle = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._submit(handle)
            elif handle.engine_id is not None and handle.engine_id in self._handles:
                out = self.engine.abort(handle.engine_id)
                if out is not None:
                    self._finish(out)

    def _submit(self, handle: RequestHandle) -> None:
        if handle.cancelled:
            return
        r = handle.request
        try:
            rid = self.engine.submit(r.prompt_ids, r.max_tokens, r.sampling, stop=list(r.stop),
                                     ignore_eos=r.ignore_eos, logprobs=r.logprobs,
                                     on_token=lambda _rid, token, lp=None: self._batch.append((handle, token, lp)))
        except Exception as e:  # refused by the engine: the caller answers with the error
            self._post(_resolve, handle.accepted, None, e)
            return
        handle.engine_id = rid
        self._handles[rid] = handle
        self.prompt_tokens += len(r.prompt_ids)
        self._post(_resolve, handle.accepted, rid, None)

    def _finish(self, out: RequestOutput) -> None:
        handle = self._handles.pop(out.request_id)
        handle.finished = True
        self.finished[out.finish_reason] += 1
        self._batch.append((handle, "done", out))

    def _abort_all(self, error: Exception | None = None) -> None:
        """End every request in flight: aborted (shutdown), or failed with ``error`` (a step raised)."""
        outs = {out.request_id: out for out in self.engine.abort_all()}
        for rid, handle in list(self._handles.items()):
            del self._handles[rid]
            handle.finished = True
            out = outs.get(rid)
            if error is None and out is not None:
                self.finished[out.finish_reason] += 1
                self._batch.append((handle, "done", out))
            else:  # failed, or lost by the failed step
                self.finished["error"] += 1
                self._batch.append((handle, "error", error or RuntimeError("the request was lost by the engine")))

    def _flush(self) -> None:
        """Hand this step's events to the event loop in one call."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        tokens = sum(1 for e in batch if isinstance(e[1], int))
        if tokens:
            self.generated_tokens += tokens
            now = time.monotonic()
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - self._window:
                self._recent.popleft()
        self._post(_deliver, batch)

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed (the process is exiting): nobody is listening
            pass


def _resolve(future: asyncio.Future, value, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _deliver(batch: list) -> None:
    for handle, what, value in batch:
        if what == "done":
            handle.events.put_nowait(("done", value))
        elif what == "error":
            handle.events.put_nowait(("error", value))
        else:
            handle.events.put_nowait(("token", what, value))


__all__ = ["EngineLoop", "GenerationRequest", "QueueFullError", "RequestHandle", "ShuttingDownError"]
