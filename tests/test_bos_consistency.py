"""A tokenizer whose post-processor adds a BOS (Llama's ``"<s> $A"``): every place that encodes text gives the ids
transformers gives with the tokenizer saved beside the model (prepared documents, the lm-eval adapter, served
completion and chat prompts, chat templates), and lm-eval's HFLM conventions (no BOS inside a continuation)."""

import sys
import threading

import pytest
import tokenizers
from tokenizers import AddedToken, processors

from olmo_hybrid.data import TokenDataset, load_tokenizer, prepare
from olmo_hybrid.data.chat import ChatTemplate
from olmo_hybrid.data.corpus import Document
from olmo_hybrid.data.tokenizer import Tokenizer, train_bpe
from olmo_hybrid.errors import DataError

transformers = pytest.importorskip("transformers")

TEXTS = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
         "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;",
         "  leading spaces, a tab\tand <|endoftext|> as plain text"]
# Llama-3 style: the template writes the BOS itself, so nothing may add a second one.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": TEXTS[0]}]


def _llama_style_backend(post_processor: str = "<s> $A") -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer.from_str(train_bpe(TEXTS * 4, vocab_size=300).to_json())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")])
    backend.post_processor = processors.TemplateProcessing(
        single=post_processor, pair=f"{post_processor} $B:1",
        special_tokens=[(t, backend.token_to_id(t)) for t in ("<s>", "</s>")])
    return backend


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A bare tokenizer.json (no tokenizer_config.json) whose post-processor adds <s>, as Llama's does."""
    d = tmp_path_factory.mktemp("llama")
    _llama_style_backend().save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def saved(llama_dir, tmp_path_factory):
    """Ours loaded from the bare file, and transformers' AutoTokenizer on the directory ours saves (as every run,
    export and prepared dataset saves it)."""
    ours = load_tokenizer(llama_dir)
    d = tmp_path_factory.mktemp("saved")
    ours.save(d)
    return ours, transformers.AutoTokenizer.from_pretrained(d)


def test_encode_is_transformers_tokenizer_call(saved):
    ours, hf = saved
    bos = ours.backend.token_to_id("<s>")
    assert ours.bos_token_id == hf.bos_token_id == bos and hf.special_tokens_map["bos_token"] == "<s>"
    for text in TEXTS[:3] + [""]:
        assert ours.encode(text) == hf(text)["input_ids"] and ours.encode(text)[0] == bos
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.encode_batch(TEXTS[:3]) == hf(TEXTS[:3])["input_ids"]
    assert ours.encode(TEXTS[3]).count(ours.eos_token_id) == 0  # special-token text stays plain text
    assert ours.encode(TEXTS[3], allow_special=True, add_special_tokens=False).count(ours.eos_token_id) == 1
    assert load_tokenizer("dolma2").bos_token_id is None  # the released tokenizer adds nothing


def test_prepared_documents_are_transformers_ids_then_eos(llama_dir, tmp_path):
    docs = [Document(t, f"d{i}") for i, t in enumerate(TEXTS)]
    outs = [prepare(None, tmp_path / f"w{w}", documents=docs, tokenizer=str(llama_dir), val_fraction=0, workers=w,
                    progress=False) for w in (1, 2)]
    hf = transformers.AutoTokenizer.from_pretrained(outs[0])  # the tokenizer saved beside the data
    for out in outs:
        data = TokenDataset(out, "train")
        assert data.manifest["bos_token_id"] == hf.bos_token_id is not None
        for j, i in enumerate(data.source_index):
            # special-token text in a document is plain text (split_special_tokens), as prepare has always read it
            expected = hf(TEXTS[i], split_special_tokens=True)["input_ids"] + [hf.eos_token_id]
            assert data.document(j).tolist() == expected, (out, i)
    # a dataset prepared before documents carried the BOS is refused, not read as if it did
    manifest = outs[0] / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"bos_token_id"', '"unused"'))
    with pytest.raises(DataError, match="prepare the data again"):
        TokenDataset(outs[0], "train")


def test_chat_template_renders_one_bos_as_apply_chat_template(saved):
    ours, hf = saved
    chat = ChatTemplate(ours, TEMPLATE)
    for gen in (False, True):
        ids = chat.encode(MESSAGES, gen)
        assert ids == list(hf.apply_chat_template(MESSAGES, chat_template=TEMPLATE, add_generation_prompt=gen,
                                                  return_dict=False))
        assert ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1


def test_served_completion_and_chat_prompts_equal_transformers(saved):
    from olmo_hybrid.serve import protocol

    ours, hf = saved
    served = protocol.ServedModel("m", ours.vocab_size, 1000, ours, ChatTemplate(ours, TEMPLATE).prompt_ids,
                                    max_choices=2)
    batch = protocol.parse_completion({"prompt": TEXTS[:2], "max_tokens": 4}, served)
    assert [g.prompt_ids for g in batch.generations] == hf(TEXTS[:2])["input_ids"]
    given = protocol.parse_completion({"prompt": [5, 6, 7], "max_tokens": 4}, served)  # token ids are sent as given
    assert given.generations[0].prompt_ids == [5, 6, 7]
    chat = protocol.parse_chat({"messages": MESSAGES, "max_tokens": 4}, served)
    assert chat.generations[0].prompt_ids == list(hf.apply_chat_template(
        MESSAGES, chat_template=TEMPLATE, add_generation_prompt=True, return_dict=False))


def _inst(kind, args, i=0):
    from lm_eval.api.instance import Instance

    return Instance(kind, {}, args, i)


def test_lm_eval_adapter_token_ids_equal_hflm(saved):
    """The ids our adapter scores and generates from equal those lm-eval's HFLM builds with transformers' tokenizer:
    contexts start with the BOS, continuations never hold it, an empty context is the BOS alone."""
    pytest.importorskip("accelerate")  # lm-eval's HFLM imports it
    lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
    import torch

    from olmo_hybrid.config import ModelConfig
    from olmo_hybrid.eval.lm_eval_adapter import OlmoHybridLM
    from olmo_hybrid.model import HybridLM

    ours_tok, hf_tok = saved
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=ours_tok.padded_vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    hflm = lm_eval_hf.HFLM(pretrained=llama, tokenizer=hf_tok, batch_size=1, max_length=64, device="cpu")
    model = HybridLM(ModelConfig(vocab_size=ours_tok.padded_vocab_size(), d_model=32, n_layers=1, layer_pattern="A",
                                 n_heads=2, mlp_hidden=64, max_seq_len=64))
    ours = OlmoHybridLM(model=model, tokenizer=ours_tok, batch_size=1, max_length=64)
    assert ours.prefix_token_id == hflm.prefix_token_id == ours_tok.bos_token_id

    pairs = [("Shall I compare thee", " to a summer's day?"), ("Thou art more ", "lovely"), ("", "Rough winds")]
    seen = {}
    hflm._loglikelihood_tokens = lambda reqs, **kw: seen.setdefault("hf", [r[1:] for r in reqs]) and [(0.0, True)]
    ours.runner.loglikelihood = lambda reqs, **kw: seen.setdefault("ours", reqs) and [(0.0, True)]
    for name, lm in (("hf", hflm), ("ours", ours)):
        lm.loglikelihood([_inst("loglikelihood", p, i) for i, p in enumerate(pairs)])
    assert seen["ours"] == seen["hf"]
    bos = ours_tok.bos_token_id
    assert all(ctx[0] == bos and bos not in cont for ctx, cont in seen["ours"]) and seen["ours"][2][0] == [bos]

    requests = [_inst("generate_until", (t, {"max_gen_toks": 4, "until": ["\n"]}), i) for i, t in enumerate(TEXTS[:2])]
    prompts = []

    def hf_generate(context, max_length, stop, **kw):
        prompts.append(context[0].tolist())
        return torch.cat([context, torch.full((1, 1), hf_tok.eos_token_id)], dim=1)

    hflm._model_generate = hf_generate
    hflm.generate_until(requests)
    ours.runner.generate_greedy = lambda p, n, **kw: prompts.extend(p) or [[ours_tok.eos_token_id]] * len(p)
    ours.generate_until(requests)
    assert sorted(prompts[:2]) == sorted(prompts[2:]) == sorted(hf_tok(TEXTS[:2])["input_ids"])  # HFLM sorts


def test_a_post_processor_adding_more_than_a_bos_is_refused():
    for template in ("$A </s>", "<s> $A </s>", "<s> <s> $A"):
        with pytest.raises(DataError, match="post-processor"):
            Tokenizer(_llama_style_backend(template), "odd")


def test_encode_choices_are_per_call_and_thread_safe(saved):
    """``allow_special`` is an argument of each call: threads asking for both never see each other's choice
    (``encode_batch`` lets go of the GIL, so a setting flipped on a shared tokenizer leaks between threads)."""
    ours, _ = saved
    text = "a <|endoftext|> b " * 20
    plain, parsed = [ours.encode(text)] * 4, [ours.encode(text, allow_special=True)] * 4
    assert plain != parsed
    wrong = []

    def hammer(allow, expected):
        for _ in range(150):
            if ours.encode_batch([text] * 4, allow_special=allow) != expected:
                wrong.append(allow)

    threads = [threading.Thread(target=hammer, args=(a, e)) for a, e in ((False, plain), (True, parsed)) * 2]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a race shows within a fraction of a second
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong
