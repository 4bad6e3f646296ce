"""Evaluation: RULER-style long context, synthetic probes, multiple choice, bits per byte, lm-eval adapter.

Public API (import from ``olmo_hybrid.eval``; the command line is ``olmo-hybrid eval``):

Model access (``runner.py``; checkpoints load with ``olmo_hybrid.checkpoint.load_model_and_tokenizer``)
    EvalRunner(model, batch_size, max_length, prefix_id)   .loglikelihood(pairs), .rolling_nll(ids, stride),
                                                           .generate_greedy(prompts, max_new_tokens, eos_token_id)
RULER (``ruler_tasks.py``, ``ruler.py``, ``haystack.py``)
    TASKS, SYNTHETIC_TASKS; RulerGenerator(tokenizer, haystack).samples(task, max_length, n) -> [RulerSample]
    load_haystack("bundled" | path) -> HaystackText
    run_ruler(runner, tokenizer, haystack, tasks, lengths, num_samples, on_update=) -> RulerResult (.save(dir));
        a task that cannot be built at a length lands in RulerResult.skipped with its reason
    string_match_all, string_match_part                    RULER's scoring rules (percent)
Probes (``probe_tasks.py``, ``probes.py``; ``python -m olmo_hybrid.eval.probes``)
    PROBE_TASKS (parity, modular, s5, mqar); ProbeConfig; run_probe(cfg, variants); probe_checkpoint(model, cfg)
Multiple choice and bits per byte (``mc.py``, ``packaged_data.py``)
    load_questions("arc_easy:rc_5shot" | "mmlu:mc_5shot" | ...); score_questions(runner, tok, qs) -> acc, acc_norm (lm-eval), acc_per_char (OLMES)
    bits_per_byte_of_texts(runner, tok, texts)
lm-evaluation-harness (``lm_eval_adapter.py``, needs ``pip install lm-eval``; not imported here)
    OlmoHybridLM(model=, tokenizer=) or OlmoHybridLM(pretrained=DIR); registered as "olmo-hybrid"
"""

import importlib

# name -> module; loaded on first use so ``python -m olmo_hybrid.eval.probes`` and the CLI import only
# what they need.
_EXPORTS = {
    "HaystackText": "haystack", "load_haystack": "haystack",
    "MCQuestion": "mc", "bits_per_byte_of_texts": "mc", "load_questions": "mc", "score_questions": "mc",
    "MODEL_VARIANTS": "probes", "ProbeConfig": "probes", "probe_checkpoint": "probes", "run_probe": "probes",
    "RulerResult": "ruler", "run_ruler": "ruler", "string_match_all": "ruler", "string_match_part": "ruler",
    "SYNTHETIC_TASKS": "ruler_tasks", "TASKS": "ruler_tasks", "RulerGenerator": "ruler_tasks",
    "RulerSample": "ruler_tasks",
    "EvalRunner": "runner",
}
__all__ = [
    "MODEL_VARIANTS",
    "PROBE_TASKS",
    "SYNTHETIC_TASKS",
    "TASKS",
    "HaystackText",
    "MCQuestion",
    "EvalRunner",
    "ProbeConfig",
    "RulerGenerator",
    "RulerResult",
    "RulerSample",
    "bits_per_byte_of_texts",
    "load_haystack",
    "load_questions",
    "probe_checkpoint",
    "run_probe",
    "run_ruler",
    "score_questions",
    "string_match_all",
    "string_match_part",
]


def __getattr__(name: str):
    if name == "PROBE_TASKS":
        return importlib.import_module("olmo_hybrid.eval.probe_tasks").TASKS
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"olmo_hybrid.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'olmo_hybrid.eval' has no attribute '{name}'")
