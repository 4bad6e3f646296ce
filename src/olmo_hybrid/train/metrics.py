"""Where training metrics go: a JSONL file (always), the console, and optional TensorBoard / W&B."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from olmo_hybrid.fsio import atomic_write_text


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Appends one JSON object per step to ``RUN/metrics.jsonl`` and prints a progress line.

    On resume the file is first cut back to the resumed step (atomically), so that steps the killed
    run logged after its last checkpoint are not duplicated: the file of a resumed run reads like
    that of an uninterrupted one.
    """

    def __init__(self, run_dir: Path, total_steps: int, log_interval: int, resume_step: int = 0,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None,
                 stream=None):
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self.stream = stream or sys.stdout
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("trainer.tensorboard=true needs the tensorboard package "
                                  "(pip install tensorboard)") from e
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("trainer.wandb_project needs the wandb package (pip install wandb)") from e
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir),
                                     resume="allow", id=os.environ.get("WANDB_RUN_ID"))
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._start_step = resume_step
        self._start_time = time.perf_counter()

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if step % self.log_interval == 0 or step == self.total_steps or "val_loss" in record or "skipped" in record:
            self.print_progress(record)

    def eta_seconds(self, step: int) -> float:
        done = step - self._start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._start_time) / done * (self.total_steps - step)

    def print_progress(self, r: dict) -> None:
        step = r["step"]
        elapsed = time.perf_counter() - self._start_time
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}",
                 f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if r.get("grad_norm") is not None:
            parts.append(f"grad {r['grad_norm']:.3f}")
        parts.append(f"{r['tokens_per_s'] / 1000:.1f}k tok/s")
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4f} ({r['val_bpb']:.3f} bpb)")
        parts.append(f"{100 * step / self.total_steps:3.0f}% elapsed {format_duration(elapsed)} "
                     f"ETA {format_duration(self.eta_seconds(step))}")
        if "skipped" in r:
            parts.append(f"SKIPPED: {r['skipped']}")
        self.print(" | ".join(parts))

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
