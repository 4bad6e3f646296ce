"""The ``olmo-hybrid`` command: a thin dispatcher to one module per subcommand, and the one error style.

Each subcommand lives in ``olmo_hybrid.cli.<name>`` (dashes become underscores) and exposes ``main(argv) -> int``;
it is imported only when used, so ``olmo-hybrid info`` never pays for the trainer's or evaluator's imports.

Errors: a subcommand raises, the dispatcher reports. The project's own errors (``olmo_hybrid.errors``:
config, data, checkpoint, bad arguments, failed writes), operating-system errors, bad values and missing
optional packages are printed as one line, ``olmo-hybrid COMMAND: error: MESSAGE``, with exit code 2
for bad arguments or config and 1 otherwise; Ctrl-C prints one line and exits with 130; a reader of stdout
that stops early (``olmo-hybrid info tiny --json | head -3``) ends the command quietly with 141, as a shell
reports a process that SIGPIPE ended. Anything else is a bug and keeps its traceback. ``--debug`` (anywhere on
the command line) or ``OLMO_HYBRID_DEBUG=1`` prints the traceback of every error as well.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
import traceback

from olmo_hybrid.errors import OlmoHybridError, UsageError

COMMANDS = {
    "train": "train the tiny hybrid on the bundled corpus, or any preset/config (see --help)",
    "prepare": "tokenize text/JSONL/HF datasets into token shards",
    "generate": "generate text from a checkpoint, streaming",
    "serve": "serve a checkpoint over HTTP with the OpenAI API (completions, chat, streaming, metrics)",
    "convert": "convert between training checkpoints and Hugging Face directories",
    "info": "parameters, FLOPs per token and inference memory of a preset or checkpoint",
    "eval": "evaluate a checkpoint: RULER, probes, multiple choice, bits per byte",
    "ladder": "train a scaling ladder (sizes x architectures, WSD-S budgets), resumable",
    "scaling": "fit Chinchilla laws to ladder results: token savings, rollout check, plots",
    "extend": "continue a run or checkpoint at a longer context (YaRN, DRoPE or unchanged positions)",
    "longctx-experiment": "the resumable long-context experiment: train, extend, RULER over lengths, report",
    "sft": "supervised fine-tuning on chat conversations (loss on assistant turns)",
    "dpo": "direct preference optimisation on chosen/rejected pairs",
}
EXIT_READER_GONE = 141  # 128 + SIGPIPE
DEBUG_FLAG = "--debug"
DEBUG_ENV = "OLMO_HYBRID_DEBUG"
# What a user can cause and fix: reported in one line. Everything else is a bug and keeps its traceback.
REPORTED = (OlmoHybridError, OSError, ValueError, ImportError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse in the project's error style: a bad argument raises ``UsageError`` (one line, exit code 2)
    instead of printing the usage block; ``--help`` shows every option's default."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def format_help(self) -> str:
        for action in self._actions:
            _note_default(action)
        return super().format_help()


def _note_default(action: argparse.Action) -> None:
    """Append ``(default: X)`` to an option's help, unless the help already names its default or there is none to
    show (None or "": the help says what happens instead; False: an unset flag)."""
    default = action.default
    if not action.option_strings or default is False or default in (None, "", argparse.SUPPRESS):
        return
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or "default" in (action.help or "").lower():
        return
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    note = f"(default: {shown or 'none'})".replace("%", "%%")  # help strings are %-formatted
    action.help = f"{action.help} {note}" if action.help else note


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, OlmoHybridError) and e.filename:
        from olmo_hybrid.fsio import failure_reason

        return f"{e.filename}: {failure_reason(e)}"
    return " ".join(str(e).split()) or type(e).__name__


def run_command(name: str, argv: list[str], debug: bool = False) -> int:
    """Run subcommand ``name`` and turn what it raises into the one-line error style."""
    rank = os.environ.get("RANK", "0")
    prefix = f"olmo-hybrid {name}" + ("" if rank == "0" else f" (rank {rank})")
    try:
        module = importlib.import_module(f"olmo_hybrid.cli.{name.replace('-', '_')}")
        rc = int(module.main(argv) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is reported below rather than at interpreter exit
        return rc
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: {_message(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return 130
    except REPORTED as e:
        if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
            return EXIT_READER_GONE
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {_message(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 1)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on such a pipe's write end);
    if so, later writes (Python's own flush at exit included) go to /dev/null, so that nothing more is reported."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (captured output)
        return False
    if not hasattr(select, "poll"):
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    if not dict(poll.poll(0)).get(fd, 0) & select.POLLERR:
        return False
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv:
        argv = ["train"]  # the main job: train the tiny hybrid on the bundled corpus, then sample
    if argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"usage: olmo-hybrid COMMAND [ARGS] [{DEBUG_FLAG}]   (no command: train)", "", "commands:",
                 *(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()),
                 "", f"Errors are one line; {DEBUG_FLAG} or {DEBUG_ENV}=1 adds the traceback."]
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:
            if _stdout_reader_gone():
                return EXIT_READER_GONE
            raise
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"olmo-hybrid: error: unknown command '{name}' (known: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return run_command(name, rest, debug)


if __name__ == "__main__":
    sys.exit(main())
