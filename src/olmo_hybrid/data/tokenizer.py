"""Tokenizers: the bundled dolma2 tokenizer of OLMo 3 / OLMo Hybrid, and small byte-level BPEs.

Both are Hugging Face ``tokenizers`` models behind one small wrapper, :class:`Tokenizer`. dolma2 has
100,278 ids (the model pads its embedding to 100,352), ``<|endoftext|>`` = 100257 as end of document,
``<|pad|>`` = 100277, no BOS, and ``<|im_start|>`` / ``<|im_end|>`` for chat turns; it carries our chat
template (``assets/chat_template.jinja``, rendered by ``olmo_hybrid.data.chat``). :func:`train_bpe` builds a
tokenizer of a few thousand ids for tiny models, where a 100k vocabulary would hold most of the parameters; it
splits text with dolma2's own pre-tokenizer, so the two differ only in their merges.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from olmo_hybrid.data.corpus import DataError
from olmo_hybrid.fsio import atomic_write_text

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DOLMA2 = "dolma2"
DOLMA2_ALIASES = (DOLMA2, "allenai/dolma2-tokenizer", "allenai_dolma2")
CHAT_TEMPLATE_FILE = ASSETS_DIR / "chat_template.jinja"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Token names other tokenizers use for end of document, tried in order when no config says which.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "<|im_end|>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]")
# transformers' named special tokens besides eos and pad (its SPECIAL_TOKENS_ATTRIBUTES)
NAMED_TOKENS = ("bos_token", "unk_token", "sep_token", "cls_token", "mask_token")

# dolma2's (= cl100k's) pre-tokenization: contractions, words with one leading non-letter, digit runs
# of at most three, punctuation runs, and whitespace, before byte-level mapping.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with its special ids and the few calls this project needs.

    ``encode`` gives what transformers' ``tokenizer(text)`` gives for the saved tokenizer: the BOS its
    post-processor puts before a text (Llama's ``"<s> $A"``; dolma2 and our BPEs have none), then the text
    (``add_special_tokens=False``: the text alone). ``bos_token_id`` is that BOS, or None; a post-processor that
    adds anything else (an EOS after the text, several tokens) is refused. Unless ``allow_special=True``,
    special-token strings that occur in the text ("<|endoftext|>") are encoded as ordinary text, so a document
    can never contain a stray end-of-document id. ``vocab_size`` is the number of ids the tokenizer produces;
    models round it up with :meth:`padded_vocab_size`. ``chat_template`` (a Jinja string, or None) travels
    with the tokenizer into every ``tokenizer_config.json`` it writes, and so do ``named_tokens``: the other
    named special tokens of a ``tokenizer_config.json`` (``bos_token``, ``unk_token``, ...), which chat templates
    read as variables (a Llama-3 template starts with ``{{ bos_token }}``) and which are never added to text.
    """

    def __init__(self, backend: tokenizers.Tokenizer, name: str, eos_token: str | None = EOS_TOKEN,
                 pad_token: str | None = None, chat_template: str | None = None,
                 named_tokens: dict[str, str] | None = None):
        self.backend = backend
        self.name = name
        self.chat_template = chat_template
        self.eos_token, self.pad_token = eos_token, pad_token
        self.named_tokens = {k: v for k, v in (named_tokens or {}).items() if k in NAMED_TOKENS and v is not None}
        self.eos_token_id = self._id_of(eos_token, "eos_token")
        self.pad_token_id = self._id_of(pad_token, "pad_token")
        backend.encode_special_tokens = False  # the library's default: special-token text is parsed
        self.bos_token_id = self._added_bos()
        if self.bos_token_id is not None:  # so transformers' bos_token_id names it too
            self.named_tokens.setdefault("bos_token", backend.id_to_token(self.bos_token_id))

    def _added_bos(self) -> int | None:
        """The one id the post-processor puts before every text, or None when it adds nothing."""
        if self.backend.post_processor is None or self.backend.num_special_tokens_to_add(False) == 0:
            return None
        bare = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a").ids
        if len(full) != len(bare) + 1 or full[1:] != bare:
            raise DataError(f"tokenizer {self.name}: its post-processor turns the text 'a' {bare} into {full}; "
                            "olmo-hybrid supports one that adds nothing or one BOS before the text (\"<s> $A\")")
        return full[0]

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Every named special token it has (``eos_token``, ``pad_token``, ``bos_token`` ...), as transformers'
        ``special_tokens_map``: what a chat template sees as variables."""
        return {k: v for k, v in {**self.named_tokens, "eos_token": self.eos_token, "pad_token": self.pad_token}.items()
                if v is not None}

    def _id_of(self, token: str | None, role: str) -> int | None:
        if token is None:
            return None
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise DataError(f"tokenizer {self.name}: {role} {token!r} is not in its vocabulary")
        return tid

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """Embedding rows for a model: ``vocab_size`` rounded up (dolma2: 100278 -> 100352)."""
        return -(-self.vocab_size // multiple) * multiple

    @functools.cached_property
    def _plain_text_backend(self) -> tokenizers.Tokenizer:
        """A copy of ``backend`` that reads special-token text as plain text: the library holds that choice as a
        setting of the tokenizer, not of a call, so two tokenizers serve the two choices and no call flips one."""
        plain = tokenizers.Tokenizer.from_str(self.to_json())
        plain.encode_special_tokens = True
        return plain

    def _backend_for(self, allow_special: bool) -> tokenizers.Tokenizer:
        return self.backend if allow_special else self._plain_text_backend

    def encode(self, text: str, allow_special: bool = False, add_special_tokens: bool = True) -> list[int]:
        return self._backend_for(allow_special).encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False,
                     add_special_tokens: bool = True) -> list[list[int]]:
        backend = self._backend_for(allow_special)
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.backend.to_str()

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer JSON: two tokenizers with equal fingerprints give equal ids."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that names the special tokens.

        The pair is what a Hugging Face checkpoint directory carries; ``transformers`` loads it as a
        ``PreTrainedTokenizerFast`` and :func:`load_tokenizer` reads it back with the same ids.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "name": self.name,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": None,
            **self.named_tokens,
            "add_bos_token": self.bos_token_id is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / "tokenizer.json", self.to_json())
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return directory / "tokenizer.json"

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, "
                f"pad_token_id={self.pad_token_id})")


@functools.lru_cache(maxsize=1)
def _dolma2_json() -> str:
    path = ASSETS_DIR / "dolma2_tokenizer.json.xz"
    if not path.is_file():
        raise DataError(f"the bundled dolma2 tokenizer {path} is missing: reinstall olmo-hybrid")
    return lzma.decompress(path.read_bytes()).decode("utf-8")


def _pick(vocab_has, explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit
    return next((c for c in candidates if vocab_has(c)), None)


def _from_file(path: Path) -> Tokenizer:
    config_path = path.with_name("tokenizer_config.json")
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{config_path} is not valid JSON: {e}") from e

    def special(key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value  # HF may store AddedToken dicts

    template = config.get("chat_template")
    if isinstance(template, list):  # transformers' named templates: [{"name", "template"}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = path.with_name("chat_template.jinja")  # where transformers >= 4.43 saves it; it wins there too
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")

    try:
        text = lzma.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".xz" else path.read_text("utf-8")
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # OSError, bad UTF-8 or xz, and tokenizers' own parse errors (plain Exception)
        raise DataError(f"cannot load tokenizer from {path}: {e}") from e
    has = lambda tok: backend.token_to_id(tok) is not None  # noqa: E731
    name = config.get("name") or str(path)
    return Tokenizer(backend, name, _pick(has, special("eos_token"), _EOS_CANDIDATES),
                     _pick(has, special("pad_token"), _PAD_CANDIDATES), template,
                     {k: special(k) for k in NAMED_TOKENS})


def load_tokenizer(name_or_path: str | Path = DOLMA2) -> Tokenizer:
    """``"dolma2"`` (bundled), a ``tokenizer.json`` (or ``.json.xz``) file, or a directory holding one.

    Special tokens come from a ``tokenizer_config.json`` beside the file when there is one, else from
    the usual names (``<|endoftext|>``, ``</s>``, ... for end of document), and so does ``chat_template``
    (or a ``chat_template.jinja`` beside it, which wins, as in transformers).
    """
    if str(name_or_path) in DOLMA2_ALIASES:
        return Tokenizer(tokenizers.Tokenizer.from_str(_dolma2_json()), DOLMA2, EOS_TOKEN, PAD_TOKEN,
                         CHAT_TEMPLATE_FILE.read_text(encoding="utf-8"))
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"tokenizer directory {path} has no tokenizer.json")
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"unknown tokenizer {str(name_or_path)!r}: expected 'dolma2', a tokenizer.json file "
                        "or a directory containing one")
    return _from_file(path)


def check_bpe_vocab(vocab_size) -> None:
    """Refuse a BPE vocabulary size that cannot hold the special ids, the 256 bytes and one merge."""
    if not isinstance(vocab_size, int) or vocab_size < 258 + 1:
        raise DataError(f"bpe vocab_size must be an integer of at least 259 (2 special ids + 256 bytes + "
                        f"one merge), got {vocab_size!r}")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids on ``texts``.

    Ids 0 and 1 are ``<|endoftext|>`` (end of document, the eos id) and ``<|pad|>``; the 256 byte
    symbols follow, so any string encodes. Training is deterministic for a given input order.
    """
    check_bpe_vocab(vocab_size)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, f"bpe-{vocab_size}", EOS_TOKEN, PAD_TOKEN)
