"""Streaming text of generated tokens: released as soon as it is final, never a partial character or stop string.

A token can end in the middle of a UTF-8 character (it then decodes to U+FFFD until the next token completes
it), and the last characters may be the start of a stop string that a later token completes (the request's text
ends before a stop string, which must never have been sent). A token can also complete a stop string and carry
characters past it, so text is released only once the caller knows that the newest token did not end the
request. :class:`TextStream` decodes a small window of recent tokens per new token (not the whole text, which
would cost quadratic time on long outputs); :meth:`TextStream.release` gives the text up to ``holdback``
characters before the end, and :meth:`TextStream.finish` the rest of the engine's final text, so the
concatenated stream equals the non-streamed text.

:func:`token_bytes` gives a token's own bytes (OpenAI's logprobs ``bytes``), from which clients rebuild the
characters that tokens split.
"""

from __future__ import annotations

import logging

import tokenizers

log = logging.getLogger(__name__)


def _byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary stands for (GPT-2's table: printable Latin-1
    characters stand for themselves, the other bytes for the characters from U+0100 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes ``token`` stands for: under a byte-level BPE its own bytes, which may be part of a character
    (whose decoded text is U+FFFD); otherwise (an added token, another kind of tokenizer) its text in UTF-8."""
    backend = getattr(tokenizer, "backend", None)
    if isinstance(backend, tokenizers.Tokenizer) and isinstance(backend.decoder, tokenizers.decoders.ByteLevel) \
            and token not in backend.get_added_tokens_decoder():
        piece = backend.id_to_token(token)
        if piece is not None and all(c in BYTE_LEVEL_ALPHABET for c in piece):
            return bytes(BYTE_LEVEL_ALPHABET[c] for c in piece)
    return tokenizer.decode([token]).encode("utf-8")


class TextStream:
    """Text of a growing list of token ids, released in pieces (see the module docstring).

    tokenizer: ``decode(list[int]) -> str``. holdback: characters kept back (longest stop string - 1).
    """

    def __init__(self, tokenizer, holdback: int = 0):
        self.tok, self.holdback = tokenizer, max(0, holdback)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only), released or not
        self.shown = 0  # characters of ``text`` released
        self._prefix = 0  # the decode window starts here: a few tokens of context before ``_read``
        self._read = 0  # tokens whose text is in ``text``

    def push(self, token: int) -> None:
        """Add one token (its text is released by a later :meth:`release` or :meth:`finish`)."""
        self.ids.append(int(token))
        before = self.tok.decode(self.ids[self._prefix:self._read])
        after = self.tok.decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return  # an incomplete character (or nothing new yet): wait for the next token
        # Both windows start after a complete character, so ``after`` extends ``before``.
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)

    def release(self) -> str:
        """Text not released yet, up to ``holdback`` characters before the end: call it only when the tokens
        pushed so far did not end the request."""
        return self._release(len(self.text) - self.holdback)

    def finish(self, final_text: str) -> str:
        """Everything of ``final_text`` (the engine's text of the whole request) not released yet."""
        if not final_text.startswith(self.text[:self.shown]):
            log.warning("streamed text is not a prefix of the final text; the stream ends with the final text's tail")
        self.text = final_text
        return self._release(len(final_text))

    def _release(self, end: int) -> str:
        if end <= self.shown:
            return ""
        piece = self.text[self.shown:end]
        self.shown = end
        return piece
