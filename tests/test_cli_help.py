"""What ``--help`` shows: every option of every subcommand has a help text that names its default, the examples
print as written, and ``olmo-hybrid --help`` lines up its command list. A reader of stdout that stops early
(``| head``) ends a command quietly."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from olmo_hybrid import cli
from olmo_hybrid.cli import COMMANDS, main

# Subcommands with sub-subcommands: their --help is checked too.
NESTED = {"scaling": ["fit"]}


def _helped_parsers(monkeypatch, capsys, argv: list[str]) -> tuple[list[argparse.ArgumentParser], str]:
    """The parsers whose help ``olmo-hybrid ARGV --help`` formatted, and the text it printed."""
    seen = []
    format_help = cli.ArgumentParser.format_help

    def recording(self):
        seen.append(self)
        return format_help(self)

    monkeypatch.setattr(cli.ArgumentParser, "format_help", recording)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return seen, capsys.readouterr().out


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS] + [[c, s] for c, subs in NESTED.items() for s in subs],
                         ids=" ".join)
def test_every_option_says_what_it_does_and_its_default(argv, monkeypatch, capsys):
    parsers, text = _helped_parsers(monkeypatch, capsys, argv)
    assert parsers, "the command printed help without the project's ArgumentParser"
    problems = []
    for action in parsers[-1]._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            problems.append(f"{name}: no help text")
        elif action.option_strings and action.default not in (None, False, "") and "default" not in action.help:
            problems.append(f"{name}: its default {action.default!r} is not shown")
    assert not problems, f"olmo-hybrid {' '.join(argv)} --help:\n" + "\n".join(problems)
    assert "%(" not in text and "(default: None)" not in text


def test_a_default_is_added_once_and_kept_out_of_percent_formatting(capsys):
    p = cli.ArgumentParser(prog="demo")
    p.add_argument("--rate", default="5%", help="share of the budget")
    p.add_argument("--names", default=["a", "b"])
    p.add_argument("--limit", default=None, help="at most N (default: all)")
    p.add_argument("--zero", type=int, default=0, help="0 = off")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.format_help()
    text = p.format_help()  # a second call must not repeat the notes
    assert "share of the budget (default: 5%)" in text
    assert "(default: a,b)" in text
    assert "0 = off (default: 0)" in text
    assert text.count("default") == 4


def test_train_examples_keep_their_line_continuation(monkeypatch, capsys):
    _, text = _helped_parsers(monkeypatch, capsys, ["train"])
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith("torchrun"))
    assert lines[i].endswith("trainer.compile=true \\"), lines[i]
    assert lines[i + 1].lstrip().startswith("trainer.activation_checkpointing=selective")


def test_the_command_list_is_aligned(capsys):
    assert main(["--help"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert [r.split()[0] for r in rows] == list(COMMANDS)
    columns = {len(r) - len(r[2:].split(" ", 1)[1].lstrip()) for r in rows}
    assert len(columns) == 1, rows


@pytest.mark.parametrize("argv", [["--help"], ["info", "tiny", "--json"]], ids=" ".join)
def test_a_reader_that_stops_early_ends_the_command_quietly(argv):
    """``olmo-hybrid info tiny --json | head -1``: no traceback and no error line, whichever write meets the
    closed pipe (the reader is closed before the command writes)."""
    src = str(Path(cli.__file__).parents[2])  # this tree's olmo_hybrid, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as usual: the failing write can be the flush after the command
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "olmo_hybrid", *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == cli.EXIT_READER_GONE
