"""``olmo-hybrid longctx-experiment CONFIG.json [section.field=value ...]``: the long-context experiment.

A 3:1 hybrid and a transformer of the same width trained with RoPE at a short length on the same data, each
extended to 8x with the same token budget (hybrid + DRoPE, hybrid + YaRN, transformer + YaRN), and RULER at 1x-8x
for every model, the unextended ones measured past their window. Resumable: finished pieces are recorded in the
results file and never run again; a killed or timed-out piece continues from its newest checkpoint. The tables and
curves in docs/long_context.md are rewritten from the results file at the end (or alone with --report).
"""

from __future__ import annotations

import argparse
import math

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.errors import UsageError

EXAMPLES = """examples:
  olmo-hybrid longctx-experiment benchmarks/longctx_experiment.json --dry-run     # the pieces and a time estimate
  olmo-hybrid longctx-experiment benchmarks/longctx_experiment.json --max-minutes 9   # repeat until it says done
  olmo-hybrid longctx-experiment benchmarks/longctx_experiment.json --only ruler:hybrid
  olmo-hybrid longctx-experiment benchmarks/longctx_experiment.json --report      # only rewrite the docs section
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="olmo-hybrid longctx-experiment", description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("config", help="experiment config (JSON; fields of olmo_hybrid.longctx.experiment.ExperimentConfig)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="dotted overrides of the experiment config")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training at this budget (checkpoint saved) and exit; run again to continue")
    p.add_argument("--only", default="",
                   help="run only the pieces whose key contains this (e.g. train:, :s1; default: all)")
    p.add_argument("--dry-run", action="store_true", help="list the pieces, which are done, and the time left")
    p.add_argument("--report", action="store_true", help="only rewrite the docs section from the results file")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.max_minutes is not None and not 0 < args.max_minutes < math.inf:
        raise UsageError(f"--max-minutes must be positive, got {args.max_minutes}")
    from olmo_hybrid.longctx.experiment import describe_plan, done_pieces, load_experiment, plan_pieces, run_experiment
    from olmo_hybrid.longctx.report import write_report

    cfg = load_experiment(args.config, args.overrides)
    if args.dry_run:
        print(describe_plan(cfg, done_pieces(cfg, plan_pieces(cfg))))
        return 0
    if not args.report:
        finished = run_experiment(cfg, max_minutes=args.max_minutes, only=args.only)
        print("[longctx] all pieces done" if finished else "[longctx] not finished: run the same command again")
    write_report(cfg)
    return 0
