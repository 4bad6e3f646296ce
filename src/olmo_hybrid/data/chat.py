"""Chat templates: choose one, check a conversation, and render it with Jinja exactly as transformers does.

The template is a Jinja string carried by the tokenizer (``Tokenizer.chat_template``, saved in every
``tokenizer_config.json`` a run or export writes). Rendering uses transformers' settings (a sandboxed
environment with ``trim_blocks``, ``lstrip_blocks``, loop controls, its ``tojson``, ``raise_exception`` and
``strftime_now``; the tokenizer's named special tokens, ``bos_token`` included, as variables; ``tools`` and
``documents`` None; messages with None values dropped and reasoning fields aliased), and the text is tokenized
with special tokens parsed, so ``ChatTemplate.encode`` equals ``AutoTokenizer.apply_chat_template`` token for
token. ``{% generation %}`` blocks are tracked as transformers tracks them for ``return_assistant_tokens_mask``.
Whatever renders a conversation (``generate --chat``, post-training, a chat endpoint) uses this one renderer.

    chat = ChatTemplate(tokenizer)                       # the tokenizer's template, else ours
    chat.render(messages, add_generation_prompt=True)    # -> str
    chat.render_with_spans(messages)                     # -> str, [(start, end) of each {% generation %} block]
    chat.prompt_ids(messages)                            # -> token ids ending in the generation prompt
    chat.end_of_turn_id                                  # where a reply ends (<|im_end|>), to stop generation
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property
from pathlib import Path

from olmo_hybrid.data.tokenizer import CHAT_TEMPLATE_FILE, Tokenizer
from olmo_hybrid.errors import DataError

ROLES = ("system", "user", "assistant", "environment")  # what our template renders (environment: tool output)
TURN_TOKENS = ("<|im_start|>", "<|im_end|>")  # ids our template needs (dolma2 has both)
END_OF_TURN = "<|im_end|>"  # where an assistant turn ends: generation stops here
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers tells a template marks assistant text
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names transformers aliases to one another


def default_template() -> str:
    """Our template (``assets/chat_template.jinja``): the Olmo 3 Instruct turn layout; see docs/posttrain.md."""
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


def resolve_template(spec: str, tokenizer: Tokenizer) -> str:
    """The template to use: ``spec`` (a file, or a Jinja string) when given, else the tokenizer's own, else ours."""
    if spec:
        if "{{" in spec or "{%" in spec:
            return spec
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"chat.template: {spec!r} is neither a file nor a Jinja template (no '{{{{' or '{{%')")
        return path.read_text(encoding="utf-8")
    return tokenizer.chat_template or default_template()


def check_messages(messages, where: str, what: str = "messages") -> list[dict]:
    """``messages`` checked: a non-empty list of ``{"role", "content"}`` with roles from ``ROLES`` and string
    contents; anything else is a ``DataError`` naming ``where`` (a file line, a request) and the message."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{what}' must be a non-empty list of {{\"role\", \"content\"}} messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {what}[{j}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {what}[{j}] has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {what}[{j}].content must be a string, got {type(m['content']).__name__}")
    return messages


def _environment():
    """A Jinja environment configured as transformers' ``apply_chat_template`` configures its own; its
    ``generation_spans`` (a ``ContextVar``) collects the character spans of ``{% generation %}`` blocks while a
    ``ChatTemplate.render_with_spans`` is under way."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install 'olmo-hybrid[posttrain]'") from e

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body and, while spans are collected, records
        where the body starts and ends in the text rendered so far (transformers' ``AssistantTracker``)."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(generation_spans=ContextVar("generation_spans", default=None))

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            text = caller()
            tracking = self.environment.generation_spans.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _as_transformers_passes(messages: Sequence[dict]) -> list[dict]:
    """The messages as transformers hands them to a template: keys whose value is None dropped, and a reasoning
    field (``reasoning_content``, ``thinking`` or ``reasoning``) also under ``thinking`` and
    ``reasoning_content``."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


class ChatTemplate:
    """A compiled chat template bound to a tokenizer: ``source`` when given, else the tokenizer's
    ``chat_template``, else ours."""

    def __init__(self, tokenizer: Tokenizer, source: str | None = None):
        self.tokenizer = tokenizer
        self.source = source if source is not None else (tokenizer.chat_template or default_template())
        if not isinstance(self.source, str) or not self.source.strip():
            raise DataError(f"chat template must be a non-empty Jinja string, got {self.source!r}")
        env = _environment()  # first: it explains a missing jinja2
        import jinja2

        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
        self._spans = env.generation_spans
        # transformers passes the tokenizer's named special tokens as variables, and tools / documents as None.
        self._variables = {**tokenizer.special_tokens_map, "tools": None, "documents": None}

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks assistant text with ``{% generation %}`` (then those blocks are what
        post-training trains, as transformers' ``return_assistant_tokens_mask`` reports)."""
        return GENERATION_TAG.search(self.source) is not None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (transformers' ``apply_chat_template(..., tokenize=False)``); a template
        error (an unknown role, say) is a ``DataError``."""
        return self.render_with_spans(messages, add_generation_prompt)[0]

    def render_with_spans(self, messages: Sequence[dict], add_generation_prompt: bool = False
                          ) -> tuple[str, list[tuple[int, int]]]:
        """The text and the ``(start, end)`` character span of every ``{% generation %}`` block rendered."""
        import jinja2

        blocks, spans = [], []
        token = self._spans.set((blocks, spans))
        try:
            for block in self._template.generate(messages=_as_transformers_passes(messages),
                                                 add_generation_prompt=add_generation_prompt, **self._variables):
                blocks.append(block)
        except jinja2.TemplateError as e:
            raise DataError(f"chat template: {e}") from e
        finally:
            self._spans.reset(token)
        return "".join(blocks), spans

    def tokenize(self, text: str):
        """The ``tokenizers.Encoding`` (ids, character offsets) of rendered text: special tokens are parsed, so
        the template's markers are single ids; no BOS is added, the template writes its own (as transformers)."""
        return self.tokenizer.backend.encode(text, add_special_tokens=False)

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation (transformers' ``apply_chat_template(..., tokenize=True)``)."""
        return self.tokenize(self.render(messages, add_generation_prompt)).ids

    def prompt_ids(self, conversation: str | Sequence[dict]) -> list[int]:
        """What a model is sent to write the next assistant turn: the conversation (a string is one user turn)
        followed by the generation prompt."""
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        return self.encode(conversation, add_generation_prompt=True)

    @cached_property
    def end_of_turn_id(self) -> int | None:
        """The id of ``<|im_end|>`` when the tokenizer has it (generation stops there), else None."""
        return self.tokenizer.backend.token_to_id(END_OF_TURN)
