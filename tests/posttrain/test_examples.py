"""Reading conversations and pairs: the accepted forms, truncation as documented, and errors naming the line."""

from __future__ import annotations

import pytest

from olmo_hybrid.data.chat import ChatTemplate, default_template
from olmo_hybrid.errors import DataError
from olmo_hybrid.posttrain.examples import read_records, split_pair, tokenize_conversations, tokenize_pairs
from olmo_hybrid.posttrain.source import with_tokens

from .conftest import conversation, write_jsonl

U = {"role": "user", "content": "first of: fig lime"}
A = {"role": "assistant", "content": "fig"}


@pytest.fixture(scope="module")
def chat(tokenizer):
    tok = with_tokens(tokenizer, ("<|im_start|>", "<|im_end|>"))
    return ChatTemplate(tok, default_template())


def records(tmp_path, rows, raw: str = ""):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, rows)
    if raw:
        path.write_text(path.read_text() + raw)
    return list(read_records(str(path)))


@pytest.mark.parametrize("bad, message", [
    ({"messages": [U]}, r"data\.jsonl line 2: the conversation has no assistant turn"),
    ({"messages": [{"role": "robot", "content": "x"}, A]}, r"line 2: messages\[0\] has unknown role 'robot'"),
    ({"messages": []}, r"line 2: 'messages' must be a non-empty list"),
    ({"messages": [U, {"role": "assistant", "content": 3}]}, r"line 2: messages\[1\]\.content must be a string"),
    ({"text": "no messages"}, r"line 2: 'messages' must be a non-empty list"),
])
def test_bad_conversations_name_the_line(tmp_path, chat, bad, message):
    with pytest.raises(DataError, match=message):
        tokenize_conversations(records(tmp_path, [conversation(0), bad]), chat, 256, "truncate")


def test_bad_json_names_the_line(tmp_path):
    with pytest.raises(DataError, match=r"data\.jsonl line 2: invalid JSON"):
        records(tmp_path, [conversation(0)], raw="{oops\n")
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        records(tmp_path, [conversation(0)], raw="[1, 2]\n")


def test_too_long_conversations_are_truncated_dropped_or_refused_as_asked(tmp_path, chat):
    long = {"messages": [U, {"role": "assistant", "content": "fig " * 40}]}
    rows = records(tmp_path, [conversation(0), long, conversation(1)])
    n_long = len(chat.encode(long["messages"]))
    limit = n_long - 10
    seqs, report = tokenize_conversations(rows, chat, limit, "truncate")
    assert [len(s.ids) for s in seqs][1] == limit and len(seqs) == 3
    assert report.truncated == ["data.jsonl line 2"] and not report.dropped
    assert "1 truncated (longer than" in report.describe("conversations", limit)
    seqs, report = tokenize_conversations(rows, chat, limit, "drop")
    assert len(seqs) == 2 and report.dropped == ["data.jsonl line 2"]
    with pytest.raises(DataError, match=rf"line 2: the conversation has {n_long} tokens, more than the limit of {limit}"):
        tokenize_conversations(rows, chat, limit, "error")
    # Cut before the assistant turn: nothing left to train, so it is dropped (and counted).
    seqs, report = tokenize_conversations(rows, chat, 8, "truncate")
    assert len(report.dropped) == 3 and not seqs


def test_pair_forms_and_errors(tmp_path, chat):
    assert split_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, "x") == (
        [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
        [{"role": "assistant", "content": "b"}])
    # Hub style: chosen / rejected repeat the prompt; or no prompt and whole conversations.
    full = split_pair({"prompt": [U], "chosen": [U, A], "rejected": [U, {**A, "content": "lime"}]}, "x")
    assert split_pair({"prompt": "first of: fig lime", "chosen": [A], "rejected": "lime"}, "x") == full
    assert full == split_pair({"chosen": [U, A], "rejected": [U, {**A, "content": "lime"}]}, "x") == \
        ([U], [A], [{**A, "content": "lime"}])
    # Only one of them repeats the prompt: it is still the prompt, not part of that response.
    assert split_pair({"prompt": [U], "chosen": [U, A], "rejected": "lime"}, "x") == full
    for bad, message in [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "line 2: 'chosen' and 'rejected' are identical"),
        ({"prompt": [U], "chosen": [U, A], "rejected": [A]}, "line 2: 'chosen' and 'rejected' are identical"),
        ({"chosen": "a", "rejected": "b"}, "line 2: without 'prompt' or 'messages'"),
        ({"prompt": "q", "rejected": "b"}, "line 2: missing 'chosen'"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "line 2: 'prompt' must be a non-empty list"),
        ({"prompt": "q", "chosen": "a", "rejected": [{"role": "critic", "content": "b"}]},
         r"line 2: rejected\[0\] has unknown role 'critic'"),
        ({"prompt": "q", "chosen": {"role": "assistant"}, "rejected": "b"}, r"line 2: chosen\[0\] must be an object"),
        ({"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
         "line 2: the 'rejected' response must end with an assistant turn"),
        ({"prompt": "q", "chosen": "a"}, "line 2: missing 'rejected'"),
        ({"prompt": "q", "chosen": [U], "rejected": "b"}, "line 2: the 'chosen' response must end with an assistant"),
        ({"chosen": [A], "rejected": [{**A, "content": "b"}]}, "line 2: without 'prompt' or 'messages'"),
        ({"messages": [{"role": "moderator", "content": "q"}], "chosen": "a", "rejected": "b"},
         r"line 2: messages\[0\] has unknown role 'moderator'"),
    ]:
        with pytest.raises(DataError, match=message):
            tokenize_pairs(records(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad]), chat, 256, "error")


def test_long_pairs_cut_the_longer_response_first(tmp_path, chat):
    rows = records(tmp_path, [{"prompt": "q", "chosen": "fig " * 30, "rejected": "lime"}])
    (pair,), _ = tokenize_pairs(rows, chat, 10_000, "error")
    c, r = len(pair.chosen.ids), len(pair.rejected.ids)
    (cut,), report = tokenize_pairs(rows, chat, c + r - 5, "truncate")
    assert (len(cut.chosen.ids), len(cut.rejected.ids)) == (c - 5, r) and report.truncated == ["data.jsonl line 1"]
    with pytest.raises(DataError, match=r"line 1: the pair \(chosen \+ rejected\) has"):
        tokenize_pairs(rows, chat, c + r - 5, "error")
