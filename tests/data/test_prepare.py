"""prepare: token shards that decode to the input, a document-level split, atomic output, errors."""

import importlib
import json
import os

import numpy as np
import pytest

from olmo_hybrid.cli import main
from olmo_hybrid.data.corpus import DataError, Document
from olmo_hybrid.data.dataset import TokenDataset, read_manifest
from olmo_hybrid.data.prepare import choose_val_documents, prepare, prepare_bundled
from olmo_hybrid.data.tokenizer import load_tokenizer
from olmo_hybrid.errors import WriteError

from .conftest import random_documents

# olmo_hybrid.data.prepare, as an attribute, is the function; the module is reached through importlib
prepare_module = importlib.import_module("olmo_hybrid.data.prepare")


def prepare_cli(argv: list[str]) -> int:
    return main(["prepare", *argv])


def _split_docs(path, split):
    ds = TokenDataset(path, split)
    return ds, [ds.document(i) for i in range(ds.n_docs)]


def test_shards_decode_to_the_documents(small_dataset, small_docs):
    manifest = read_manifest(small_dataset)
    tok = TokenDataset(small_dataset, "train").tokenizer()
    seen = []
    for split in ("train", "val"):
        ds, docs = _split_docs(small_dataset, split)
        assert ds.tokens.dtype == np.uint32 and ds.offsets.dtype == np.int64
        info = manifest["splits"][split]
        assert (ds.n_docs, ds.n_tokens) == (info["documents"], info["tokens"]) == (len(docs), sum(map(len, docs)))
        for src, ids in zip(ds.source_index, docs):
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
            assert tok.decode(ids[:-1]) == small_docs[src].text
        assert info["bytes"] == sum(len(small_docs[i].text.encode()) for i in ds.source_index)
        seen.append(set(ds.source_index.tolist()))
    train, val = seen
    assert not train & val and train | val == set(range(len(small_docs)))
    assert len(val) == round(0.1 * len(small_docs))
    assert manifest["eos_token_id"] == tok.eos_token_id == 0 and manifest["vocab_size"] == 300
    assert manifest["tokenizer"]["sha256"] == tok.fingerprint


def test_literal_separator_text_inside_a_jsonl_document_stays_inside(tmp_path):
    texts = ["a document that mentions <|endoftext|> in its text", "second", "third one"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = prepare([tmp_path / "d.jsonl"], tmp_path / "out", tokenizer="dolma2", val_fraction=0, progress=False)
    ds, docs = _split_docs(out, "train")
    tok = ds.tokenizer()
    assert [tok.decode(d[:-1]) for d in docs] == texts
    assert [int(np.sum(d == tok.eos_token_id)) for d in docs] == [1, 1, 1]
    assert TokenDataset(out, "val").n_tokens == 0


def test_output_is_identical_for_any_number_of_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "_CHUNK_CHARS", 20_000)  # many tasks, more than the pool keeps in flight
    docs = random_documents(40, seed=3, max_words=3000)
    a = prepare(None, tmp_path / "a", documents=docs, bpe_vocab=280, workers=1, progress=False)
    b = prepare(None, tmp_path / "b", documents=docs, bpe_vocab=280, workers=2, progress=False)
    for name in ("train.tokens.bin", "val.tokens.bin", "train.offsets.npy", "val.source_index.npy", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_trained_bpe_never_sees_validation_documents(tmp_path):
    docs = random_documents(20, seed=4)
    held = int(np.flatnonzero(choose_val_documents(21, 0.05, seed=0))[0])
    docs.insert(held, Document("qxjqxj " * 200, "probe"))  # letters no other document contains
    out = prepare(None, tmp_path / "o", documents=docs, bpe_vocab=400, val_fraction=0.05, seed=0, progress=False)
    assert TokenDataset(out, "val").source_index.tolist() == [held]
    vocab = load_tokenizer(out).backend.get_vocab()
    assert not any(piece in vocab for piece in ("qx", "xj", "jq"))
    # control: with the probe in training the BPE does merge it, so the check above can fail
    out = prepare(None, tmp_path / "c", documents=docs, bpe_vocab=400, val_fraction=0, progress=False)
    assert "qxj" in load_tokenizer(out).backend.get_vocab()


def test_failed_prepare_leaves_previous_output_intact(tmp_path, monkeypatch, small_docs):
    out = tmp_path / "out"
    prepare(None, out, documents=small_docs[:10], bpe_vocab=280, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module, "_write_manifest", boom)
    with pytest.raises(WriteError, match=f"could not write the prepared dataset {out}: no space left on device"):
        prepare(None, out, documents=small_docs[10:30], bpe_vocab=300, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    with pytest.raises(OSError):
        prepare(None, tmp_path / "new", documents=small_docs, bpe_vocab=280, progress=False)
    assert not (tmp_path / "new").exists()

    monkeypatch.undo()  # a successful run replaces the old dataset completely
    prepare(None, out, documents=small_docs[10:30], bpe_vocab=300, progress=False)
    assert read_manifest(out)["splits"]["train"]["documents"] + read_manifest(out)["splits"]["val"]["documents"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_prepare_errors(tmp_path, small_docs):
    blank = [Document("  \n", "a"), Document("", "b")]
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(None, tmp_path / "o", documents=blank, progress=False)
    with pytest.raises(DataError, match="cannot hold out a validation split from 1 document"):
        prepare(None, tmp_path / "o", documents=small_docs[:1], progress=False)
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\)"):
        prepare(None, tmp_path / "o", documents=small_docs, val_fraction=1.0, progress=False)
    with pytest.raises(DataError, match="exactly one of"):
        prepare(["x.txt"], tmp_path / "o", documents=small_docs, progress=False)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("do not delete")
    with pytest.raises(DataError, match="refusing to replace it"):
        prepare(None, keep, documents=small_docs, bpe_vocab=280, progress=False)
    assert (keep / "notes.txt").read_text() == "do not delete"
    assert not (tmp_path / "o").exists()


def test_rerun_never_deletes_what_prepare_did_not_write(tmp_path, small_docs):
    out = tmp_path / "out"
    prepare(None, out, documents=small_docs[:10], bpe_vocab=280, progress=False)
    prepare(None, out, documents=small_docs[10:20], bpe_vocab=280, progress=False)  # its own files: replaced
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("the corpus, kept beside its tokens")
    (out / "run1").mkdir()
    with pytest.raises(DataError, match=r"holds a prepared dataset and 2 other entries \(notes.txt, run1\) that "
                                        "replacing it would delete"):
        prepare([out / "notes.txt"], out, bpe_vocab=280, val_fraction=0, progress=False)
    assert (out / "notes.txt").read_text() == "the corpus, kept beside its tokens" and (out / "run1").is_dir()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "notes.txt"} == before


def test_one_path_is_an_input_and_a_lone_surrogate_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta\n<|endoftext|>\ngamma delta\n")
    ids = [TokenDataset(prepare(p, tmp_path / f"o{i}", bpe_vocab=270, val_fraction=0, progress=False)).tokens.tolist()
           for i, p in enumerate((str(tmp_path / "a.txt"), tmp_path / "a.txt", [tmp_path / "a.txt"]))]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) > 4
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\udc80 half"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: the text holds an unpaired surrogate"):
        prepare([tmp_path / "s.jsonl"], tmp_path / "s", tokenizer=load_tokenizer("dolma2"), val_fraction=0,
                progress=False)
    with pytest.raises(DataError, match=r"document 1 \(b\): the text holds an unpaired surrogate"):
        prepare(None, tmp_path / "s", documents=[Document("ok", "a"), Document("x\ud800", "b")], bpe_vocab=270,
                val_fraction=0, progress=False)
    assert not (tmp_path / "s").exists()


def test_cli(tmp_path, capsys):
    for i, doc in enumerate(random_documents(6, seed=5)):
        (tmp_path / f"d{i}.txt").write_text(doc.text)
    out = tmp_path / "out"
    assert prepare_cli([str(tmp_path), "--out", str(out), "--bpe-vocab", "300", "--val-fraction", "0.2",
                        "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "train" in captured.out and "prepare:" in captured.err  # summary, and the progress line
    m = read_manifest(out)
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (5, 1)
    assert m["source"]["inputs"] == [str(tmp_path / f"d{i}.txt") for i in range(6)]
    assert prepare_cli([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 1
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert prepare_cli(["--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_prepare_bundled_builds_once_then_reuses(tmp_path):
    out = prepare_bundled(cache_dir=tmp_path, bpe_vocab=1024)
    assert out.parent == tmp_path / "data"
    m = read_manifest(out)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 42
    assert m["splits"]["val"]["documents"] == 2 and m["vocab_size"] == 1024
    stamp = os.stat(out / "manifest.json").st_mtime_ns
    assert prepare_bundled(cache_dir=tmp_path, bpe_vocab=1024) == out
    assert os.stat(out / "manifest.json").st_mtime_ns == stamp


def test_package_exports_functions_and_prepare_needs_no_torch():
    import subprocess
    import sys

    import olmo_hybrid.data

    assert olmo_hybrid.data.prepare is prepare_module.prepare  # the function, not the same-named module
    assert all(hasattr(olmo_hybrid.data, name) for name in olmo_hybrid.data.__all__)
    code = "import sys, olmo_hybrid.data, olmo_hybrid.cli.prepare; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
