"""One ladder run (architecture, size, seed): its stable phase and a decay branch per budget, through the trainer.

Layout under the ladder's output directory::

    OUT/results.jsonl                     one line per finished point (``results.py``)
    OUT/runs/ARCH__SIZE__sSEED/stable/    the stable phase: a trainer run directory (constant LR after warmup)
    OUT/runs/ARCH__SIZE__sSEED/decay-Bx/  budget B's branch: a trainer run directory resumed from a hard-linked
                                          copy of the stable checkpoint at the branch step (``wsd`` schedule)

The stable phase is trained in segments, each a trainer run to the next branch step (``trainer.steps`` = that
step, resuming from the newest checkpoint), and each branch starts from the checkpoint at its segment's end.
The trainer's ``wsd`` schedule holds the peak exactly as the ``constant`` one does until the decay, so a
branch continues the stable phase's learning rate, optimizer state and data order seamlessly (checked
against ``lr_at`` before training). A killed run resumes from the newest checkpoint of the phase it was in;
a point in the results file is never trained again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from olmo_hybrid.scaling.ladder import LadderError, LadderPlan, PointPlan, RunPlan, run_steps
from olmo_hybrid.scaling.results import ResultsError, append_result, read_results

RESULTS = "results.jsonl"
MIN_SEGMENT_MINUTES = 1.0  # with a deadline, a phase is not started with less time than this left
CHECKPOINTS_PER_RUN = 20  # the stable phase saves about this often when save_interval is 0


def run_dir(out: Path, run: RunPlan) -> Path:
    return Path(out) / "runs" / run.id


def branch_dir(out: Path, run: RunPlan, point: PointPlan) -> Path:
    return run_dir(out, run) / f"decay-{point.budget:g}x"


def done_points(plan: LadderPlan, out: Path, log=print) -> dict[tuple, int]:
    """``{(arch, size, seed, budget): line}`` of the points already in the results file. A line for a point of
    this plan made with other settings (its fingerprint differs) is an error: mixing them would be silent."""
    planned = {run.key(p): p.fingerprint for run in plan.runs for p in run.points}
    done = {}
    path = Path(out) / RESULTS
    for pt in read_results(path, log=log):
        r = pt.record
        try:
            key = (r["arch"], r["size"], r["seed"], float(r["budget"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ResultsError(f"{path} line {pt.line}: not a ladder point ({e})") from e
        if key in planned and r.get("fingerprint") != planned[key]:
            raise LadderError(f"{path} line {pt.line}: point {key[0]}/{key[1]}/seed {key[2]}/{key[3]:g}x was made with "
                              f"other settings (fingerprint {r.get('fingerprint')} vs {planned[key]} now: model, "
                              "recipe, data or train overrides changed); use another output directory, or remove "
                              "the line to train it again")
        done[key] = pt.line
    return done


def train_config(plan: LadderPlan, run: RunPlan, steps: int, schedule: str, max_minutes: float = 0.0):
    """The trainer config of one phase of ``run``: ``steps`` in all, ``constant`` (stable) or ``wsd`` (decay)."""
    from olmo_hybrid.config import apply_overrides, from_dict
    from olmo_hybrid.train import TrainConfig

    cfg, r = plan.config, plan.config.recipe
    save_every = cfg.save_interval or max(1, run_steps(run) // CHECKPOINTS_PER_RUN)
    sections = {
        "model": dataclasses.asdict(run.model),
        "data": {"path": str(plan.data), "seq_len": cfg.seq_len, "batch_size": run.batch_sequences,
                 "seed": cfg.data_seed},
        "optim": {"lr": run.lr, "betas": [0.9, run.beta2], "weight_decay": r.weight_decay,
                  "decay_rule": "all_but_embeddings"},
        "schedule": {"name": schedule, "warmup_steps": run.warmup_steps, "final_lr_fraction": 0.0,
                     "decay_fraction": r.decay_fraction},
        "trainer": {"steps": steps, "seed": run.seed, "eval_interval": 0, "save_interval": save_every,
                    "keep_last_k": 2, "export_hf": False, "sample_tokens": 0, "max_minutes": max_minutes,
                    "log_interval": max(1, run_steps(run) // 200)},
    }
    return apply_overrides(from_dict(TrainConfig, sections), list(cfg.train))


def check_schedules(plan: LadderPlan, run: RunPlan, point: PointPlan) -> None:
    """The decay branch's learning rate equals the stable phase's up to the branch step and falls right after."""
    from olmo_hybrid.train import lr_at

    stable = train_config(plan, run, point.branch_step, "constant").schedule
    decay = train_config(plan, run, point.steps, "wsd").schedule
    peak = run.lr
    for step in sorted({0, run.warmup_steps - 1, run.warmup_steps, point.branch_step - 1}):
        if step >= 0 and lr_at(step, point.branch_step, peak, stable) != lr_at(step, point.steps, peak, decay):
            raise LadderError(f"{run.id} {point.budget:g}x: the trainer's constant and wsd schedules differ at step "
                              f"{step}; the decay branch would not continue the stable phase")
    if not (lr_at(point.branch_step, point.steps, peak, decay) < peak and lr_at(point.steps - 1, point.steps, peak,
                                                                                   decay) == 0.0):
        raise LadderError(f"{run.id} {point.budget:g}x: the trainer's wsd schedule does not decay from step "
                          f"{point.branch_step} to 0 at step {point.steps - 1}")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def seed_branch(stable: Path, checkpoint: Path, branch: Path) -> None:
    """Give ``branch`` the stable checkpoint to resume from: hard links (or copies) placed atomically."""
    target = branch / checkpoint.relative_to(stable)
    tmp = target.with_name(f".{target.name}.seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, tmp, copy_function=_link_or_copy)
    os.replace(tmp, target)


def _minutes_left(deadline: float | None) -> float:
    return 0.0 if deadline is None else (deadline - time.time()) / 60


def _phase(plan: LadderPlan, run: RunPlan, steps: int, schedule: str, directory: Path, deadline, log):
    """Train one phase to ``steps`` (resuming in ``directory``); None if the deadline stopped or skipped it."""
    from olmo_hybrid.train import Trainer

    if deadline is not None and _minutes_left(deadline) < MIN_SEGMENT_MINUTES:
        return None
    cfg = train_config(plan, run, steps, schedule, _minutes_left(deadline))
    result = Trainer(cfg, directory, resume=True, log=log).fit()
    return None if result.stopped_early else result


def _stable_val_loss(stable: Path, step: int) -> float | None:
    from olmo_hybrid.train import read_metrics

    rows = [r for r in read_metrics(stable / "metrics.jsonl") if r.get("step") == step and "val_loss" in r]
    return rows[-1]["val_loss"] if rows else None


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def point_record(plan: LadderPlan, run: RunPlan, point: PointPlan, result, loss_stable, wall_s: float) -> dict:
    import torch

    cfg, m = plan.config, plan.manifest
    return {
        "arch": run.arch, "pattern": run.pattern, "size": run.size, "seed": run.seed, "budget": point.budget,
        "params_nonemb": run.params_nonemb, "params_total": run.model.num_params(), "tokens": point.tokens,
        "loss": result.final_val_loss, "loss_bpb": result.final_val_bpb, "loss_stable": loss_stable,
        "epochs": point.epochs, "steps": point.steps, "branch_step": point.branch_step,
        "decay_steps": point.steps - point.branch_step, "batch_sequences": run.batch_sequences,
        "seq_len": cfg.seq_len, "lr": run.lr, "beta2": run.beta2, "warmup_steps": run.warmup_steps,
        "flops": run.model.flops_per_token(cfg.seq_len) * point.tokens, "wall_s": round(wall_s, 3),
        "device": _device_name(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ladder": cfg.name,
        "fingerprint": point.fingerprint,
        "data": {"path": str(plan.data), "tokenizer_sha256": m["tokenizer"]["sha256"],
                 "train_tokens": m["splits"]["train"]["tokens"], "val_tokens": m["splits"]["val"]["tokens"]},
        "model": dataclasses.asdict(run.model),
    }


def run_job(plan: LadderPlan, run: RunPlan, out: Path, deadline: float | None = None, log=print) -> str:
    """Train every missing point of ``run``; ``"done"``, or ``"paused"`` when the deadline stopped it (its
    checkpoints stay: the next call continues)."""
    from olmo_hybrid.checkpoint import list_checkpoints

    out = Path(out)
    stable = run_dir(out, run) / "stable"
    for point in run.points:
        if run.key(point) in done_points(plan, out, log=log):
            continue
        check_schedules(plan, run, point)
        t0 = time.time()
        have = {c.step: c.path for c in list_checkpoints(stable)}
        if point.branch_step not in have:
            newest = max(have, default=0)
            if newest > point.branch_step:
                raise LadderError(f"{run.id}: the stable phase is at step {newest}, past the branch step "
                                  f"{point.branch_step} of the missing {point.budget:g}x point; delete {stable} to "
                                  "train the stable phase again")
            log(f"{run.id}: stable phase from step {newest} to {point.branch_step}")
            if _phase(plan, run, point.branch_step, "constant", stable, deadline, log) is None:
                return "paused"
            have = {c.step: c.path for c in list_checkpoints(stable)}
        branch = branch_dir(out, run, point)
        if not list_checkpoints(branch):
            seed_branch(stable, have[point.branch_step], branch)
        log(f"{run.id}: decay to 0 from step {point.branch_step} to {point.steps} ({point.budget:g}x)")
        result = _phase(plan, run, point.steps, "wsd", branch, deadline, log)
        if result is None:
            return "paused"
        if result.steps != point.steps or result.final_val_loss is None:
            raise LadderError(f"{run.id} {point.budget:g}x: the branch ended at step {result.steps} of {point.steps}")
        if not math.isfinite(result.final_val_loss):
            raise LadderError(f"{run.id} {point.budget:g}x: validation loss {result.final_val_loss} after the decay: "
                              f"the run diverged (see {branch / 'metrics.jsonl'}); no point recorded. Lower "
                              "recipe.lr for the whole ladder, or drop this size")
        record = point_record(plan, run, point, result, _stable_val_loss(stable, point.branch_step), time.time() - t0)
        append_result(out / RESULTS, record, log=log)
        log(f"{run.id}: {point.budget:g}x point: loss {record['loss']:.4f} after {point.tokens:,} tokens "
            f"({point.epochs:.2f} epochs)")
        if not plan.config.keep_checkpoints:
            shutil.rmtree(branch / "checkpoints", ignore_errors=True)
    shutil.rmtree(stable / "checkpoints", ignore_errors=True)  # every point is in: the phase is not needed again
    return "done"


def last_logged_step(run_directory: Path) -> int:
    """The step of the last line of a trainer run's metrics.jsonl (0 if none): live progress, cheap to read."""
    path = Path(run_directory) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().split(b"\n")
    except OSError:
        return 0
    for raw in reversed(lines):
        try:
            return int(json.loads(raw)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0
