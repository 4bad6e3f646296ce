"""A ladder worker process: ``python -m olmo_hybrid.scaling.worker OUT RUN_ID --parent PID [--deadline T]``.

Started by ``runner.run_ladder`` for ``--parallel N``: plans the ladder from ``OUT/ladder.json`` and trains
the missing points of one run. Exit code 0 (done), 3 (stopped at the deadline) or 1 (failed; the traceback
is in the run's log). It dies with the ladder process (Linux), so a killed ladder leaves no orphan training.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import traceback


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the ladder died before prctl took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m olmo_hybrid.scaling.worker")
    p.add_argument("out")
    p.add_argument("run_id")
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--deadline", type=float, default=None)
    args = p.parse_args(argv)
    _die_with_parent(args.parent)
    from olmo_hybrid.scaling.jobs import run_job
    from olmo_hybrid.scaling.ladder import load_ladder, plan_ladder
    from olmo_hybrid.scaling.runner import PAUSED_EXIT, SNAPSHOT

    try:
        plan = plan_ladder(load_ladder(os.path.join(args.out, SNAPSHOT)))
        run = next((r for r in plan.runs if r.id == args.run_id), None)
        if run is None:
            raise SystemExit(f"no run {args.run_id} in {args.out}/{SNAPSHOT}")
        status = run_job(plan, run, args.out, args.deadline)
    except Exception:
        traceback.print_exc()
        return 1
    return PAUSED_EXIT if status == "paused" else 0


if __name__ == "__main__":
    sys.exit(main())
