"""What serving a chat model needs beyond the shared renderer (``olmo_hybrid.data.chat``): the ids that end a reply.

The template itself is ``olmo-hybrid serve --chat-template``, else the one the checkpoint's tokenizer carries
(``chat_template`` in its ``tokenizer_config.json``, or ``chat_template.jinja``), else ours; ``ChatTemplate``
renders it as transformers' ``apply_chat_template`` does, for ``generate --chat``, post-training and the server.
"""

from __future__ import annotations

from pathlib import Path

from olmo_hybrid.config import read_json_object
from olmo_hybrid.data.chat import END_OF_TURN


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
        turn = tokenizer.encode(END_OF_TURN, allow_special=True, add_special_tokens=False)
        if len(turn) == 1:
            ids.add(turn[0])
    return ids
