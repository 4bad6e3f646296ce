"""Chat templates render as transformers' apply_chat_template; streamed text pieces add up to the decoded text."""

import json
import random

import pytest

from olmo_hybrid.data.tokenizer import load_tokenizer
from olmo_hybrid.serve.chat import (DEFAULT_CHAT_TEMPLATE, compile_template, end_token_ids, read_chat_template,
                                    render_chat)
from olmo_hybrid.serve.detokenize import TextStream

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 👋 <b>"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "2+2?"}]
# A template with the features real ones use: a system-prompt branch, loop controls, tojson, raise_exception.
FANCY = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
         "{% else %}{% set sys = 'default' %}{% set rest = messages %}{% endif %}"
         "<|system|>{{ sys | tojson }}\n"
         "{% for m in rest %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}"
         "{% endif %}{% if loop.index > 10 %}{% break %}{% endif %}"
         "<|{{ m['role'] }}|>\n  {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' else '' }}\n"
         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, FANCY], ids=["chatml", "fancy"])
def test_render_chat_equals_transformers_apply_chat_template(template, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer("dolma2")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token)
    hf.chat_template = template
    want = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    if not isinstance(want, list):  # some versions return a BatchEncoding
        want = want["input_ids"]
    assert render_chat(MESSAGES, tok, compile_template(template)) == list(want)
    # The checkpoint's template is read from tokenizer_config.json (or chat_template.jinja).
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert read_chat_template(tmp_path) == template
    (tmp_path / "chat_template.jinja").write_text(FANCY)
    assert read_chat_template(tmp_path) == FANCY


def test_end_tokens_come_from_tokenizer_generation_config_and_template(tmp_path):
    tok = load_tokenizer("dolma2")
    assert end_token_ids(tok, "{{ messages }}") == {tok.eos_token_id}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    im_end = tok.encode("<|im_end|>", allow_special=True)[0]
    assert end_token_ids(tok, DEFAULT_CHAT_TEMPLATE, tmp_path) == {tok.eos_token_id, 7, 9, im_end}
    with pytest.raises(Exception, match="bad role"):
        render_chat([{"role": "tool", "content": "x"}], tok, compile_template(FANCY))


def test_streamed_pieces_add_up_to_the_decoded_text():
    tok = load_tokenizer("dolma2")
    text = "Grüße, 世界! 👋🏽 naïve café — “quotes” ok\n\tdone"
    ids = tok.encode(text)
    rng = random.Random(0)
    garbage = [rng.randrange(tok.vocab_size) for _ in range(60)]  # random ids: invalid byte sequences included
    for seq in (ids, garbage, ids + garbage + ids):
        stream, out = TextStream(tok), ""
        for t in seq:
            out += stream.release()
            stream.push(t)
            assert tok.decode(seq).startswith(out)
        out += stream.finish(tok.decode(seq))
        assert out == tok.decode(seq)


def test_holdback_never_releases_a_stop_string():
    tok = load_tokenizer("dolma2")
    ids = tok.encode("one two three four five six")
    full = tok.decode(ids)
    stop = " four"
    stream, out = TextStream(tok, holdback=len(stop) - 1), ""
    for t in ids:
        out += stream.release()
        assert stop not in out and full.startswith(out)
        stream.push(t)
        if stop in tok.decode(stream.ids):
            break  # the engine ends the request here; its text is cut before the stop string
    out += stream.finish(full[:full.find(stop)])
    assert out == "one two three"
