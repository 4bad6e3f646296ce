"""Chat templates: choose one, render conversations with Jinja exactly as transformers does, and find the
assistant tokens that supervised fine-tuning and DPO score.

The template is a Jinja string carried by the tokenizer (``Tokenizer.chat_template``, saved in every
``tokenizer_config.json`` a run or export writes). Rendering uses transformers' settings (a sandboxed
environment with ``trim_blocks``, ``lstrip_blocks``, loop controls, its ``tojson`` and ``raise_exception``,
the tokenizer's special tokens as variables), and the text is tokenized with special tokens parsed, so
``ChatTemplate.encode`` equals ``AutoTokenizer.apply_chat_template`` token for token.

Assistant tokens are found without any marker in the template: for assistant message ``i`` the span runs
from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])``, i.e. the message's content and whatever closes its turn (``<|im_end|>\\n``
here). That needs a template whose rendering of a prefix of the conversation is a prefix of the whole
rendering; a template that is not (one that closes the last turn differently, say) is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from olmo_hybrid.data import DataError, Tokenizer
from olmo_hybrid.data.tokenizer import CHAT_TEMPLATE_FILE

ROLES = ("system", "user", "assistant", "environment")  # what our template renders (environment: tool output)
TURN_TOKENS = ("<|im_start|>", "<|im_end|>")  # ids our template needs (dolma2 has both)
END_OF_TURN = "<|im_end|>"  # where an assistant turn ends: generation stops here


def default_template() -> str:
    """Our template (``assets/chat_template.jinja``): the Olmo 3 Instruct turn layout; see docs/posttrain.md."""
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


def resolve_template(spec: str, tokenizer: Tokenizer) -> str:
    """The template a run uses: ``spec`` (a file, or a Jinja string) when given, else the tokenizer's own,
    else ours."""
    if spec:
        if "{{" in spec or "{%" in spec:
            return spec
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"chat.template: {spec!r} is neither a file nor a Jinja template (no '{{{{' or '{{%')")
        return path.read_text(encoding="utf-8")
    return tokenizer.chat_template or default_template()


def _environment():
    """A Jinja environment configured as transformers' ``apply_chat_template`` configures its own."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install 'olmo-hybrid[posttrain]'") from e

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses the tag to mark
        assistant text; we find assistant text by prefix rendering, so the tag only has to parse)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


class ChatTemplate:
    """A compiled chat template bound to a tokenizer."""

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
        # transformers passes the tokenizer's special tokens (those it has) as template variables.
        self._specials = {k: v for k, v in (("eos_token", tokenizer.eos_token), ("pad_token", tokenizer.pad_token))
                          if v is not None}

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self._specials)
        except jinja2.TemplateError as e:
            raise DataError(f"chat template: {e}") from e

    def _tokenize(self, text: str):
        self.tokenizer.backend.encode_special_tokens = False  # the template's markers are single ids
        return self.tokenizer.backend.encode(text, add_special_tokens=False)

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation (transformers' ``apply_chat_template(..., tokenize=True)``)."""
        return self._tokenize(self.render(messages, add_generation_prompt)).ids

    def prompt_ids(self, user_text: str) -> list[int]:
        """One user turn followed by the generation prompt: what ``generate --chat`` and evaluation send."""
        return self.encode([{"role": "user", "content": user_text}], add_generation_prompt=True)

    def assistant_spans(self, messages: Sequence[dict], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """``(text, [(start, end), ...])``: the rendering and the character span of every assistant turn from
        message ``first`` on."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if i < first or message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                raise DataError("the chat template renders a conversation's first messages differently from the "
                                "start of the whole conversation, so assistant tokens cannot be located; use a "
                                "template whose turns do not depend on what follows them")
            spans.append((len(before), len(through)))
        return text, spans

    def encode_with_mask(self, messages: Sequence[dict], first: int = 0) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per token, whether it belongs to an assistant turn from message
        ``first`` on (a token counts when it starts inside the turn's span)."""
        text, spans = self.assistant_spans(messages, first)
        enc = self._tokenize(text)
        mask, j = [], 0
        for start, _ in enc.offsets:
            while j < len(spans) and start >= spans[j][1]:
                j += 1
            mask.append(j < len(spans) and spans[j][0] <= start)
        return enc.ids, mask

    @cached_property
    def end_of_turn_id(self) -> int | None:
        """The id of ``<|im_end|>`` when the tokenizer has it (generation stops there), else None."""
        return self.tokenizer.backend.token_to_id(END_OF_TURN)
