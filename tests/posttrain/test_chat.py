"""What post-training adds to chat templates: the mask of assistant tokens, the refusal of templates it cannot
mask, and the turn tokens added to a tokenizer without them (rendering itself: tests/data/test_chat.py)."""

from __future__ import annotations

import pytest
import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.data.chat import ChatTemplate, default_template
from olmo_hybrid.errors import DataError
from olmo_hybrid.posttrain.examples import encode_with_mask, tokenize_conversations
from olmo_hybrid.posttrain.source import init_token_rows, with_tokens
from data.test_chat import AUDIT_CONVERSATIONS, CHATML, CONVERSATIONS, OTHER_TEMPLATE, saved_tokenizer  # noqa: F401

CONVERSATION = [
    {"role": "user", "content": "first of: apple pear"}, {"role": "assistant", "content": "apple"},
    {"role": "user", "content": "and the last, café ☕?"}, {"role": "assistant", "content": " pear\n"},
    {"role": "environment", "content": "{\"ok\": true}"}]


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = with_tokens(tokenizer, ("<|im_start|>", "<|im_end|>"))
    tok.chat_template = default_template()
    return tok


def test_assistant_mask_covers_each_reply_and_its_end_of_turn(chat_tokenizer):
    chat = ChatTemplate(chat_tokenizer, default_template())
    messages = CONVERSATION
    ids, mask = encode_with_mask(chat, messages)
    # Built piece by piece: the markers are special tokens, so each piece tokenizes on its own.
    want_ids, want_mask = [], []
    for m in messages:
        head = chat_tokenizer.encode(f"<|im_start|>{m['role']}\n", allow_special=True)
        body = chat_tokenizer.encode(f"{m['content']}<|im_end|>\n", allow_special=True)
        want_ids += head + body
        want_mask += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    assert ids == want_ids and mask == want_mask
    _, from_third = encode_with_mask(chat, messages, first=2)  # DPO scores the response only
    assert sum(from_third) == len(chat_tokenizer.encode(" pear\n<|im_end|>\n", allow_special=True))


@pytest.mark.parametrize("template", ["ours", "chatml", "other"])
def test_trained_tokens_equal_transformers_assistant_mask(saved_tokenizer, template):
    """Where a template marks assistant text with {% generation %}, the trained tokens are exactly those of
    apply_chat_template(..., return_assistant_tokens_mask=True), tokens straddling a block's edge included
    (a reply starting with newlines merges with the header's); DPO's mask (from message `first` on) is its tail."""
    ours_tok, hf = saved_tokenizer
    source = {"ours": default_template(), "chatml": CHATML, "other": OTHER_TEMPLATE}[template]
    chat = ChatTemplate(ours_tok, source)
    assert chat.marks_generation
    for messages in AUDIT_CONVERSATIONS + CONVERSATIONS[1:]:
        if template == "chatml" and any(m["role"] == "environment" for m in messages):
            continue
        want = hf.apply_chat_template(messages, chat_template=source, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = encode_with_mask(chat, messages)
        assert ids == list(want["input_ids"]) and mask == [bool(x) for x in want["assistant_masks"]]
        assert any(mask)
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1
        _, tail = encode_with_mask(chat, messages, first=first)
        in_prompt = sum(hf.apply_chat_template(messages[:first], chat_template=source, return_dict=True,
                                               return_assistant_tokens_mask=True)["assistant_masks"])
        start = tail.index(True) if any(tail) else len(tail)
        assert tail == [False] * start + mask[start:] and sum(tail) == sum(mask) - in_prompt


def test_a_template_that_marks_no_assistant_token_is_an_error_naming_the_line(chat_tokenizer):
    marks_nothing = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if false %}{% generation %}x{% endgeneration %}{% endif %}")
    with pytest.raises(DataError, match="chat.jsonl line 7: the chat template marks no assistant token"):
        tokenize_conversations([("chat.jsonl line 7", {"messages": CONVERSATION})],
                               ChatTemplate(chat_tokenizer, marks_nothing), 256, "error")


def test_a_template_whose_prefix_renders_differently_is_refused(chat_tokenizer):
    closes_last_turn_with_eos = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                 "{% if loop.last %}{{ eos_token }}{% else %}<|im_end|>\n{% endif %}{% endfor %}")
    chat = ChatTemplate(chat_tokenizer, closes_last_turn_with_eos)
    with pytest.raises(DataError, match="assistant tokens cannot be located"):
        encode_with_mask(chat, CONVERSATION)


def test_new_token_rows_start_at_the_mean_and_the_vocabulary_grows(tokenizer):
    cfg = ModelConfig(vocab_size=300, d_model=8, n_layers=1, layer_pattern="G", n_heads=2, gdn_heads=2,
                      gdn_head_k=4, gdn_head_v=4, mlp_hidden=16)
    torch.manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(300, 8), "lm_head.weight": torch.randn(300, 8)}
    tok = with_tokens(tokenizer, ("<|im_start|>", "<|im_end|>"))
    assert [tok.backend.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")] == [300, 301]
    assert tok.encode("<|im_end|>", allow_special=True) == [301] and tok.name.endswith("+chat")
    grown, new_cfg = init_token_rows(state, cfg, 300, 2, tok.padded_vocab_size())
    assert new_cfg.vocab_size == 384
    for name, w in state.items():
        assert grown[name].shape == (384, 8)
        assert torch.equal(grown[name][:300], w)
        assert torch.allclose(grown[name][300:], w.mean(0).expand(84, 8))
