"""The HTTP server with the real openai client on 127.0.0.1: completions and chat, streamed and not, equal to
``olmo-hybrid generate``; logprobs, usage, prefix hits; bad requests; disconnects; a failing step; 429; shutdown."""

import json

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402
import openai  # noqa: E402
from serve_util import (MODEL_NAME, PROMPT, error_of, greedy_by_full_forwards, idle, openai_client,  # noqa: E402
                        running_server, slow_steps, streamed_text, wait_until)

from olmo_hybrid.checkpoint import load_model_and_tokenizer  # noqa: E402
from olmo_hybrid.cli import main  # noqa: E402


def test_greedy_completion_equals_generate_cli_streamed_or_not(server, served_checkpoint, capsys):
    url, srv = server
    client = openai_client(url)
    assert main(["generate", str(served_checkpoint), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens",
                 "24", "--device", "cpu"]) == 0
    want = capsys.readouterr().out[len(PROMPT):-1]
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == want and len(want) > 5
    text, chunks = streamed_text(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24,
                                                           temperature=0, stream=True))
    assert text == want and len(chunks) > 2
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason
    assert got.usage.prompt_tokens == len(srv.served.tokenizer.encode(PROMPT))
    assert got.usage.completion_tokens <= 24 and got.usage.total_tokens == got.usage.prompt_tokens + \
        got.usage.completion_tokens


def test_chat_streamed_equals_non_streamed_with_seeds_and_stops(server):
    url, _ = server
    client = openai_client(url)
    messages = [{"role": "system", "content": "You are a cat."}, {"role": "user", "content": "Where did you sit?"}]
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3, "top_p": 0.9},
               {"temperature": 0.8, "seed": 4, "extra_body": {"top_k": 5}}):
        full = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, **kw)
        text = full.choices[0].message.content
        assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
        streamed, chunks = streamed_text(client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=20, stream=True,
            stream_options={"include_usage": True}, **kw), chat=True)
        assert streamed == text
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        assert all(c.usage is None for c in chunks[:-1])
        if len(text) > 6:  # a stop string inside the text: cut before it, streamed the same
            stop = text[3:6]
            cut = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, stop=stop, **kw)
            assert cut.choices[0].message.content == text[:text.find(stop)]
            assert cut.choices[0].finish_reason == "stop"
            streamed, _ = streamed_text(client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=20, stop=[stop], stream=True, **kw), chat=True)
            assert streamed == cut.choices[0].message.content


def test_logprobs_are_the_models_log_softmax(server, served_checkpoint):
    url, _ = server
    model, tok = load_model_and_tokenizer(served_checkpoint)
    out = openai_client(url).completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                                logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    prompt = tok.encode(PROMPT)
    ids = greedy_by_full_forwards(model, torch.tensor(prompt), 6)
    assert lp.tokens == [tok.decode([i]) for i in ids]
    with torch.no_grad():
        ref = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1:-1].log_softmax(-1)
    assert lp.token_logprobs == pytest.approx([ref[j, t].item() for j, t in enumerate(ids)], abs=1e-4)
    for j in range(6):
        top = ref[j].topk(3)  # the legacy format is a dict by token text: tokens that decode alike collide
        want = {tok.decode([i]): v for i, v in zip(top.indices.tolist(), top.values.tolist())}
        assert list(lp.top_logprobs[j]) == list(want)
        assert list(lp.top_logprobs[j].values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(6)]


def test_shared_prefix_is_served_from_the_cache(server):
    url, srv = server
    client = openai_client(url)
    system = "A cat is not a dog. " * 4
    first = client.completions.create(model=MODEL_NAME, prompt=system + "the cat", max_tokens=4, temperature=0)
    second = client.completions.create(model=MODEL_NAME, prompt=system + "the dog", max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    ids = [srv.served.tokenizer.encode(system + q) for q in ("the cat", "the dog")]
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert second.usage.prompt_tokens_details.cached_tokens == shared // 8 * 8 > 0
    metrics = httpx.get(url + "/metrics", trust_env=False).text
    assert "olmo_hybrid_prefix_cache_hit_tokens_total" in metrics


def test_models_health_and_metrics(server):
    url, _ = server
    client = openai_client(url)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(url + "/health", trust_env=False).json() == {"status": "ok"}
    metrics = httpx.get(url + "/metrics", trust_env=False).text
    for name in ("queue_length", "running_sequences", "generation_tokens_per_second", "prefix_cache_hit_rate",
                 "memory_bytes", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket"):
        assert f"olmo_hybrid_{name}" in metrics, name


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, srv = server
    client = openai_client(url)
    post = lambda body, path="/v1/completions": httpx.post(url + path, content=body, trust_env=False,  # noqa: E731
                                                           headers={"Content-Type": "application/json"})
    r = post(b'{"prompt": "the cat", "max_tokens": ')
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = post(b'{"prompt": "the cat", "temperature": NaN}')
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = post(b'[1, 2]')
    assert r.status_code == 400 and "JSON object" in error_of(r)["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=3)
    assert e.value.body["code"] == "model_not_found"
    cases = [
        (dict(prompt=PROMPT, max_tokens=-1), "max_tokens"),
        (dict(prompt=PROMPT, max_tokens=3, n=0), "n"),
        (dict(prompt="the cat " * 200, max_tokens=3), "prompt"),
        (dict(prompt=PROMPT, max_tokens=158), "max_tokens"),
        (dict(prompt=PROMPT, max_tokens=3, top_p=0), "top_p"),
        (dict(prompt=PROMPT, max_tokens=3, temperature=-1), "temperature"),
        (dict(prompt=PROMPT, max_tokens=3, presence_penalty=0.5), "presence_penalty"),
        (dict(prompt=[1, 2, 10**6], max_tokens=3), "prompt"),
        (dict(prompt=PROMPT, max_tokens=3, extra_body={"frobnicate": 1}), "frobnicate"),
        (dict(prompt=PROMPT, max_tokens=3, stream_options={"include_usage": True}), "stream_options"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL_NAME, **kw)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error", kw
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_NAME, prompt="the cat " * 200, max_tokens=3)
    for body, param in (({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                         "messages[0].role")):
        r = post(json.dumps(body).encode(), "/v1/chat/completions")
        assert r.status_code == 400 and error_of(r)["param"] == param
    r = httpx.get(url + "/v1/nothing", trust_env=False)
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = httpx.get(url + "/v1/completions", trust_env=False)
    assert r.status_code == 405 and error_of(r)
    ok = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
    wait_until(lambda: idle(srv), what="idle server")


def test_a_disconnect_mid_stream_frees_the_slot(server):
    url, srv = server
    before = srv.loop.finished["aborted"]
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 100, "stream": True, "ignore_eos": True}
    with slow_steps(srv, 0.01):
        with httpx.Client(trust_env=False) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: {") for line in got)
            assert srv.engine.num_running == 1
        wait_until(lambda: idle(srv), timeout=2.0, what="slot freed after the disconnect")
        # A non-streamed request whose client gives up is aborted too.
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.3, trust_env=False)
        wait_until(lambda: idle(srv), timeout=2.0, what="slot freed after the client timed out")
    assert srv.loop.finished["aborted"] == before + 2


def test_a_failing_engine_step_fails_its_requests_only(server):
    url, srv = server
    client = openai_client(url)
    engine, decode = srv.engine, srv.engine._decode_step
    calls = []

    def fail_once():  # the first decode step raises after the prefill put the request in a slot
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return decode()

    engine._decode_step = fail_once
    try:
        with pytest.raises(openai.InternalServerError, match="injected failure"):
            client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    finally:
        del engine._decode_step
    wait_until(lambda: idle(srv), what="idle after the failure")
    ok = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1 and srv.loop.step_errors == 1


def test_a_full_queue_answers_429_and_shutdown_ends_streams(served_checkpoint):
    import concurrent.futures

    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 140, "stream": True, "ignore_eos": True}
    pool = concurrent.futures.ThreadPoolExecutor(3)
    http = httpx.Client(trust_env=False, timeout=30)
    with running_server(served_checkpoint, max_batch=2, max_queue=1, shutdown_timeout=0.5) as (url, srv):
        # Slow until the end (this engine is not used afterwards): 140 steps take 28 s, far longer than the
        # checks below even on a loaded machine, so the shutdown always finds the streams unfinished. The context
        # is kept in a name: dropped at once, its generator would be closed and undo the patch there and then.
        slow = slow_steps(srv, 0.2)
        slow.__enter__()
        streams = [http.stream("POST", url + "/v1/completions", json=body) for _ in range(3)]
        responses = [s.__enter__() for s in streams]
        assert [r.status_code for r in responses] == [200] * 3  # two running, one waiting for a slot
        r = http.post(url + "/v1/completions", json=body)
        assert r.status_code == 429 and error_of(r)["code"] == "queue_full"
        pending = [pool.submit(lambda r=r: [line for line in r.iter_lines() if line]) for r in responses]
        # Leaving the block shuts the server down: after 0.5 s the unfinished streams end with "abort".
    for lines in (p.result(timeout=30) for p in pending):
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "abort"
    for s in streams:
        s.__exit__(None, None, None)
    slow.__exit__(None, None, None)
    http.close()
    pool.shutdown()
    assert idle(srv) and not srv.loop.alive


def test_serve_command_serves_and_stops_gracefully_on_sigterm(served_checkpoint, capsys):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    assert main(["serve", str(served_checkpoint), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    with socket.socket() as s:  # a free port (the server binds it a moment later)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "olmo_hybrid", "serve", str(served_checkpoint), "--port", str(port), "--max-batch",
           "2", "--prefix-cache-gib", "0.001", "--served-model-name", MODEL_NAME, "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if httpx.get(url + "/health", trust_env=False, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        out = openai_client(url).completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is the signal's.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert f"'{MODEL_NAME}' on http://127.0.0.1:{port} (2 slots x 160 tokens" in log
        assert "shutting down: 0 requests in flight" in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
