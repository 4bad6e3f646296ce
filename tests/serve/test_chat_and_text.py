"""The tokens that end a chat reply; streamed text pieces add up to the decoded text. (Chat rendering itself, shared
with post-training and generate --chat: tests/data/test_chat.py.)"""

import json
import random

from olmo_hybrid.data.chat import default_template
from olmo_hybrid.data.tokenizer import load_tokenizer
from olmo_hybrid.serve.chat import end_token_ids
from olmo_hybrid.serve.detokenize import TextStream


def test_end_tokens_come_from_tokenizer_generation_config_and_template(tmp_path):
    tok = load_tokenizer("dolma2")
    assert end_token_ids(tok, "{{ messages }}") == {tok.eos_token_id}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    im_end = tok.encode("<|im_end|>", allow_special=True)[0]
    assert end_token_ids(tok, default_template(), tmp_path) == {tok.eos_token_id, 7, 9, im_end}


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
