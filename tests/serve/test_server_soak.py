"""Soak: 1,000 requests with random parameters, random disconnects and some bad requests against one server;
afterwards no slot, queue entry, request object or prefix-cache block is left over, and the server still answers."""

import asyncio
import gc
import json
import random
import time

import pytest

pytest.importorskip("uvicorn")

import httpx  # noqa: E402
from serve_util import MODEL_NAME, idle, running_server, wait_until  # noqa: E402

from olmo_hybrid.model.engine import _Request  # noqa: E402
from olmo_hybrid.serve.scheduler import RequestHandle  # noqa: E402

REQUESTS = 1000
CONCURRENCY = 24
TIME_LIMIT_S = 120.0  # a bound, not the expected time (about 20 s on 2 busy cores)
STEMS = ["the cat sat on the mat, the dog sat on the log", "A cat is not a dog, ", "the dog"]


def random_request(rng: random.Random) -> tuple[str, dict, str]:
    """(path, body, what the client does: "read", "disconnect" or "bad")."""
    chat = rng.random() < 0.2
    body = {"model": MODEL_NAME, "max_tokens": rng.randint(1, 4), "stream": rng.random() < 0.5,
            "temperature": rng.choice([0, 0, rng.uniform(0.1, 1.5)]), "seed": rng.randint(0, 1000)}
    if rng.random() < 0.3:
        body["top_p"] = rng.uniform(0.5, 1.0)
    if rng.random() < 0.3:
        body["top_k"] = rng.choice([0, -1, 5])
    if rng.random() < 0.2:
        body["stop"] = rng.choice([" ", "at", ["o", "e"]])
    if rng.random() < 0.1:
        body["logprobs"] = True if chat else rng.randint(0, 3)
    if rng.random() < 0.1:
        body["n"] = 2  # the queue holds two choices per client
    if body["stream"] and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    text = rng.choice(STEMS) + rng.choice(["", "the cat", "a dog", "on the log", "mat"])
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    what = "disconnect" if rng.random() < 0.15 else "read"
    if rng.random() < 0.05:
        field, values = rng.choice([("max_tokens", [-1, 0]), ("n", [0, 100]), ("temperature", [-1, float("inf")])])
        body[field] = rng.choice(values)
        what = "bad"
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, what


async def one(client: httpx.AsyncClient, url: str, path: str, body: dict, what: str, rng: random.Random) -> str:
    data = json.dumps(body).replace("Infinity", "1e999")  # JSON has no infinity: a float that overflows
    headers = {"Content-Type": "application/json"}
    if what == "disconnect" and not body["stream"]:
        try:
            await client.post(url + path, content=data, headers=headers, timeout=rng.uniform(0.0005, 0.02))
        except httpx.TimeoutException:
            return "disconnected"
        return "finished before the timeout"
    async with client.stream("POST", url + path, content=data, headers=headers) as r:
        if what == "bad":
            await r.aread()
            assert r.status_code == 400 and "error" in json.loads(r.content), r.content
            return "rejected"
        assert r.status_code == 200, await r.aread()
        if what == "disconnect":
            async for _ in r.aiter_lines():
                break
            return "disconnected"
        if body["stream"]:
            lines = [line async for line in r.aiter_lines() if line]
            assert lines[-1] == "data: [DONE]"
        else:
            await r.aread()
            assert json.loads(r.content)["choices"][0]["finish_reason"] in ("stop", "length")
        return "read"


def test_soak_random_requests_and_disconnects_leak_nothing(served_checkpoint):
    rng = random.Random(0)
    with running_server(served_checkpoint, max_batch=8, max_queue=2 * CONCURRENCY, prefix_cache_bytes=2**17,
                        prefix_block=16) as (url, srv):
        async def main():
            sem = asyncio.Semaphore(CONCURRENCY)
            deadline = time.monotonic() + TIME_LIMIT_S
            async with httpx.AsyncClient(trust_env=False, timeout=30,
                                         limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
                async def guarded(spec):
                    async with sem:
                        assert time.monotonic() < deadline, "soak test over its time limit"
                        return await one(client, url, *spec, rng)

                return await asyncio.gather(*(guarded(random_request(rng)) for _ in range(REQUESTS)))

        outcomes = asyncio.run(main())
        assert len(outcomes) == REQUESTS
        assert outcomes.count("disconnected") > 50 and outcomes.count("rejected") > 10
        wait_until(lambda: idle(srv), timeout=5.0, what="idle server after the soak")
        pc = srv.engine.prefix_cache
        pc.check()
        assert pc.stats.hit_tokens > 0 and pc.stats.evicted_blocks > 0
        gc.collect()
        assert not [o for o in gc.get_objects() if type(o) in (RequestHandle, _Request)]
        assert srv.loop.finished["aborted"] > 0 and srv.loop.step_errors == 0
        r = httpx.post(url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 2}, trust_env=False)
        assert r.status_code == 200 and idle(srv)
