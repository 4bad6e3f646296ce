"""Data flows one way through olmo_hybrid: no module imports a package above its own layer.

Every module under src/olmo_hybrid is parsed (ast, so imports inside functions and ``TYPE_CHECKING``
blocks count, as do ``importlib.import_module("olmo_hybrid....")`` calls) and each import of another
top-level package is checked against ``LAYERS``. A package may import its own modules and any package of
a lower layer; packages of one layer are peers and do not import each other, except the leaves (small
modules with no project dependencies but each other). ``__main__`` modules are entry points and may
import anything. A new package must be given a layer here before its test passes.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "olmo_hybrid"

LAYERS: list[set[str]] = [
    {"errors", "config", "fsio", "distributed"},  # leaves: error classes, config dataclasses, atomic writes, process group
    {"ops", "data"},  # kernels and their references; tokenizers, corpora, token shards and loaders
    {"model"},  # HybridLM, HF weights I/O, generation
    {"checkpoint"},  # run directories, checkpoints, export, one loader for every checkpoint
    {"train", "eval", "serve"},  # the trainer, the evaluators, the server: peers of each other
    {"scaling", "longctx", "posttrain"},  # studies and stages built on the trainer and the evaluators
    {"cli"},  # the command line
]
# Packages that only the listed modules or packages (and the package itself) may import: the trainer is imported
# by the commands that train and by the capabilities that run training stages, never by model, eval or serve code.
ONLY_IMPORTED_BY = {"train": {"olmo_hybrid.cli.train", "olmo_hybrid.cli.extend", "olmo_hybrid.cli.sft",
                              "olmo_hybrid.cli.dpo", "olmo_hybrid.cli.ladder", "olmo_hybrid.scaling",
                              "olmo_hybrid.longctx", "olmo_hybrid.posttrain"}}


def _layer_of(package: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if package in layer), None)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Fully qualified olmo_hybrid modules that ``path`` (module ``module``) imports anywhere."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                arg = arg.values[0]  # f"olmo_hybrid.cli.{name}": its constant prefix
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
    return {name for name in found if name.startswith("olmo_hybrid.")}


def upward_imports(root: Path = SRC) -> list[str]:
    """Every import that breaks the layering, as 'importer -> imported (why)'; unknown packages included."""
    problems = []
    known = {p for layer in LAYERS for p in layer}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        parts = module.split(".")
        if len(parts) == 1 or parts[-1] == "__main__":
            continue  # the package root (imports nothing) and entry points
        package = parts[1]
        if package not in known:
            problems.append(f"{module}: package '{package}' has no layer in LAYERS")
            continue
        targets: dict[str, str] = {}  # imported package -> the first import of it (one report per package)
        for target in sorted(_imports(path, module)):
            targets.setdefault(target.split(".")[1], target)
        for other, target in targets.items():
            if other == package:
                continue
            if other not in known:
                if (root / other).exists() or (root / f"{other}.py").exists():
                    problems.append(f"{module} -> {target}: package '{other}' has no layer in LAYERS")
                continue  # `from olmo_hybrid import name` of something that is not a module
            mine, theirs = _layer_of(package), _layer_of(other)
            if theirs > mine or (theirs == mine and mine != 0):
                problems.append(f"{module} -> {target}: '{other}' is not below '{package}'")
            allowed = ONLY_IMPORTED_BY.get(other)
            if allowed is not None and not any(module == a or module.startswith(a + ".") for a in allowed):
                problems.append(f"{module} -> {target}: only {', '.join(sorted(allowed))} may import '{other}'")
    return problems


def test_no_module_imports_upward():
    problems = upward_imports()
    assert not problems, "imports against the layering:\n  " + "\n  ".join(problems)


def test_the_check_finds_upward_and_hidden_imports(tmp_path):
    root = tmp_path / "olmo_hybrid"
    files = {
        "__init__.py": "",
        "model/__init__.py": "def f():\n    from olmo_hybrid.checkpoint import load\n",  # inside a function
        "checkpoint/__init__.py": "from ..train import trainer\n",  # relative
        "checkpoint/ok.py": "from olmo_hybrid.model import HybridLM\nfrom . import load\n",
        "eval/__init__.py": "import importlib\nimportlib.import_module('olmo_hybrid.serve.engine')\n",  # a peer
        "cli/info.py": "from olmo_hybrid import train\n",  # cli, but not the training command
        "newpkg/__init__.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    problems = upward_imports(root)
    assert len(problems) == 6, problems  # checkpoint -> train breaks both rules
    for expected in ("olmo_hybrid.model -> olmo_hybrid.checkpoint: 'checkpoint' is not below 'model'",
                     "olmo_hybrid.checkpoint -> olmo_hybrid.train: 'train' is not below 'checkpoint'",
                     "olmo_hybrid.eval -> olmo_hybrid.serve.engine: 'serve' is not below 'eval'",
                     "olmo_hybrid.cli.info -> olmo_hybrid.train: only olmo_hybrid.cli.dpo, ",
                     "olmo_hybrid.newpkg: package 'newpkg' has no layer"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
