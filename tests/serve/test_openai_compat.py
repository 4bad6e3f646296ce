"""What users of the OpenAI API expect of the server, checked with the real openai client on 127.0.0.1: the developer
role, max_completion_tokens, stop strings across token boundaries, usage, seeds, top_p, chat logprobs, fields we
refuse by name, batches of prompts, and the model, health and error routes."""

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402
import openai  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402
from serve_util import MODEL_NAME, PROMPT, error_of, greedy_by_full_forwards, openai_client, streamed_text  # noqa: E402

from olmo_hybrid.checkpoint import load_model_and_tokenizer  # noqa: E402
from olmo_hybrid.errors import DataError  # noqa: E402
from olmo_hybrid.serve import protocol  # noqa: E402
from olmo_hybrid.serve.detokenize import BYTE_LEVEL_ALPHABET  # noqa: E402

QUESTION = [{"role": "user", "content": "Where did you sit?"}]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def test_developer_role_is_rendered_as_the_system_role(server):
    url, srv = server
    client = openai_client(url)
    replies = [client.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=0, messages=[
        {"role": role, "content": "You are a cat."}, *QUESTION]) for role in ("developer", "system")]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    system = srv.served.render_chat([{"role": "system", "content": "You are a cat."}, *QUESTION])
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens == len(system)


def test_a_conversation_the_template_refuses_is_a_400_naming_messages():
    def refuse(messages):
        raise DataError("chat template: unknown role system")

    served = protocol.ServedModel("m", 10, 100, None, refuse)
    with pytest.raises(protocol.APIError) as e:
        protocol.parse_chat({"messages": [{"role": "developer", "content": "x"}]}, served)
    assert (e.value.status, e.value.param) == (400, "messages") and "unknown role system" in e.value.message


def test_max_completion_tokens_is_max_tokens(server):
    url, _ = server
    client = openai_client(url)
    for kw in ({"max_completion_tokens": 5}, {"max_completion_tokens": 5, "max_tokens": 5}):
        out = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, **GREEDY, **kw)
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=5, max_completion_tokens=6)
    assert "max_tokens=5 and max_completion_tokens=6" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the completions API has only max_tokens, as OpenAI's
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, extra_body={"max_completion_tokens": 5})
    assert e.value.body["param"] == "max_completion_tokens"


def test_stop_strings_across_token_boundaries_streamed_or_not(server):
    url, srv = server
    client = openai_client(url)
    free = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, logprobs=0, **GREEDY)
    text, tokens = free.choices[0].text, free.choices[0].logprobs.tokens
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 24

    def boundary(j):  # a stop string made of token j's last character and token j+1's first
        head = "".join(tokens[:j + 1])
        span = tokens[j][-1:] + tokens[j + 1][:1]
        clean = "\ufffd" not in tokens[j] + tokens[j + 1] and text.startswith(head + tokens[j + 1])
        return clean and len(span) == 2 and span not in head and len(tokens[j + 1]) > 1 and \
            tokens[j + 1][1:] not in head + tokens[j + 1][:1]

    j = next(j for j in range(len(tokens) - 1) if boundary(j))
    span, late = tokens[j][-1:] + tokens[j + 1][:1], tokens[j + 1][1:]
    cut = text[:text.find(span)]
    # The token after the boundary completes both `span` and `late`; the text ends before the earlier one.
    for stop in (span, [late, "\n\n\n", span, "@@@"]):
        out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=stop, logprobs=0,
                                        **GREEDY)
        assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop", stop
        assert out.usage.completion_tokens == j + 2 == len(out.choices[0].logprobs.tokens)
        streamed, chunks = streamed_text(client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=stop, stream=True, **GREEDY))
        assert streamed == cut and chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, stop=["a", ""])
    assert e.value.body["param"] == "stop"


def test_usage_streamed_in_the_last_chunk_equals_the_non_streamed_usage(server):
    url, srv = server
    client = openai_client(url)
    full = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=7, **GREEDY)
    assert full.usage.prompt_tokens == len(srv.served.render_chat(QUESTION))
    assert (full.usage.completion_tokens, full.usage.total_tokens) == (7, full.usage.prompt_tokens + 7)
    _, chunks = streamed_text(client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=7, stream=True, stream_options={"include_usage": True},
        **GREEDY), chat=True)
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (full.usage.prompt_tokens, 7)
    _, chunks = streamed_text(client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=7,
                                                             stream=True, **GREEDY), chat=True)
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)  # no usage unless asked
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, stream=True, stream_options={
            "include_usage": True, "continuous_usage_stats": True})
    assert e.value.body["param"] == "stream_options.continuous_usage_stats"


def test_seeds_repeat_samples_and_top_p_reaches_the_sampler(server):
    url, _ = server
    client = openai_client(url)

    def sample(seed, **kw):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}, **kw).choices[0].text

    first = sample(1)
    # The same seed gives the same text, also while another request shares the batch.
    streamed = client.completions.create(model=MODEL_NAME, prompt="the dog", max_tokens=40, temperature=1.0,
                                         stream=True, extra_body={"ignore_eos": True})
    next(iter(streamed))
    assert sample(1) == first
    streamed.close()
    assert len({first, sample(2), sample(3)}) == 3
    greedy = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, **GREEDY).choices[0].text
    assert sample(2, top_p=1e-6) == sample(3, top_p=1e-6) == greedy  # only the most likely token is left


def test_chat_logprobs_are_the_models_log_softmax_streamed_or_not(server, served_checkpoint):
    url, srv = server
    model, _ = load_model_and_tokenizer(served_checkpoint)
    client = openai_client(url)
    kw = dict(model=MODEL_NAME, messages=QUESTION, max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY)
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    prompt = srv.served.render_chat(QUESTION)
    ids = greedy_by_full_forwards(model, torch.tensor(prompt), 5)
    with torch.no_grad():
        ref = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1:-1].log_softmax(-1)
    decode = srv.served.tokenizer.decode
    assert [c.token for c in content] == [decode([i]) for i in ids]
    assert [c.logprob for c in content] == pytest.approx([ref[j, t].item() for j, t in enumerate(ids)], abs=1e-4)
    for j, c in enumerate(content):
        top = ref[j].topk(2)
        assert [t.token for t in c.top_logprobs] == [decode([i]) for i in top.indices.tolist()]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    _, chunks = streamed_text(client.chat.completions.create(stream=True, **kw), chat=True)
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


REFUSED = [
    ("chat", dict(presence_penalty=0.5), "presence_penalty"),
    ("chat", dict(frequency_penalty=-0.5), "frequency_penalty"),
    ("chat", dict(logit_bias={"5": 10}), "logit_bias"),
    ("chat", dict(response_format={"type": "json_object"}), "response_format"),
    ("chat", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    ("chat", dict(tool_choice="auto"), "tool_choice"),
    ("chat", dict(n=0), "n"),
    ("chat", dict(n=9), "n"),  # more choices than the server holds at once (4 slots + 4 queued)
    ("chat", dict(messages=[{"role": "user", "content": "Hi", "name": "Bob"}]), "messages[0].name"),
    ("chat", dict(top_logprobs=2), "top_logprobs"),  # without logprobs=true
    ("chat", dict(top_logprobs=21, logprobs=True), "top_logprobs"),
    ("chat", dict(extra_body={"reasoning_effort": "low"}), "reasoning_effort"),
    ("completions", dict(echo=True), "echo"),
    ("completions", dict(suffix="the end"), "suffix"),
    ("completions", dict(best_of=2), "best_of"),
    ("completions", dict(logprobs=21), "logprobs"),
    ("completions", dict(seed=-1), "seed"),
]


def test_unsupported_fields_are_refused_by_name_and_their_neutral_values_accepted(server):
    url, _ = server
    client = openai_client(url)
    create = {"chat": lambda **kw: client.chat.completions.create(**{"model": MODEL_NAME, "messages": QUESTION, **kw}),
              "completions": lambda **kw: client.completions.create(model=MODEL_NAME, prompt=PROMPT, **kw)}
    for endpoint, kw, param in REFUSED:
        with pytest.raises(openai.BadRequestError) as e:
            create[endpoint](max_tokens=2, **kw)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error", kw
    neutral = dict(max_tokens=2, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, n=1, temperature=0)
    echoed = [*QUESTION, {"role": "assistant", "content": "On the mat.", "refusal": None, "tool_calls": []},
              {"role": "user", "content": "Why?", "name": ""}]
    create["chat"](response_format={"type": "text"}, tool_choice="none", messages=echoed, **neutral)
    create["completions"](echo=False, best_of=1, **neutral)


def test_a_batch_of_prompts_gets_one_choice_per_prompt(server):
    url, srv = server
    client = openai_client(url)
    prompts = [PROMPT, "the dog sat on the log", srv.served.tokenizer.encode("on the mat")]
    alone = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6, **GREEDY) for p in prompts]
    batch = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, logprobs=1, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert [c.logprobs.token_logprobs[0] is not None for c in batch.choices] == [True] * 3
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 18
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts == [a.choices[0].text for a in alone]
    ends = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(ends) == [0, 1, 2] and chunks[-1].usage.completion_tokens == 18
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=[PROMPT, [1, 10**6]], max_tokens=2)
    assert e.value.body["param"] == "prompt[1]"
    with pytest.raises(openai.BadRequestError, match="9 prompt.* exceed the 8 requests") as e:
        client.completions.create(model=MODEL_NAME, prompt=[PROMPT] * 9, max_tokens=2)
    assert e.value.body["param"] == "prompt"


def test_n_choices_sample_with_seed_plus_their_index(server):
    url, srv = server
    client = openai_client(url)
    kw = dict(model=MODEL_NAME, messages=QUESTION, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    out = client.chat.completions.create(n=3, seed=5, **kw)
    texts = [c.message.content for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [client.chat.completions.create(seed=5 + j, **kw).choices[0].message.content for j in range(3)]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (3 * len(srv.served.render_chat(QUESTION)), 24)
    chunks = list(client.chat.completions.create(n=3, seed=5, stream=True, **kw))
    assert [c.choices[0].index for c in chunks[:3]] == [0, 1, 2] and {c.choices[0].delta.role for c in chunks[:3]} \
        == {"assistant"}
    assert ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == j)
            for j in range(3)] == texts
    # A batch of two prompts with n=2: prompt after prompt, each prompt's choices together.
    batch = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "the dog"], n=2, max_tokens=4, seed=1,
                                      temperature=1.0)
    alone = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=4, seed=s, temperature=1.0)
             for p in (PROMPT, "the dog") for s in (1, 2)]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]


def test_model_health_and_error_routes(server):
    url, _ = server
    client = openai_client(url)
    listed = httpx.get(url + "/v1/models", trust_env=False).json()
    assert listed["object"] == "list" and len(listed["data"]) == 1
    card = listed["data"][0]
    assert (card["id"], card["object"], card["owned_by"]) == (MODEL_NAME, "model", "olmo-hybrid")
    assert isinstance(card["created"], int) and card["max_model_len"] == 160
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(url + "/health", trust_env=False).json() == {"status": "ok"}
    for method, path, status in (("POST", "/v1/embeddings", 404), ("GET", "/v2/completions", 404),
                                 ("GET", "/v1/chat/completions", 405), ("POST", "/v1/models", 405),
                                 ("DELETE", "/health", 405)):
        r = httpx.request(method, url + path, trust_env=False)
        assert r.status_code == status and error_of(r)["message"].startswith(f"{method} {path}"), (method, path)


def test_chat_logprob_bytes_rebuild_characters_split_across_tokens(server):
    """``bytes`` is a token's own UTF-8 bytes (not those of its decoded text, a U+FFFD for a partial character),
    so the bytes of all tokens together decode to the reply, as OpenAI documents."""
    url, srv = server
    client = openai_client(url)
    messages = [{"role": "user", "content": "日本語 é"}]
    split = 0
    for seed in range(4):  # hot sampling from the byte-level vocabulary: characters split across tokens
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=2.0,
                                             seed=seed, logprobs=True, extra_body={"ignore_eos": True})
        content = out.choices[0].logprobs.content
        joined = b"".join(bytes(c.bytes) for c in content)
        assert joined.decode("utf-8", errors="replace") == out.choices[0].message.content
        split += sum(c.token == "\ufffd" for c in content)
    assert split > 0  # the case this test is about occurred
    assert set(BYTE_LEVEL_ALPHABET) == set(ByteLevel.alphabet()) and sorted(BYTE_LEVEL_ALPHABET.values()) == \
        list(range(256))


def test_streamed_completion_logprobs_equal_the_non_streamed(server):
    """Tokens, logprobs and text offsets of a streamed completion are the non-streamed ones, also when text is held
    back (a stop string that may be starting, a partial character)."""
    url, _ = server
    client = openai_client(url)
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=2.0, seed=5, logprobs=2, stop="zzzz",
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].logprobs
    _, chunks = streamed_text(client.completions.create(stream=True, **kw))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == full.tokens
    assert [x for p in parts for x in p.token_logprobs] == full.token_logprobs
    assert [x for p in parts for x in p.text_offset] == full.text_offset


def test_concurrent_mixed_requests_each_equal_their_lone_run(server):
    """Streamed and non-streamed requests with different sampling settings, in flight together (8 at once on 4
    slots: some wait), each give what they give alone: greedy ones do not depend on their batch."""
    from concurrent.futures import ThreadPoolExecutor

    url, srv = server
    client = openai_client(url)
    settings = [dict(temperature=0), dict(temperature=1.2, seed=3, top_p=0.9), dict(temperature=0.7, seed=8,
                                                                                    extra_body={"top_k": 4})]
    prompts = ["the cat sat", "on the log, the dog", "A cat"]

    def run(job):
        prompt, kw, stream = job
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, stream=stream, **kw)
        return streamed_text(out)[0] if stream else out.choices[0].text

    jobs = [(p, kw, stream) for p in prompts for kw in settings for stream in (False, True)]
    lone = {(p, i): run((p, kw, False)) for p in prompts for i, kw in enumerate(settings)}
    srv.engine.stats.max_running = 0
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, jobs))
    assert together == [lone[p, settings.index(kw)] for p, kw, _ in jobs]
    assert srv.engine.stats.max_running >= 2  # they did share batches
