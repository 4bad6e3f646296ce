"""Chat messages -> prompt token ids, with the checkpoint's chat template.

The template is the ``chat_template`` of the checkpoint's ``tokenizer_config.json`` (or its
``chat_template.jinja``), else :data:`DEFAULT_CHAT_TEMPLATE` (ChatML, the format of OLMo's instruct models). It is
rendered as transformers' ``apply_chat_template`` renders it (a sandboxed jinja2 environment with ``trim_blocks``
and ``lstrip_blocks``, ``raise_exception``, a JSON ``tojson``, the tokenizer's special tokens as variables) and the
text is tokenized with special tokens recognised, so the same messages give the same ids as transformers.

:func:`render_chat` is the one function the server calls: the project's shared chat renderer (``data/chat.py``)
replaces it once it lands.
"""

from __future__ import annotations

import json
from pathlib import Path

from olmo_hybrid.config import read_json_object

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"


def read_chat_template(checkpoint_dir: str | Path) -> str | None:
    """The chat template a HF checkpoint directory (or a run directory's export) carries, or None."""
    for directory in (Path(checkpoint_dir), Path(checkpoint_dir) / "hf"):
        jinja = directory / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        config = directory / "tokenizer_config.json"
        if config.is_file():
            template = read_json_object(config, "tokenizer config").get("chat_template")
            if isinstance(template, list):  # named templates: the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                return template
    return None


def compile_template(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(messages: list[dict], tokenizer, template) -> list[int]:
    """Token ids of ``messages`` (``{"role", "content"}`` dicts) followed by the assistant's turn opening.
    ``template``: a compiled template (:func:`compile_template`)."""
    text = template.render(messages=messages, add_generation_prompt=True, bos_token="",
                           eos_token=getattr(tokenizer, "eos_token", None) or "",
                           pad_token=getattr(tokenizer, "pad_token", None) or "")
    return tokenizer.encode(text, allow_special=True)


def end_token_ids(tokenizer, template: str, checkpoint_dir: str | Path | None = None) -> set[int]:
    """Token ids that end a reply: the tokenizer's end of text, the ``eos_token_id`` of the checkpoint's
    ``generation_config.json`` (an id or a list), and the template's end-of-turn token when it is one token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if checkpoint_dir is not None:
        for directory in (Path(checkpoint_dir), Path(checkpoint_dir) / "hf"):
            config = directory / "generation_config.json"
            if config.is_file():
                eos = read_json_object(config, "generation config").get("eos_token_id")
                ids.update([eos] if isinstance(eos, int) else eos or [])
                break
    if END_OF_TURN in template:
        turn = tokenizer.encode(END_OF_TURN, allow_special=True)
        if len(turn) == 1:
            ids.add(turn[0])
    return ids
