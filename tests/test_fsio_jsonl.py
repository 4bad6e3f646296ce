"""JSON-lines results files (olmo_hybrid.fsio): a torn last line is dropped and cut; a whole one is kept."""

from __future__ import annotations

import json

from olmo_hybrid.fsio import append_jsonl, read_jsonl


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    """A file whose last record lacks its newline (edited by hand, e.g. a line removed as an error message
    suggests) lost that record: readers dropped it as torn and the next append cut it off, so a ladder trained
    the point again. Now it is read, and the append ends it with a newline first."""
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b": {"c": [1, 2]}}')
    notes = []
    assert read_jsonl(path, log=notes.append) == [(1, {"a": 1}), (2, {"a": 2, "b": {"c": [1, 2]}})] and not notes
    append_jsonl(path, {"a": 3}, log=notes.append)
    assert path.read_text() == '{"a": 1}\n{"a": 2, "b": {"c": [1, 2]}}\n{"a": 3}\n' and not notes


def test_a_torn_last_line_is_dropped_and_cut(tmp_path):
    path = tmp_path / "results.jsonl"
    whole = json.dumps({"a": 2, "b": {"c": 1}})
    for torn in (whole[:-1], whole[:10], "[1, 2]", "3"):  # every proper prefix of an object, and non-objects
        path.write_text('{"a": 1}\n' + torn)
        notes = []
        assert read_jsonl(path, log=notes.append) == [(1, {"a": 1})]
        assert notes == [f"note: {path} line 2 is incomplete (a writer was killed mid-line); ignoring it"]
        append_jsonl(path, {"a": 3}, log=notes.append)
        assert path.read_text() == '{"a": 1}\n{"a": 3}\n' and "dropping an incomplete last line" in notes[-1]
