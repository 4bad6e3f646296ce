"""Every repository path that the docs, comments or docstrings name exists.

Scanned: README.md and every ``.md`` under docs/ (each relative link target, and every word of the text, code
spans included); comments and docstrings of the Python files under src/ and benchmarks/; comments of the shell
scripts under benchmarks/. Only words that look like repository paths are checked: those starting with ``src/``,
``tests/``, ``benchmarks/``, ``docs/`` or ``.ci/``, and those with a slash that end in ``.py``, ``.md``, ``.json``
or ``.sh``. A name resolves against the repository root, ``src/``, ``src/olmo_hybrid/`` or a folder above the file
that names it (docs write ``model/engine.py`` for ``src/olmo_hybrid/model/engine.py``); ``*`` and ``{a,b}`` /
``{1..4}`` patterns need one match; ``path::name`` and ``path:line`` are checked as ``path``. Placeholders
(``OUT/x.md``, ``$OUT/x``, ``~/...``, ``<dir>/...``) and URLs are skipped, as are the results in ``OUTPUTS`` that a
command writes on its first run; a path that leaves the repository (``../elsewhere/notes.md``) is an error.
"""

from __future__ import annotations

import ast
import bisect
import functools
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("src/", "tests/", "benchmarks/", "docs/", ".ci/")
SUFFIXES = (".py", ".md", ".json", ".sh")
# A run of path characters (braces and globs included) with a slash in it: every repository path named has one.
WORD = re.compile(r"[A-Za-z0-9_.$~<>{}*,:-]*/[A-Za-z0-9_.$~<>{}*,/:-]*")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Results that committed commands write on their first run, named by the docs that say where they land.
OUTPUTS = {
    "benchmarks/results/longctx_experiment.jsonl": "olmo-hybrid longctx-experiment benchmarks/longctx_experiment.json",
    "benchmarks/results/ladder_micro/results.jsonl": "bash benchmarks/ladder_micro.sh run (copied back from $OUT)",
    "docs/scaling": "olmo-hybrid scaling fit ... --out docs/scaling (the micro-ladder's plots)",
}


def _looks_like_repo_path(word: str) -> bool:
    return word.startswith(PREFIXES) or ("/" in word and word.endswith(SUFFIXES))


def _expand_braces(word: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", word)
    if not m:
        return [word]
    body = m.group(1)
    if (r := re.fullmatch(r"(\d+)\.\.(\d+)", body)) is not None:
        options = [str(i) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
    else:
        options = body.split(",")
    return [w for o in options for w in _expand_braces(word[:m.start()] + o + word[m.end():])]


def _clean(word: str) -> str | None:
    """The path a word names, or None when it names no repository path (placeholders, URLs, prose)."""
    word = word.lstrip("('\"").rstrip(".,;:)'\"")
    if "://" in word or not word or word.startswith(("$", "~", "<", "/")) or "..." in word.replace("../", ""):
        return None
    word = re.sub(r"::.*$", "", word)  # pytest node ids and qualified names
    word = re.sub(r":\d+(-\d+)?$", "", word)  # path:line
    word = word.rstrip(".,;:")
    first = word.split("/", 1)[0]
    if first.isupper() or ("{" not in word and "," in word):  # OUT/x.md, RUN/hf; prose lists
        return None
    return word if _looks_like_repo_path(word) else None


@functools.lru_cache(maxsize=None)
def _exists(path: str, citing: Path) -> str | None:
    """None if ``path`` names something in the repository (or an output in ``OUTPUTS``); otherwise why not."""
    if path.rstrip("/") in OUTPUTS:
        return None
    bases = [ROOT, ROOT / "src", ROOT / "src" / "olmo_hybrid"] + [p for p in citing.parents if ROOT in p.parents]
    for variant in _expand_braces(path):
        found = False
        for base in bases:
            target = (base / variant).resolve()
            if ROOT not in target.parents and target != ROOT:
                continue
            if "*" in variant:
                found = any(base.glob(variant))
            else:
                found = target.exists()
            if found:
                break
        if not found:
            outside = not ((ROOT / variant).resolve().is_relative_to(ROOT))
            return f"{variant} {'is outside the repository' if outside else 'does not exist'}"
    return None


def _markdown_problems(md: Path, text: str | None = None) -> list[str]:
    """Every relative link target of ``md`` (path-like or not), and every path-like word of its text."""
    text = md.read_text() if text is None else text
    links = []
    for m in LINK.finditer(text):
        target = m.group(1).split("#", 1)[0]
        if target and not re.match(r"[a-z]+:", target):  # not an anchor in the page, not a URL
            line = text.count("\n", 0, m.start()) + 1
            links += [f"{md.relative_to(ROOT)}:{line}: {why}" for why in [_exists(target, md)] if why]
    return list(dict.fromkeys(links + _problems(md, _words([(1, text)]))))  # a link's target is also a word


def _python_comment_and_docstring_text(path: Path) -> list[tuple[int, str]]:
    source = path.read_text()
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if (doc := ast.get_docstring(node, clean=False)) is not None:
                out.append((node.body[0].lineno, doc))
    return out


def _shell_comments(path: Path) -> list[tuple[int, str]]:
    return [(i, line[line.index("#"):]) for i, line in enumerate(path.read_text().splitlines(), 1)
            if line.lstrip().startswith("#") and not line.startswith("#!")]


def _words(texts: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(line, word) for every path-like word of texts that start on the given lines."""
    out = []
    for line, text in texts:
        newlines = [i for i, c in enumerate(text) if c == "\n"] if "\n" in text else []
        out += [(line + bisect.bisect(newlines, m.start()), m.group(0)) for m in WORD.finditer(text)]
    return out


def _problems(path: Path, named: list[tuple[int, str]]) -> list[str]:
    out = []
    for line, raw in named:
        word = _clean(raw)
        if word is not None and (why := _exists(word, path)) is not None:
            out.append(f"{path.relative_to(ROOT)}:{line}: {why}")
    return out


def _markdown_files() -> list[Path]:
    return sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


def test_markdown_names_only_repository_paths_that_exist():
    problems = [p for md in _markdown_files() for p in _markdown_problems(md)]
    assert not problems, "Markdown names paths that are not in the repository:\n" + "\n".join(problems)


def test_comments_and_docstrings_name_only_repository_paths_that_exist():
    problems = []
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        # Tokenizing every file is slow: only a file whose text names a missing path anywhere is tokenized, to
        # see whether the name is in a comment or docstring (a string in code may name a file it creates).
        if _problems(path, _words([(1, path.read_text())])):
            problems += _problems(path, _words(_python_comment_and_docstring_text(path)))
    for path in sorted((ROOT / "benchmarks").rglob("*.sh")):
        problems += _problems(path, _words(_shell_comments(path)))
    assert not problems, "comments or docstrings name paths that are not in the repository:\n" + "\n".join(problems)


@pytest.mark.parametrize("text, bad", [
    ("see `docs/no_such_page.md`", ["docs/no_such_page.md does not exist"]),
    ("as the notes say (shared/reference/paper.md §5)", ["shared/reference/paper.md does not exist"]),
    ("[the code map](code_map.md), [gone](gone.md), [top](#one-token)", ["gone.md does not exist"]),
    ("[notes](../../elsewhere/reference/paper.md)", ["is outside the repository"]),
    ("`benchmarks/results/gdn_h100_2026-11-22_run{1,99}.log`", ["run99.log does not exist"]),
    ("`model/engine.py`, `tests/model/test_decode.py::test_x`, `bash benchmarks/compare_patterns.sh OUT`", []),
    ("`benchmarks/results/train_*_2026-11-22_*`, [code map](code_map.md#one-token), `OUT/train_1gpu.md`", []),
    ("`$OUT/x.json`, `~/.cache/olmo_hybrid`, `RUN/hf`, <https://github.com/fla-org/a/b.py>", []),
])
def test_the_markdown_scan(text, bad):
    found = _markdown_problems(ROOT / "docs" / "code_map.md", text)  # as if the page held text
    assert len(found) == len(bad) and all(b in f for b, f in zip(bad, found)), found


def test_python_scan_reads_comments_and_docstrings_not_code(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text('"""Module: see ``docs/gone.md``."""\n\n\ndef f():\n    """Uses src/olmo_hybrid/gone.py."""\n'
                      '    return "benchmarks/results/written_later.json"  # benchmarks/gone.sh\n')
    found = _problems(ROOT / "src" / "olmo_hybrid" / "config.py", _words(_python_comment_and_docstring_text(source)))
    assert {f.split(": ", 1)[1]: int(f.split(":")[1]) for f in found} == {
        "docs/gone.md does not exist": 1, "src/olmo_hybrid/gone.py does not exist": 5,
        "benchmarks/gone.sh does not exist": 6}
