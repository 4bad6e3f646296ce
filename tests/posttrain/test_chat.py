"""Chat templates: our rendering equals transformers' apply_chat_template token for token, assistant masks,
where templates come from, and the template travelling in tokenizer_config.json."""

from __future__ import annotations

import pytest
import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.data import DataError, load_tokenizer
from olmo_hybrid.posttrain.chat import ChatTemplate, default_template, resolve_template
from olmo_hybrid.posttrain.source import init_token_rows, with_tokens

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "first of: fig lime"},
     {"role": "assistant", "content": "fig"}],
    [{"role": "user", "content": "first of: apple pear"}, {"role": "assistant", "content": "apple"},
     {"role": "user", "content": "and the last, café ☕?"}, {"role": "assistant", "content": " pear\n"},
     {"role": "environment", "content": "{\"ok\": true}"}],
]

# A user template using what real templates use: a default system turn, loop.last, the eos_token variable,
# tojson, whitespace control and a {% generation %} block.
OTHER_TEMPLATE = """{% if messages[0]['role'] != 'system' %}<|im_start|>system
Default system, {{ {'k': 'v<>'} | tojson }}<|im_end|>
{% endif %}
{% for message in messages %}
    {%- if message['role'] == 'assistant' -%}
<|im_start|>assistant
{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}

    {%- else -%}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {%- endif %}
{% if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = with_tokens(tokenizer, ("<|im_start|>", "<|im_end|>"))
    tok.chat_template = default_template()
    return tok


@pytest.mark.parametrize("template", ["ours", "other"])
def test_rendered_tokens_equal_transformers_apply_chat_template(chat_tokenizer, tmp_path, template):
    transformers = pytest.importorskip("transformers")
    chat_tokenizer.chat_template = default_template() if template == "ours" else OTHER_TEMPLATE
    chat_tokenizer.save(tmp_path)  # tokenizer.json + tokenizer_config.json with the template
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.chat_template == chat_tokenizer.chat_template
    ours = ChatTemplate(chat_tokenizer)
    for messages in CONVERSATIONS:
        for gen in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.render(messages, gen) == text
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            assert ours.encode(messages, gen) == list(ids)
    assert "<|im_start|>" in ours.render(CONVERSATIONS[0], True)
    assert ours.encode(CONVERSATIONS[0], True).count(chat_tokenizer.backend.token_to_id("<|im_start|>")) == \
        (2 if template == "ours" else 3)  # the markers are single ids


def test_assistant_mask_covers_each_reply_and_its_end_of_turn(chat_tokenizer):
    chat = ChatTemplate(chat_tokenizer, default_template())
    messages = CONVERSATIONS[2]
    ids, mask = chat.encode_with_mask(messages)
    # Built piece by piece: the markers are special tokens, so each piece tokenizes on its own.
    want_ids, want_mask = [], []
    for m in messages:
        head = chat_tokenizer.encode(f"<|im_start|>{m['role']}\n", allow_special=True)
        body = chat_tokenizer.encode(f"{m['content']}<|im_end|>\n", allow_special=True)
        want_ids += head + body
        want_mask += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    assert ids == want_ids and mask == want_mask
    _, from_third = chat.encode_with_mask(messages, first=2)  # DPO scores the response only
    assert sum(from_third) == len(chat_tokenizer.encode(" pear\n<|im_end|>\n", allow_special=True))


def test_a_template_whose_prefix_renders_differently_is_refused(chat_tokenizer):
    closes_last_turn_with_eos = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                 "{% if loop.last %}{{ eos_token }}{% else %}<|im_end|>\n{% endif %}{% endfor %}")
    chat = ChatTemplate(chat_tokenizer, closes_last_turn_with_eos)
    with pytest.raises(DataError, match="assistant tokens cannot be located"):
        chat.encode_with_mask(CONVERSATIONS[2])
    with pytest.raises(DataError, match="unknown role robot"):
        ChatTemplate(chat_tokenizer).render([{"role": "robot", "content": "x"}])
    with pytest.raises(DataError, match="does not parse"):
        ChatTemplate(chat_tokenizer, "{% for m in messages %}")


def test_template_sources_file_string_tokenizer_default(chat_tokenizer, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert resolve_template(str(f), chat_tokenizer) == "{{ messages[0]['content'] }}"
    assert resolve_template("{{ 'x' }}", chat_tokenizer) == "{{ 'x' }}"
    with pytest.raises(DataError, match="neither a file nor a Jinja template"):
        resolve_template(str(tmp_path / "missing.jinja"), chat_tokenizer)
    chat_tokenizer.chat_template = "{{ 'own' }}"
    assert resolve_template("", chat_tokenizer) == "{{ 'own' }}"
    chat_tokenizer.chat_template = None
    assert resolve_template("", chat_tokenizer) == default_template()


def test_dolma2_carries_our_template_and_a_saved_template_reads_back(chat_tokenizer, tmp_path):
    dolma2 = load_tokenizer("dolma2")
    assert dolma2.chat_template == default_template()
    assert dolma2.backend.token_to_id("<|im_start|>") == 100264 and dolma2.backend.token_to_id("<|im_end|>") == 100265
    chat_tokenizer.save(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == default_template()
    (tmp_path / "chat_template.jinja").write_text("{{ 'file wins' }}")  # transformers' separate file
    assert load_tokenizer(tmp_path).chat_template == "{{ 'file wins' }}"


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
