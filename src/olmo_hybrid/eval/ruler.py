"""RULER-style long-context evaluation: greedy generation on native samples, RULER's scoring rules.

Scoring follows NVIDIA/RULER ``scripts/eval``: predictions are stripped, control characters become
newlines, and a reference counts when it occurs case-insensitively as a substring.
``string_match_all`` averages the fraction of references found (NIAH, VT, CWE, FWE);
``string_match_part`` gives 1 when any reference is found (QA). Scores are percentages rounded to two
decimals, as RULER's metric functions return them; the RULER average is the (unrounded) mean of those task
scores at each length (a task that cannot be built at a length is skipped there, with its reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from olmo_hybrid.eval.haystack import HaystackText, encode_ids
from olmo_hybrid.eval.report import plot_score_vs_length, score_by_length_table, write_json_atomic
from olmo_hybrid.eval.ruler_tasks import SYNTHETIC_TASKS, TASKS, RulerGenerator, RulerSample
from olmo_hybrid.fsio import atomic_write_text

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
    return round(100.0 * sum(map(match_all, predictions, references)) / len(predictions), 2)  # RULER rounds


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    _check(predictions, references)
    return round(100.0 * sum(map(match_part, predictions, references)) / len(predictions), 2)


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
    average: dict[int, float]  # length -> mean over the tasks scored at that length
    haystack: str
    tokenizer: str
    num_samples: int
    predictions: list[dict] = field(default_factory=list)
    skipped: dict[str, dict[int, str]] = field(default_factory=dict)  # task -> length -> why it could not be built
    complete: bool = True  # False while tasks are still running (a partial result written as they finish)

    def to_json(self) -> dict:
        return {
            "suite": "ruler",
            "note": "RULER-style tasks generated natively; haystack/word-pool substitutes are listed under 'haystack'",
            "haystack": self.haystack,
            "tokenizer": self.tokenizer,
            "num_samples": self.num_samples,
            "complete": self.complete,
            "scores": {t: {str(n): s for n, s in per.items()} for t, per in self.scores.items()},
            "ruler_average": {str(n): s for n, s in self.average.items()},
            "skipped": {t: {str(n): why for n, why in per.items()} for t, per in self.skipped.items() if per},
            "predictions": self.predictions,
        }

    def table(self) -> dict[str, dict[int, float | str]]:
        """task -> length -> score, or "skipped" where the task could not be built; plus the average row."""
        rows: dict[str, dict[int, float | str]] = {}
        for task in dict.fromkeys([*self.scores, *self.skipped]):
            rows[task] = {**{n: "skipped" for n in self.skipped.get(task, {})}, **self.scores.get(task, {})}
        rows["RULER average"] = dict(self.average)
        return rows

    def markdown(self) -> str:
        text = score_by_length_table(self.table())
        notes = [f"- {t} at {n}: {why}" for t, per in self.skipped.items() for n, why in per.items()]
        if notes:
            text += "\n\nSkipped (the average at a length is over the tasks scored there):\n" + "\n".join(notes)
        return text

    def save(self, out_dir: str | Path, plot: bool = True) -> dict[str, Path | None]:
        out = Path(out_dir)
        paths = {"json": write_json_atomic(out / "ruler.json", self.to_json())}
        paths["markdown"] = atomic_write_text(out / "ruler.md", f"Haystack: {self.haystack}\n\n{self.markdown()}\n")
        if plot:
            curves = dict(self.scores)
            curves["RULER average"] = self.average
            paths["plot"] = plot_score_vs_length(curves, out / "ruler.png", "RULER-style score vs length",
                                                 "score (%)", highlight="RULER average")
        return paths


def run_ruler(runner, tokenizer, haystack: HaystackText, tasks: list[str] | None = None,
              lengths: list[int] = (1024, 2048, 4096), num_samples: int = 20, seed: int = 42,
              qa_items=None, keep_predictions: int = 3, max_new_tokens: int | None = None,
              on_update=None) -> RulerResult:
    """Generate samples, decode greedily with ``runner`` (an ``EvalRunner``), score per task and length.

    ``max_new_tokens`` caps decoding below RULER's tokens_to_generate (answers are short; saves time). A task whose
    samples cannot be built at a length (too short for its template, or its needles too coarse to land within 1% of
    the length with this tokenizer) is recorded in ``skipped`` with the reason and the run goes on. ``on_update``
    is called with the partial result (``complete=False``) after every task and length, to save it.
    """
    tasks = list(tasks or SYNTHETIC_TASKS)
    for t in tasks:
        if t not in TASKS:
            raise KeyError(f"unknown RULER task '{t}' (known: {', '.join(TASKS)})")
    gen = RulerGenerator(tokenizer, haystack, seed=seed, qa_items=qa_items)
    eos = getattr(tokenizer, "eos_token_id", None)
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    result = RulerResult({t: {} for t in tasks}, {}, haystack.description, str(name), num_samples, complete=False)
    for length in lengths:
        for task in tasks:
            try:
                samples: list[RulerSample] = gen.samples(task, length, num_samples)
            except ValueError as e:
                result.skipped.setdefault(task, {})[length] = str(e)
            else:
                prompts = [encode_ids(tokenizer, s.prompt) for s in samples]
                budget = min(TASKS[task].tokens_to_generate, max_new_tokens or TASKS[task].tokens_to_generate)
                new = runner.generate_greedy(prompts, budget, eos_token_id=eos, desc=f"ruler {task}@{length}")
                preds = [tokenizer.decode(toks) for toks in new]
                result.scores[task][length] = score_task(task, preds, [s.outputs for s in samples])
                result.predictions += [{"task": task, "length": length, "index": s.index, "prediction": p,
                                        "outputs": s.outputs} for s, p in list(zip(samples, preds))[:keep_predictions]]
            result.average = averages(result.scores)
            if on_update is not None:
                on_update(result)
    result.complete = True
    return result


def averages(scores: dict[str, dict[int, float]]) -> dict[int, float]:
    """length -> mean score over the tasks scored at that length."""
    lengths = sorted({n for per in scores.values() for n in per})
    return {n: sum(per[n] for per in scores.values() if n in per) / sum(n in per for per in scores.values())
            for n in lengths}
