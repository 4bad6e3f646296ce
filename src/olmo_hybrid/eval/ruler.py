"""RULER-style long-context evaluation: greedy generation on native samples, RULER's scoring rules.

Scoring follows NVIDIA/RULER ``scripts/eval``: predictions are stripped, control characters become
newlines, and a reference counts when it occurs case-insensitively as a substring.
``string_match_all`` averages the fraction of references found (NIAH, VT, CWE, FWE);
``string_match_part`` gives 1 when any reference is found (QA). Scores are percentages; the RULER
average is the mean over the tasks run at each length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from olmo_hybrid.eval.haystack import HaystackText, encode_ids
from olmo_hybrid.eval.report import plot_score_vs_length, score_by_length_table, write_json_atomic
from olmo_hybrid.eval.ruler_tasks import SYNTHETIC_TASKS, TASKS, RulerGenerator, RulerSample

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def match_all(prediction: str, references: list[str]) -> float:
    """Fraction of references found in the prediction (RULER string_match_all, one sample)."""
    pred = postprocess(prediction).lower()
    return sum(r.lower() in pred for r in references) / len(references)


def match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is found in the prediction (RULER string_match_part, one sample)."""
    pred = postprocess(prediction).lower()
    return float(any(r.lower() in pred for r in references))


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    _check(predictions, references)
    return 100.0 * sum(map(match_all, predictions, references)) / len(predictions)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    _check(predictions, references)
    return 100.0 * sum(map(match_part, predictions, references)) / len(predictions)


def _check(predictions, references):
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equal, non-zero numbers of predictions ({len(predictions)}) and "
                         f"references ({len(references)})")
    if any(not refs for refs in references):
        raise ValueError("every sample needs at least one reference answer")


def score_task(task: str, predictions: list[str], references: list[list[str]]) -> float:
    metric = TASKS[task].metric
    return (string_match_all if metric == "all" else string_match_part)(predictions, references)


@dataclass
class RulerResult:
    scores: dict[str, dict[int, float]]  # task -> length -> score (0-100)
    average: dict[int, float]  # length -> mean over tasks
    haystack: str
    tokenizer: str
    num_samples: int
    predictions: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "suite": "ruler",
            "note": "RULER-style tasks generated natively; haystack/word-pool substitutes are listed under 'haystack'",
            "haystack": self.haystack,
            "tokenizer": self.tokenizer,
            "num_samples": self.num_samples,
            "scores": {t: {str(n): s for n, s in per.items()} for t, per in self.scores.items()},
            "ruler_average": {str(n): s for n, s in self.average.items()},
            "predictions": self.predictions,
        }

    def markdown(self) -> str:
        table = dict(self.scores)
        table["RULER average"] = self.average
        return score_by_length_table(table)

    def save(self, out_dir: str | Path, plot: bool = True) -> dict[str, Path | None]:
        out = Path(out_dir)
        paths = {"json": write_json_atomic(out / "ruler.json", self.to_json())}
        (out / "ruler.md").write_text(f"Haystack: {self.haystack}\n\n{self.markdown()}\n")
        paths["markdown"] = out / "ruler.md"
        if plot:
            curves = dict(self.scores)
            curves["RULER average"] = self.average
            paths["plot"] = plot_score_vs_length(curves, out / "ruler.png", "RULER-style score vs length",
                                                 "score (%)", highlight="RULER average")
        return paths


def run_ruler(runner, tokenizer, haystack: HaystackText, tasks: list[str] | None = None,
              lengths: list[int] = (1024, 2048, 4096), num_samples: int = 20, seed: int = 42,
              qa_items=None, keep_predictions: int = 3, max_new_tokens: int | None = None) -> RulerResult:
    """Generate samples, decode greedily with ``runner`` (an ``EvalRunner``), score per task and length.

    ``max_new_tokens`` caps decoding below RULER's tokens_to_generate (answers are short; saves time).
    """
    tasks = list(tasks or SYNTHETIC_TASKS)
    for t in tasks:
        if t not in TASKS:
            raise KeyError(f"unknown RULER task '{t}' (known: {', '.join(TASKS)})")
    gen = RulerGenerator(tokenizer, haystack, seed=seed, qa_items=qa_items)
    eos = getattr(tokenizer, "eos_token_id", None)
    scores: dict[str, dict[int, float]] = {t: {} for t in tasks}
    kept: list[dict] = []
    for length in lengths:
        for task in tasks:
            samples: list[RulerSample] = gen.samples(task, length, num_samples)
            prompts = [encode_ids(tokenizer, s.prompt) for s in samples]
            budget = min(TASKS[task].tokens_to_generate, max_new_tokens or TASKS[task].tokens_to_generate)
            new = runner.generate_greedy(prompts, budget, eos_token_id=eos,
                                         desc=f"ruler {task}@{length}")
            preds = [tokenizer.decode(toks) for toks in new]
            scores[task][length] = score_task(task, preds, [s.outputs for s in samples])
            kept += [{"task": task, "length": length, "index": s.index, "prediction": p, "outputs": s.outputs}
                     for s, p in list(zip(samples, preds))[:keep_predictions]]
    average = {n: sum(scores[t][n] for t in tasks) / len(tasks) for n in lengths}
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    return RulerResult(scores, average, haystack.description, str(name), num_samples, kept)
