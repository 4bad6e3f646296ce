"""The ``olmo-hybrid`` command: a thin dispatcher to one module per subcommand.

Each subcommand lives in ``olmo_hybrid.cli.<name>`` and exposes ``main(argv) -> int``; it is imported
only when used, so ``olmo-hybrid info`` never pays for the trainer's or evaluator's imports.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train the tiny hybrid on the bundled corpus, or any preset/config (see --help)",
    "prepare": "tokenize text/JSONL/HF datasets into token shards",
    "generate": "generate text from a checkpoint, streaming",
    "convert": "convert between training checkpoints and Hugging Face directories",
    "info": "parameters, FLOPs per token and inference memory of a preset or checkpoint",
    "eval": "evaluate a checkpoint: RULER, probes, multiple choice, bits per byte",
    "ladder": "train a scaling ladder (sizes x architectures, WSD-S budgets), resumable",
    "scaling": "fit Chinchilla laws to ladder results: token savings, rollout check, plots",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the main job: train the tiny hybrid on the bundled corpus, then sample
    if argv[0] in ("-h", "--help"):
        print("usage: olmo-hybrid COMMAND [ARGS]   (no command: train)\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"olmo-hybrid: unknown command '{name}' (known: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(f"olmo_hybrid.cli.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
