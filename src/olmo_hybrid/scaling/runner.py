"""Run a whole ladder: the runs still missing points, in this process or in N worker processes, with progress.

``--parallel N`` starts one process per run, N at a time (several small models share one GPU that way);
each writes its trainer output to ``runs/RUN/log.txt``. The output directory is locked (``flock`` on
``OUT/.lock``, held by the workers too) so that two ladders never train the same run. A deadline
(``--max-minutes``) starts no new phase in its last minute and stops the running ones through the
trainer's ``max_minutes``, checkpointed: the same command continues them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from olmo_hybrid.errors import CheckpointError
from olmo_hybrid.fsio import atomic_write_text
from olmo_hybrid.scaling.jobs import RESULTS, branch_dir, done_points, last_logged_step, run_dir, run_job
from olmo_hybrid.scaling.ladder import LadderError, LadderPlan, RunPlan

SNAPSHOT = "ladder.json"
PAUSED_EXIT = 3  # a worker (or the ladder) stopped at the deadline
START_MARGIN_S = 60.0  # no run is started with less time than this left before the deadline


class Progress:
    """Done / running / left, FLOPs left (from the plan and the trainers' metrics files) and an ETA from the
    rate this process has achieved so far."""

    def __init__(self, plan: LadderPlan, out: Path, runs: list[RunPlan], console):
        self.plan, self.out, self.runs, self.console = plan, Path(out), runs, console
        self.running: set[str] = set()
        self.t0 = time.time()
        self.left0 = self.flops_left()

    def _run_left(self, run: RunPlan, done: dict) -> tuple[float, str]:
        todo = [p for p in run.points if run.key(p) not in done]
        if not todo:
            return 0.0, "done"
        stable = last_logged_step(run_dir(self.out, run) / "stable")
        steps = max(0, max(p.branch_step for p in todo) - stable)
        where = f"stable {stable}/{todo[0].branch_step}"
        for p in todo:
            reached = max(p.branch_step, last_logged_step(branch_dir(self.out, run, p)))
            steps += p.steps - reached
            if p is todo[0] and reached > p.branch_step:
                where = f"decay {p.budget:g}x {reached}/{p.steps}"
        return self.plan.flops(run, steps), where

    def flops_left(self) -> float:
        done = done_points(self.plan, self.out, log=lambda *_: None)
        return sum(self._run_left(r, done)[0] for r in self.runs)

    def line(self) -> str:
        from olmo_hybrid.train.metrics import format_duration  # imported late: with --parallel, only workers need torch

        done = done_points(self.plan, self.out, log=lambda *_: None)
        total = sum(len(r.points) for r in self.plan.runs)
        n_done = sum(1 for r in self.plan.runs for p in r.points if r.key(p) in done)
        left, running = 0.0, []
        for run in self.runs:
            flops, where = self._run_left(run, done)
            left += flops
            if run.id in self.running:
                running.append(f"{run.id} {where}")
        elapsed = time.time() - self.t0
        rate = (self.left0 - left) / elapsed if elapsed > 0 else 0.0
        eta = format_duration(left / rate) if rate > 0 else "?"
        waiting = sum(1 for r in self.runs if r.id not in self.running and self._run_left(r, done)[0] > 0)
        return (f"[ladder {format_duration(elapsed)}] {n_done}/{total} points done | running: "
                f"{', '.join(running) or 'none'} | {waiting} runs waiting | {left:.3g} FLOPs left, "
                f"{rate:.3g} FLOP/s, ETA {eta}")

    def report(self) -> None:
        print(self.line(), file=self.console, flush=True)


@contextlib.contextmanager
def _reporting(progress: Progress, interval: float):
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            try:
                progress.report()
            except Exception as e:  # a progress line must never stop the ladder
                print(f"[ladder] progress unavailable: {e}", file=progress.console, flush=True)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def lock_output(out: Path) -> int:
    """An exclusive lock on OUT/.lock (released when this process and its workers exit)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(f"{out} is in use by another ladder process (or its workers); wait for it or stop it") from None
    return fd


def write_snapshot(plan: LadderPlan, out: Path) -> Path:
    """The resolved ladder config, which worker processes plan from."""
    cfg = dataclasses.replace(plan.config, data=str(plan.data.absolute()))
    return atomic_write_text(out / SNAPSHOT, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def _in_process(plan, runs, out, deadline, progress, console) -> dict[str, str]:
    status = {}
    for run in runs:
        if deadline is not None and deadline - time.time() < START_MARGIN_S:
            status[run.id] = "paused"
            continue
        progress.running = {run.id}
        log_path = run_dir(out, run) / "log.txt"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[ladder] {run.id}: training (log {log_path})", file=console, flush=True)
        with open(log_path, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
            try:
                status[run.id] = run_job(plan, run, out, deadline)
            except Exception:
                traceback.print_exc(file=f)
                status[run.id] = "failed"
        print(f"[ladder] {run.id}: {status[run.id]}", file=console, flush=True)
    progress.running = set()
    return status


def _workers(plan, runs, out, deadline, parallel, lock_fd, progress, console) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # a killed worker's log keeps its last lines
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    pending, running, status = list(runs), {}, {}
    try:
        while pending or running:
            while pending and len(running) < parallel and (deadline is None or deadline - time.time() >= START_MARGIN_S):
                run = pending.pop(0)
                log_path = run_dir(out, run) / "log.txt"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "olmo_hybrid.scaling.worker", str(out), run.id, "--parent", str(os.getpid())]
                if deadline is not None:
                    cmd += ["--deadline", repr(deadline)]
                with open(log_path, "a", encoding="utf-8") as log_file:
                    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                            pass_fds=(lock_fd,))
                running[run.id] = proc
                progress.running = set(running)
                print(f"[ladder] {run.id}: started (pid {proc.pid}, log {log_path})", file=console, flush=True)
            if deadline is not None and deadline - time.time() < START_MARGIN_S and not running:
                break
            time.sleep(0.5)
            for run_id, proc in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[run_id]
                status[run_id] = {0: "done", PAUSED_EXIT: "paused"}.get(rc, "failed")
                progress.running = set(running)
                print(f"[ladder] {run_id}: {status[run_id]}" + (f" (exit {rc})" if status[run_id] == "failed" else ""),
                      file=console, flush=True)
        for run in pending:
            status[run.id] = "paused"
    finally:
        for proc in running.values():  # interrupted: stop the workers (their checkpoints stay)
            proc.terminate()
        for proc in running.values():
            proc.wait()
    return status


def run_ladder(plan: LadderPlan, out: str | Path, parallel: int = 1, max_minutes: float = 0.0,
               archs: list[str] | None = None, sizes: list[str] | None = None, report_interval: float = 30.0,
               console=None) -> int:
    """Train every missing point; exit code 0 (all done), 3 (stopped at the deadline) or 1 (a run failed)."""
    console = console or sys.stdout
    out = Path(out)
    if parallel < 1:
        raise LadderError(f"--parallel must be at least 1, got {parallel}")
    lock_fd = lock_output(out)
    try:
        write_snapshot(plan, out)
        done = done_points(plan, out, log=lambda m: print(m, file=console))
        selected = [r for r in plan.runs if (not archs or r.arch in archs) and (not sizes or r.size in sizes)]
        runs = [r for r in selected if any(r.key(p) not in done for p in r.points)]
        runs.sort(key=lambda r: -plan.flops(r, r.points[-1].steps))  # longest first: the last ones finish together
        n_points = sum(len(r.points) for r in plan.runs)
        n_done = sum(1 for r in plan.runs for p in r.points if r.key(p) in done)
        print(f"[ladder] {out / RESULTS}: {n_done} of {n_points} points done; {len(runs)} runs to train "
              f"({'in this process' if parallel == 1 else f'{parallel} worker processes'})", file=console, flush=True)
        for w in plan.warnings:
            print(f"[ladder] warning: {w}", file=console, flush=True)
        deadline = time.time() + 60 * max_minutes if max_minutes > 0 else None
        progress = Progress(plan, out, runs, console)
        with _reporting(progress, report_interval):
            if parallel == 1:
                status = _in_process(plan, runs, out, deadline, progress, console)
            else:
                status = _workers(plan, runs, out, deadline, parallel, lock_fd, progress, console)
        progress.report()
        failed = sorted(k for k, v in status.items() if v == "failed")
        paused = sorted(k for k, v in status.items() if v == "paused")
        if failed:
            print(f"[ladder] failed: {', '.join(failed)} (see runs/RUN/log.txt)", file=console, flush=True)
        if paused:
            print(f"[ladder] stopped at the time limit: {len(paused)} runs not finished; the same command continues "
                  "them (from their checkpoints on this machine)", file=console, flush=True)
        return 1 if failed else PAUSED_EXIT if paused else 0
    finally:
        os.close(lock_fd)
