"""``olmo-hybrid ladder CONFIG [field=value ...] --out DIR``: a scaling ladder with WSD-S budgets, resumable.

Each (architecture, size, seed) is one training run whose stable phase yields every budget: at each
budget a branch decays the learning rate to 0 and scores the held-out split, one line per point in
DIR/results.jsonl. Run the same command again to continue: finished points are never trained again, an
interrupted phase resumes from its newest checkpoint. Method and config fields: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.errors import UsageError

EXAMPLES = """examples:
  olmo-hybrid ladder benchmarks/ladder_micro.json --plan                 # runs, steps, epochs, FLOPs, GPU time
  olmo-hybrid ladder benchmarks/ladder_micro.json --out runs/ladder-micro --parallel 4 --max-minutes 9
  olmo-hybrid ladder benchmarks/ladder_micro.json --out runs/ladder-micro --status
  olmo-hybrid ladder my_ladder.json recipe.decay_fraction=0.05 --archs hybrid,transformer --sizes micro-64
  olmo-hybrid scaling fit runs/ladder-micro/results.jsonl --out runs/ladder-micro/fit
"""

def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="olmo-hybrid ladder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("config", help="a ladder config (JSON; fields in docs/scaling.md)")
    p.add_argument("overrides", nargs="*", metavar="field=value", help="dotted overrides of the ladder config")
    p.add_argument("--out", help="output directory (default: runs/ladder-NAME)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs trained at once, each in its own process (default 1: in this process)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop (checkpointed) after this many minutes; the same command continues (default: none)")
    p.add_argument("--archs", type=_names, help="only these architectures (comma-separated)")
    p.add_argument("--sizes", type=_names, help="only these sizes (comma-separated)")
    p.add_argument("--plan", action="store_true", help="print the runs, steps, epochs and FLOPs, then exit")
    p.add_argument("--status", action="store_true", help="print what is done, running and left, then exit")
    p.add_argument("--mfu", type=float, default=0.2, help="assumed MFU for --plan's GPU time (default 0.2)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s for --plan's GPU time (default 989: H100 SXM)")
    p.add_argument("--report-interval", type=float, default=30.0, help="seconds between progress lines (default 30)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Numbers a run would otherwise take silently: a negative time limit as none, a report interval of 0 as a
    progress line in a busy loop, an MFU of 0 as a GPU time of nan, an empty list as every name."""
    for flag, value, ok, expected in (
            ("--max-minutes", args.max_minutes, 0 <= args.max_minutes < math.inf, ">= 0 (0: no limit)"),
            ("--report-interval", args.report_interval, 0 < args.report_interval < math.inf, "positive seconds"),
            ("--mfu", args.mfu, 0 < args.mfu <= 1, "in (0, 1]"),
            ("--peak-tflops", args.peak_tflops, 0 < args.peak_tflops < math.inf, "positive")):
        if not ok:
            raise UsageError(f"{flag} must be {expected}, got {value}")
    for flag, names in (("--archs", args.archs), ("--sizes", args.sizes)):
        if names is not None and not names:
            raise UsageError(f"{flag}: give at least one name (comma-separated)")


def selected_plan(plan, archs: list[str] | None, sizes: list[str] | None):
    """The plan of the runs ``--archs`` / ``--sizes`` select (all when not given), as the ladder would train them:
    what ``--plan`` prints, header, totals and warnings included."""
    def chosen(arch: str, size: str) -> bool:
        return (not archs or arch in archs) and (not sizes or size in sizes)

    cfg = plan.config
    left_out = tuple(f"{r.arch}/{r.size} " for r in plan.runs if not chosen(r.arch, r.size))
    config = dataclasses.replace(cfg, architectures=[a for a in cfg.architectures if not archs or a in archs],
                                 sizes=[s for s in cfg.sizes if not sizes or s in sizes])
    return dataclasses.replace(plan, config=config, runs=[r for r in plan.runs if chosen(r.arch, r.size)],
                               warnings=[w for w in plan.warnings if not left_out or not w.startswith(left_out)])


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    check_args(args)
    from olmo_hybrid.scaling.ladder import describe, load_ladder, plan_ladder

    plan = plan_ladder(load_ladder(args.config, args.overrides))
    for name, chosen, known in (("--archs", args.archs, plan.config.architectures),
                                ("--sizes", args.sizes, plan.config.sizes)):
        unknown = sorted(set(chosen or ()) - set(known))
        if unknown:
            raise UsageError(f"{name}: {', '.join(unknown)} not in the config ({', '.join(known)})")
    if args.plan:
        print(describe(selected_plan(plan, args.archs, args.sizes), peak_flops=args.peak_tflops * 1e12, mfu=args.mfu))
        return 0
    out = Path(args.out or f"runs/ladder-{plan.config.name}")
    from olmo_hybrid.scaling.runner import Progress, run_ladder

    try:
        if args.status:
            print(Progress(plan, out, plan.runs, sys.stdout).line())
            return 0
        return run_ladder(plan, out, parallel=args.parallel, max_minutes=args.max_minutes, archs=args.archs,
                          sizes=args.sizes, report_interval=args.report_interval)
    except KeyboardInterrupt:
        print("olmo-hybrid ladder: interrupted; the same command continues from the checkpoints", file=sys.stderr)
        return 130
