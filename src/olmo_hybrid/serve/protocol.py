"""The OpenAI HTTP protocol: request validation into :class:`GenerationRequest` s, responses, stream chunks, errors.

Every field a request may carry is named here. Fields that would change the computation in a way this server
does not implement (penalties, ``logit_bias``, ``echo``, ``best_of``, tools, a message's ``name``, ...) are
refused with a 400 that names them, never ignored; unknown fields are refused too. A request has ``n`` choices
per prompt (completions take a batch of prompts), each its own engine request. Extensions beyond OpenAI's API:
``top_k`` (0 or -1: no limit) and ``ignore_eos`` (generate exactly ``max_tokens``), as in vLLM.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass

from olmo_hybrid.errors import DataError
from olmo_hybrid.model.engine import MAX_TOP_LOGPROBS, RequestOutput, TokenLogprob
from olmo_hybrid.model.sampling import SamplingParams
from olmo_hybrid.serve.detokenize import token_bytes
from olmo_hybrid.serve.scheduler import GenerationRequest

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "aborted": "abort"}
MAX_STOP_STRINGS = 16
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
                 "stream_options", "ignore_eos", "user", "presence_penalty", "frequency_penalty", "logit_bias",
                 "logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "top_logprobs", "max_completion_tokens", "response_format", "tools",
                               "tool_choice", "parallel_tool_calls", "functions", "function_call", "metadata", "store"}
CHAT_ROLES = ("system", "developer", "user", "assistant")
ROLE_NAMES = {"developer": "system"}  # OpenAI's newer name for the system role; chat templates know "system"


class APIError(Exception):
    """An error answered as an OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass(frozen=True)
class ServedModel:
    """What validation needs to know about the model being served."""

    name: str
    vocab_size: int
    max_context: int
    tokenizer: object  # encode(text) -> ids, decode(ids) -> text
    render_chat: object  # list of {"role", "content"} messages -> prompt token ids
    max_choices: int = 1  # choices (prompts x n) one request may have: the requests the server holds at once


@dataclass(frozen=True)
class ParsedRequest:
    generations: tuple[GenerationRequest, ...]  # one per choice: n per prompt, prompt after prompt
    stream: bool
    include_usage: bool
    chat: bool


# -- field checks --------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not (low < v if low_open else low <= v) or v > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"{name} must be a finite number in {interval}, got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < low or (high is not None and v > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise bad(f"{name} must be an integer {bound}, got {v!r}", name)
    return v


def _boolean(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {v!r}", name)
    return v


def _refuse_unsupported(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported (only 0)", name, "unsupported_parameter")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of is not supported (only 1)", "best_of", "unsupported_parameter")
    if body.get("echo"):
        raise bad("echo is not supported", "echo", "unsupported_parameter")
    if body.get("suffix") is not None:
        raise bad("suffix is not supported", "suffix", "unsupported_parameter")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"{name} (function calling) is not supported", name, "unsupported_parameter")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise bad(f"{name} is not supported (only 'none')", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format is not supported (only {'type': 'text'})", "response_format",
                  "unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or \
            len(stops) > MAX_STOP_STRINGS:
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings, "
                  f"got {v!r}", "stop")
    return tuple(stops)


def check_model(name: str | None, served: ServedModel) -> None:
    """A 404 (OpenAI's ``model_not_found``) unless ``name`` is the served model's (or None)."""
    if name is not None and name != served.name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{served.name}'", "model",
                       "model_not_found")


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, -1)
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    return SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed)


def _choices(body: dict, sampling: SamplingParams, prompts: int, served: ServedModel) -> list[SamplingParams]:
    """The sampling of each of the ``n`` choices of a prompt: with a seed, choice j samples with seed + j (so the
    choices differ, and a request repeats); without, each gets its own random seed."""
    n = _integer(body, "n", 1, 1)
    if prompts * n > served.max_choices:
        raise bad(f"{prompts} prompt(s) x n={n} choices exceed the {served.max_choices} requests this server holds "
                  "at once: send fewer prompts or a smaller n", "n" if n > 1 else "prompt")
    if n == 1 or sampling.seed is None:
        return [sampling] * n
    return [dataclasses.replace(sampling, seed=(sampling.seed + j) % 2**63) for j in range(n)]


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise bad(f"stream_options must be an object with include_usage, got {options!r}", "stream_options")
    if _boolean(options, "continuous_usage_stats"):
        raise bad("stream_options.continuous_usage_stats is not supported (usage comes in the final chunk with "
                  "include_usage)", "stream_options.continuous_usage_stats", "unsupported_parameter")
    return stream, _boolean(options, "include_usage")


def _max_tokens(body: dict, served: ServedModel, prompt_len: int, default: int | None, field: str,
                prompt_param: str) -> int:
    max_tokens = _integer(body, field, None, 1)
    if prompt_len >= served.max_context:
        raise bad(f"This model's maximum context length is {served.max_context} tokens, but the prompt has "
                  f"{prompt_len} tokens", prompt_param, "context_length_exceeded")
    if max_tokens is None:
        max_tokens = served.max_context - prompt_len if default is None else min(default, served.max_context -
                                                                                  prompt_len)
    if prompt_len + max_tokens > served.max_context:
        raise bad(f"This model's maximum context length is {served.max_context} tokens. However, you requested "
                  f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
                  "Reduce the prompt or max_tokens.", field, "context_length_exceeded")
    return max_tokens


def _prompt_ids(prompt, served: ServedModel, param: str) -> list[int]:
    if isinstance(prompt, str):
        ids = served.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad_id = next((t for t in prompt if not 0 <= t < served.vocab_size), None)
        if bad_id is not None:
            raise bad(f"{param} has token id {bad_id} outside the vocabulary [0, {served.vocab_size})", param)
        ids = list(prompt)
    else:
        raise bad(f"{param} must be a string or a non-empty list of token ids, got {prompt!r:.80}", param)
    if not ids:
        raise bad(f"{param} is empty: it must encode to at least one token", param)
    return ids


def _prompts(body: dict, served: ServedModel) -> list[tuple[str, list[int]]]:
    """(name, token ids) of each prompt: ``prompt`` is one (a string or token ids) or a batch (a list of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [(f"prompt[{i}]", _prompt_ids(p, served, f"prompt[{i}]")) for i, p in enumerate(prompt)]
    return [("prompt", _prompt_ids(prompt, served, "prompt"))]


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise bad(f"messages[{i}] must be an object with a role in {', '.join(CHAT_ROLES)}, got {m!r}",
                      f"messages[{i}].role")
        for key, value in m.items():  # a client may echo a reply back with empty fields; others change the prompt
            if key not in ("role", "content") and value not in (None, [], ""):
                raise bad(f"messages[{i}].{key} is not supported (the chat template renders a message's role and "
                          "content only)", f"messages[{i}].{key}", "unsupported_parameter")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content parts must be text parts ({{'type': 'text', 'text': ...}})",
                          f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        out.append({"role": ROLE_NAMES.get(m["role"], m["role"]), "content": content})
    return out


# -- requests ------------------------------------------------------------------------------------------
def parse_completion(body: dict, served: ServedModel) -> ParsedRequest:
    _refuse_unsupported(body, COMPLETION_FIELDS)
    check_model(body.get("model"), served)
    sampling, stream, stop = _sampling(body), _stream(body), _stop(body)
    logprobs, ignore_eos = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS), _boolean(body, "ignore_eos")
    prompts = _prompts(body, served)
    choices = _choices(body, sampling, len(prompts), served)
    gens = []
    for param, ids in prompts:
        max_tokens = _max_tokens(body, served, len(ids), 16, "max_tokens", param)
        gens += [GenerationRequest(ids, max_tokens, s, stop, ignore_eos, logprobs) for s in choices]
    return ParsedRequest(tuple(gens), stream[0], stream[1], chat=False)


def parse_chat(body: dict, served: ServedModel) -> ParsedRequest:
    _refuse_unsupported(body, CHAT_FIELDS)
    check_model(body.get("model"), served)
    sampling, stream = _sampling(body), _stream(body)
    messages = _messages(body)
    try:
        ids = served.render_chat(messages)
    except DataError as e:  # the chat template refused the conversation (a role it does not render, say)
        raise bad(str(e), "messages") from None
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if None not in (body.get("max_tokens"), body.get("max_completion_tokens")) and \
            body["max_tokens"] != body["max_completion_tokens"]:
        raise bad(f"max_tokens={body['max_tokens']!r} and max_completion_tokens={body['max_completion_tokens']!r} "
                  "differ: give one (max_completion_tokens is the newer name of max_tokens)", "max_tokens")
    max_tokens = _max_tokens(body, served, len(ids), None, field, "messages")
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not body.get("logprobs"):
        raise bad("top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (top or 0) if _boolean(body, "logprobs") else None
    stop, ignore_eos = _stop(body), _boolean(body, "ignore_eos")
    gens = tuple(GenerationRequest(ids, max_tokens, s, stop, ignore_eos, logprobs)
                 for s in _choices(body, sampling, 1, served))
    return ParsedRequest(gens, stream[0], stream[1], chat=True)


# -- responses -----------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(outs: list[RequestOutput]) -> dict:
    """Token counts of a request's choices together (generated tokens include the one that ended a choice)."""
    prompt, completion = sum(len(o.prompt_ids) for o in outs), sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outs)}}


def logprobs_payload(entries: list[TokenLogprob], tokenizer, chat: bool, top: int, offset: int = 0) -> dict:
    """OpenAI's logprobs object for ``entries``: chat's ``content`` list, or the legacy completions arrays
    (``text_offset`` counted from ``offset`` characters)."""
    text = lambda t: tokenizer.decode([t])  # noqa: E731
    if chat:
        def item(token, lp):
            s = text(token)
            return {"token": s, "logprob": lp, "bytes": list(token_bytes(tokenizer, token))}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:top]]}
                            for e in entries]}
    tokens = [text(e.token) for e in entries]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t): lp for t, lp in e.top[:top]} for e in entries] if top else None,
            "text_offset": offsets}


def response(request_id: str, model: str, chat: bool, outs: list[RequestOutput], logprobs: list[dict | None]) -> dict:
    """The whole answer: choice ``i`` is ``outs[i]`` with ``logprobs[i]``."""
    choices = []
    for i, (out, lp) in enumerate(zip(outs, logprobs)):
        choice = {"index": i, "message": {"role": "assistant", "content": out.text}} if chat else \
            {"index": i, "text": out.text}
        choices.append({**choice, "logprobs": lp, "finish_reason": FINISH_REASONS[out.finish_reason]})
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(outs)}


def chunk(request_id: str, model: str, chat: bool, created: int, text: str | None = None,
          finish_reason: str | None = None, logprobs: dict | None = None, role: bool = False,
          include_usage: bool = False, index: int = 0) -> dict:
    """One streamed chunk of choice ``index``: a piece of text (``role``: chat's first chunk, announcing the
    assistant)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    body = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(request_id: str, model: str, chat: bool, created: int, outs: list[RequestOutput]) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(outs)}
