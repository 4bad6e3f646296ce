"""The HTTP server: an OpenAI-compatible Starlette app over an :class:`EngineLoop`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events with
``stream=true``; a request's choices, n per prompt, run as separate engine requests), ``GET /v1/models``,
``GET /v1/models/{name}``, ``GET /health``, ``GET /metrics`` (Prometheus text). Every error is an OpenAI error
object (``{"error": {"message", "type", "param", "code"}}``): 400 for a request we cannot run, 404 for an unknown
model or route, 405 for a wrong method, 429 when the queue is full, 503 while shutting down, 500 for a bug (which
fails that request only).

A request's slot is freed as soon as its client goes away: every response watches the connection for
``http.disconnect`` while it waits for tokens, and whatever ends a request (finished, failed, disconnected,
cancelled) releases its handle, which aborts it in the engine if it still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from olmo_hybrid.model.engine import Engine, RequestOutput
from olmo_hybrid.serve import protocol
from olmo_hybrid.serve.detokenize import TextStream
from olmo_hybrid.serve.metrics import ServerMetrics
from olmo_hybrid.serve.protocol import APIError, ParsedRequest, ServedModel
from olmo_hybrid.serve.scheduler import EngineLoop, QueueFullError, RequestHandle, ShuttingDownError

log = logging.getLogger(__name__)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _disconnected(receive) -> None:
    """Returns when the client has gone away."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """Server-sent events from ``events``, stopped as soon as the client disconnects; ``on_close`` runs whatever
    ends the stream (the end of ``events``, a disconnect, a cancellation)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        self.events, self.on_close = events, on_close
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def stream():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for piece in self.events:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(_disconnected(receive))]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if task.exception() is not None and not isinstance(task.exception(), OSError):
                    raise task.exception()  # OSError: the client went away while we sent
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await self.events.aclose()
            self.on_close()


class Server:
    """Request handling for one served model (the app's routes are its methods)."""

    def __init__(self, engine: Engine, served: ServedModel, max_queue: int, shutdown_timeout: float):
        self.engine, self.served, self.shutdown_timeout = engine, served, shutdown_timeout
        self.loop = EngineLoop(engine, max_queue=max_queue)
        self.metrics = ServerMetrics(self.loop)
        self.created = int(time.time())

    # -- routes ----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if not self.loop.accepting:
            return JSONResponse({"status": "shutting down" if self.loop.alive else "engine stopped"}, 503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        protocol.check_model(request.path_params["name"], self.served)
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": self.created, "owned_by": "olmo-hybrid",
                "max_model_len": self.served.max_context}

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, protocol.parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, protocol.parse_chat)

    # -- generation ------------------------------------------------------------------------------------
    async def _generate(self, request: Request, parse) -> Response:
        arrived = time.perf_counter()
        body = await _json_body(request)
        parsed = parse(body, self.served)
        handles = await self._submit(parsed)
        rid = protocol.new_id(parsed.chat)
        release = lambda: [self.loop.release(h) for h in handles]  # noqa: E731
        if parsed.stream:
            return EventStream(self._stream(handles, parsed, rid, arrived), release)
        try:
            waiter = asyncio.ensure_future(self._collect_all(handles, arrived))
            gone = asyncio.ensure_future(_disconnected(request.receive))
            await asyncio.wait([waiter, gone], return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not waiter.done():  # the client went away: nobody to answer
                waiter.cancel()
                return Response(status_code=499)
            outs = waiter.result()
        finally:
            release()
        logprobs = [None if gen.logprobs is None else
                    protocol.logprobs_payload(out.logprobs, self.served.tokenizer, parsed.chat, gen.logprobs)
                    for gen, out in zip(parsed.generations, outs)]
        return JSONResponse(protocol.response(rid, self.served.name, parsed.chat, outs, logprobs))

    async def _submit(self, parsed: ParsedRequest) -> list[RequestHandle]:
        """Hand every choice of ``parsed`` to the engine, all or none (a refused one releases the others)."""
        handles, accepted = [], False
        try:
            for gen in parsed.generations:
                handles.append(self.loop.submit(gen))
            for handle in handles:
                await handle.accepted
            accepted = True
        except QueueFullError as e:
            raise APIError(429, str(e), code="queue_full", type="rate_limit_error") from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), code="shutting_down") from None
        except (ValueError, TypeError, MemoryError) as e:  # refused by the engine (it names the problem)
            raise APIError(400, str(e)) from None
        finally:
            if not accepted:
                for handle in handles:
                    self.loop.release(handle)
        return handles

    async def _events(self, handle: RequestHandle, arrived: float):
        """Batches of events as they arrive (all that are queued), observing the latency histograms."""
        last = None
        while True:
            events = [await handle.events.get()]
            while not handle.events.empty():
                events.append(handle.events.get_nowait())
            now = time.perf_counter()
            for event in events:
                if event[0] == "token":
                    if last is None:
                        self.metrics.time_to_first_token.observe(now - arrived)
                    else:
                        self.metrics.inter_token_latency.observe(now - last)
                    last = now
                elif event[0] == "done":
                    self.metrics.request_latency.observe(now - arrived)
                elif isinstance(event[1], Exception):
                    log.error("request failed in the engine: %r", event[1])
            yield events
            if events[-1][0] != "token":
                return

    async def _collect_all(self, handles: list[RequestHandle], arrived: float) -> list[RequestOutput]:
        return list(await asyncio.gather(*(self._collect(h, arrived) for h in handles)))

    async def _collect(self, handle: RequestHandle, arrived: float) -> RequestOutput:
        async for events in self._events(handle, arrived):
            end = events[-1]
            if end[0] == "done":
                return end[1]
            if end[0] == "error":
                raise APIError(500, f"the engine failed while running this request: {end[1]!r}")
        raise AssertionError("event stream ended without an end event")

    async def _stream(self, handles: list[RequestHandle], parsed: ParsedRequest, rid: str,
                      arrived: float) -> AsyncIterator[bytes]:
        chat, name, usage = parsed.chat, self.served.name, parsed.include_usage
        created = int(time.time())
        for index in range(len(handles) if chat else 0):
            yield _sse(protocol.chunk(rid, name, chat, created, role=True, include_usage=usage, index=index))
        ends = []
        choices = [self._choice_chunks(h, i, parsed, rid, created, arrived) for i, h in enumerate(handles)]
        async for item in _merged(choices):
            if isinstance(item, RequestOutput):
                ends.append(item)
                continue
            yield _sse(item)
            if "error" in item:
                yield _sse("[DONE]")
                return
        if usage:
            yield _sse(protocol.usage_chunk(rid, name, chat, created, ends))
        yield _sse("[DONE]")

    async def _choice_chunks(self, handle: RequestHandle, index: int, parsed: ParsedRequest, rid: str, created: int,
                             arrived: float) -> AsyncIterator[dict | RequestOutput]:
        """The chunks of one choice, then its ``RequestOutput`` (or an error body, which ends the stream)."""
        gen, chat, name = handle.request, parsed.chat, self.served.name
        usage = parsed.include_usage
        text = TextStream(self.served.tokenizer, holdback=max((len(s) for s in gen.stop), default=1) - 1)
        eos = self.engine.eos_token_ids if not gen.ignore_eos else frozenset()
        token_chars = 0  # characters of the tokens' own texts so far: what the legacy ``text_offset`` counts
        async for events in self._events(handle, arrived):
            entries, end = [], None
            for event in events:
                if event[0] == "token":
                    if event[2] is not None:
                        entries.append(event[2])
                    if event[1] not in eos:
                        text.push(event[1])
                elif event[0] == "done":
                    end = event[1]
                else:
                    yield APIError(500, f"the engine failed while running this request: {event[1]!r}").body()
                    return
            # A request's last token and its end arrive together, so text is released only when it cannot
            # belong to a stop string that ended the request.
            piece = text.finish(end.text) if end is not None else text.release()
            if piece or entries:
                logprobs = None if gen.logprobs is None else protocol.logprobs_payload(
                    entries, self.served.tokenizer, chat, gen.logprobs, token_chars)
                if logprobs is not None and not chat:
                    token_chars += sum(len(t) for t in logprobs["tokens"])
                yield protocol.chunk(rid, name, chat, created, piece, logprobs=logprobs, include_usage=usage,
                                     index=index)
            if end is not None:
                reason = protocol.FINISH_REASONS[end.finish_reason]
                yield protocol.chunk(rid, name, chat, created, finish_reason=reason, include_usage=usage, index=index)
                yield end


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator:
    """The items of ``streams`` as they come (each stream's in order)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    items: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(stream):
        try:
            async for item in stream:
                await items.put(item)
        except Exception as e:  # raised where the items are read
            await items.put(e)
        await items.put(finished)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await items.get()
            if item is finished:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


async def _api_error(request: Request, e: APIError) -> Response:
    return error_response(e)


async def _http_error(request: Request, e: HTTPException) -> Response:
    text = f"{request.method} {request.url.path}: {e.detail}"
    return error_response(APIError(e.status_code, text, code="not_found" if e.status_code == 404 else None))


async def _internal_error(request: Request, e: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(APIError(500, f"internal server error: {e!r}"))


def create_app(engine: Engine, served: ServedModel, max_queue: int = 256, shutdown_timeout: float = 30.0) -> Starlette:
    """The app for ``engine`` (which it owns from now on: its loop runs the engine on a thread while the app
    is up, and stops it at shutdown after letting in-flight requests finish for up to ``shutdown_timeout`` s)."""
    server = Server(engine, served, max_queue, shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        try:
            yield
        finally:
            await server.loop.shutdown(shutdown_timeout)

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_route, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{name:path}", server.model, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.server = server
    app.state.drain = lambda: server.loop.shutdown(shutdown_timeout)
    return app
