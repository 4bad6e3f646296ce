"""Chat templates: our rendering equals transformers' apply_chat_template token for token, where templates come
from, the checks on messages, and the template travelling in tokenizer_config.json."""

from __future__ import annotations

import pytest
import tokenizers

from olmo_hybrid.data import Tokenizer, load_tokenizer, train_bpe
from olmo_hybrid.data.chat import ChatTemplate, check_messages, default_template, resolve_template
from olmo_hybrid.errors import DataError

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

# Another: a system-prompt branch with set, loop.index and break, tojson of a string, raise_exception, eos_token.
FANCY = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
         "{% else %}{% set sys = 'default' %}{% set rest = messages %}{% endif %}"
         "<|system|>{{ sys | tojson }}\n"
         "{% for m in rest %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}"
         "{% endif %}{% if loop.index > 10 %}{% break %}{% endif %}"
         "<|{{ m['role'] }}|>\n  {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' else '' }}\n"
         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# A Llama-3-style template: bos_token first, header tokens, trimmed contents, strftime_now, loop.last.
LLAMA3 = ("{{- bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim %}"
          "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
          "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nYear: ' + strftime_now('%Y') + '\\n' + sys + '<|eot_id|>' }}"
          "{% for m in rest %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim "
          "+ '<|eot_id|>' }}{% if loop.last and m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# A Qwen/ChatML-style template: a default system turn, a tools branch (transformers passes tools=None),
# raise_exception, and {% generation %} around the reply and <|im_end|> but not the newline after it.
CHATML = """{%- if tools is not none %}{{ raise_exception('no tools here') }}{% endif %}
{%- if messages[0]['role'] != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message.role not in ('system', 'user', 'assistant') %}{{ raise_exception('Unsupported role ' + message.role) }}{% endif %}
    {%- if message.role == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message.content }}<|im_end|>{% endgeneration %}

    {%- else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# System turns, several turns, empty contents, text around the markers' edges, non-ASCII text.
AUDIT_CONVERSATIONS = [
    [{"role": "system", "content": "  Answer in one word.\n"}, {"role": "user", "content": "first of: fig lime"},
     {"role": "assistant", "content": "fig"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "again?"},
     {"role": "assistant", "content": "\n\nkiwi date "}],
    [{"role": "user", "content": "naïve café — 東京 👋🏽 e\u0301"}, {"role": "assistant", "content": " pear\n\n"},
     {"role": "user", "content": "and?", "name": None}, {"role": "assistant", "content": "ok 😀"}],
]


@pytest.fixture
def chat_tokenizer():
    """A 300-id BPE with the two turn markers added as special tokens, carrying our template."""
    bpe = train_bpe(["first of: apple pear plum fig lime kiwi date\n"] * 8 + ["the quick brown fox"] * 4,
                    vocab_size=300)
    backend = tokenizers.Tokenizer.from_str(bpe.to_json())
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in ("<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend, "bpe+chat", bpe.eos_token, bpe.pad_token, default_template())


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
            if gen:
                assert ours.prompt_ids(messages) == list(ids)
    assert ours.prompt_ids("Hi!") == ours.prompt_ids(CONVERSATIONS[0])  # a string is one user turn
    assert "<|im_start|>" in ours.render(CONVERSATIONS[0], True)
    assert ours.encode(CONVERSATIONS[0], True).count(chat_tokenizer.backend.token_to_id("<|im_start|>")) == \
        (2 if template == "ours" else 3)  # the markers are single ids
    assert ours.end_of_turn_id == chat_tokenizer.backend.token_to_id("<|im_end|>") == 301


@pytest.mark.parametrize("template", ["ours", "fancy"])
def test_dolma2_renders_as_transformers_renders(template):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer("dolma2")
    source = default_template() if template == "ours" else FANCY
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token)
    hf.chat_template = source
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 👋 <b>"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "2+2?"}]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert ChatTemplate(tok, source).prompt_ids(messages) == list(want)
    with pytest.raises(DataError, match="chat template: bad role"):
        ChatTemplate(tok, FANCY).render([{"role": "environment", "content": "x"}])


def test_bad_templates_and_messages_are_refused_by_name(chat_tokenizer):
    with pytest.raises(DataError, match="unknown role robot"):
        ChatTemplate(chat_tokenizer).render([{"role": "robot", "content": "x"}])
    with pytest.raises(DataError, match=r"does not parse \(line 1\)"):
        ChatTemplate(chat_tokenizer, "{% for m in messages %}")
    with pytest.raises(DataError, match="non-empty Jinja string"):
        ChatTemplate(chat_tokenizer, "  ")
    for bad, message in [([], r"request 3: 'messages' must be a non-empty list"),
                         ([{"role": "user"}], r"request 3: messages\[0\] must be an object with 'role' and 'content'"),
                         ([{"role": "tool", "content": "x"}], r"messages\[0\] has unknown role 'tool'"),
                         ([{"role": "user", "content": ["x"]}], r"messages\[0\]\.content must be a string, got list")]:
        with pytest.raises(DataError, match=message):
            check_messages(bad, "request 3")
    assert check_messages(CONVERSATIONS[2], "x") is CONVERSATIONS[2]


def test_template_sources_file_string_tokenizer_default(chat_tokenizer, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert resolve_template(str(f), chat_tokenizer) == "{{ messages[0]['content'] }}"
    assert resolve_template("{{ 'x' }}", chat_tokenizer) == "{{ 'x' }}"
    with pytest.raises(DataError, match="neither a file nor a Jinja template"):
        resolve_template(str(tmp_path / "missing.jinja"), chat_tokenizer)
    chat_tokenizer.chat_template = "{{ 'own' }}"
    assert resolve_template("", chat_tokenizer) == "{{ 'own' }}"
    assert ChatTemplate(chat_tokenizer).render(CONVERSATIONS[0]) == "own"
    chat_tokenizer.chat_template = None
    assert resolve_template("", chat_tokenizer) == default_template()
    assert ChatTemplate(chat_tokenizer).render(CONVERSATIONS[0]) == "<|im_start|>user\nHi!<|im_end|>\n"


def test_dolma2_carries_our_template_and_a_saved_template_reads_back(chat_tokenizer, tmp_path):
    dolma2 = load_tokenizer("dolma2")
    assert dolma2.chat_template == default_template()
    assert dolma2.backend.token_to_id("<|im_start|>") == 100264 and dolma2.backend.token_to_id("<|im_end|>") == 100265
    chat_tokenizer.save(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == default_template()
    (tmp_path / "chat_template.jinja").write_text("{{ 'file wins' }}")  # transformers' separate file
    assert load_tokenizer(tmp_path).chat_template == "{{ 'file wins' }}"


@pytest.fixture
def saved_tokenizer(tmp_path):
    """A BPE with the ChatML and Llama-3 markers as special tokens and a bos_token, saved and read back: by us
    (``load_tokenizer``) and by transformers (``AutoTokenizer``) from the same directory."""
    transformers = pytest.importorskip("transformers")
    bpe = train_bpe(["first of: apple pear plum fig lime kiwi date\n"] * 8 + ["the quick brown fox"] * 4,
                    vocab_size=300)
    backend = tokenizers.Tokenizer.from_str(bpe.to_json())
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in ("<|im_start|>", "<|im_end|>", *LLAMA3_TOKENS)])
    Tokenizer(backend, "bpe+chat", bpe.eos_token, bpe.pad_token, None, {"bos_token": "<|begin_of_text|>"}).save(tmp_path)
    return load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("template", ["ours", "llama3", "chatml", "fancy", "other"])
def test_every_template_renders_as_transformers_renders(saved_tokenizer, template):
    """Rendering and token ids equal apply_chat_template's for templates using bos_token, strftime_now, a
    `tools is not none` branch, raise_exception, loop.last and {% generation %}, on conversations with a system
    turn, several turns, empty contents, edge whitespace, non-ASCII text and a message key set to None."""
    ours_tok, hf = saved_tokenizer
    source = {"ours": default_template(), "llama3": LLAMA3, "chatml": CHATML, "fancy": FANCY,
              "other": OTHER_TEMPLATE}[template]
    assert ours_tok.special_tokens_map == hf.special_tokens_map  # the variables templates see
    chat = ChatTemplate(ours_tok, source)
    for messages in AUDIT_CONVERSATIONS + CONVERSATIONS[:2]:
        if template == "fancy" and len(messages) > 3:
            continue
        for gen in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=source)
            assert chat.render(messages, gen) == text
            ids = hf.apply_chat_template(messages, add_generation_prompt=gen, chat_template=source,
                                         return_dict=False)
            assert chat.encode(messages, gen) == list(ids)
    if template == "llama3":
        assert chat.encode(CONVERSATIONS[0])[0] == ours_tok.backend.token_to_id("<|begin_of_text|>")
    if template in ("ours", "chatml", "fancy"):  # their raise_exception on an unknown role
        with pytest.raises(DataError, match="chat template: .*(role|robot)"):
            chat.render([{"role": "robot", "content": "x"}] * 2)


def test_named_special_tokens_travel_with_the_tokenizer(saved_tokenizer, tmp_path):
    ours, _ = saved_tokenizer
    assert ours.named_tokens == {"bos_token": "<|begin_of_text|>"} and ours.bos_token_id is None  # never prepended
    ours.save(tmp_path / "again")
    assert load_tokenizer(tmp_path / "again").special_tokens_map == ours.special_tokens_map
    assert "bos_token" not in load_tokenizer("dolma2").special_tokens_map
