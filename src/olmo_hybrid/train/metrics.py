"""Where training metrics go: a JSONL file (always), the console, and optional TensorBoard / W&B."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from olmo_hybrid.errors import CheckpointError, WriteError
from olmo_hybrid.fsio import atomic_write_text, failure_reason, read_jsonl


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, matched as
# substrings of torch.cuda.get_device_name(), most specific first. trainer.peak_tflops overrides.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)


def peak_flops(device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU: the override, else the table entry for a CUDA device's name,
    else None (CPU, unknown GPU: no MFU is logged)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if getattr(device, "type", device) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def peak_memory_gib(device) -> float | None:
    """The most memory the caching allocator held for tensors on a CUDA ``device`` since the start."""
    if getattr(device, "type", device) != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def read_metrics(path: str | Path, log=None) -> list[dict]:
    """The records of a metrics file. A last line cut short (the run was killed while writing it) is
    dropped and reported through ``log``; a damaged line before it (not JSON, not UTF-8) is a
    ``CheckpointError`` naming it, never read with its bytes replaced."""
    return [r for _, r in read_jsonl(path, log=log or (lambda _: None), error=CheckpointError)]


@dataclass
class StepOutput:
    """What one optimizer step leaves on the device until its metrics are read back (``read_back``), so
    a step needs no host sync."""

    step: int
    lr: float
    tokens: int
    loss: torch.Tensor  # the step's mean loss: cross-entropy per scored token (0-d, on the device)
    z_loss: torch.Tensor
    grad_norm: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # more 0-d metrics on the device (DPO's rewards)


def read_back(outputs: list[StepOutput]) -> list[dict]:
    """The per-step records of ``outputs`` (step, loss, z_loss, lr, grad_norm, tokens, the ``extra`` metrics;
    ``skipped`` with the reason when the update was skipped), read from the device in one transfer."""
    if not outputs:
        return []
    # float64: the fp32 metrics read back as they are, a float64 extra (DPO's sums) keeps its precision
    values = torch.cat([torch.stack([o.loss.double(), o.z_loss.double(), o.grad_norm.double(),
                                     *(v.double() for v in o.extra.values())]) for o in outputs]).tolist()
    records, at = [], 0
    for o in outputs:
        (loss, z_loss, grad_norm), extra = values[at:at + 3], values[at + 3:at + 3 + len(o.extra)]
        at += 3 + len(o.extra)
        record = {"step": o.step, "loss": loss, "z_loss": z_loss, "lr": o.lr, "grad_norm": grad_norm,
                  "tokens": o.tokens, **dict(zip(o.extra, extra))}
        if not math.isfinite(loss):
            record["skipped"] = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            record["skipped"] = f"non-finite gradient norm ({grad_norm})"
        records.append(record)
    return records


class MetricsLogger:
    """Appends one JSON object per step to ``RUN/metrics.jsonl`` and prints a progress line.

    On resume the file is first cut back to the resumed step (atomically), so that steps the killed
    run logged after its last checkpoint are not duplicated: the file of a resumed run reads like
    that of an uninterrupted one.
    """

    def __init__(self, run_dir: Path, total_steps: int, log_interval: int, resume_step: int = 0,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None,
                 stream=None, log=print):
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
        kept = [r for r in read_metrics(self.path, log) if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._start_step = resume_step
        self._start_time = time.perf_counter()

    def log(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise WriteError(f"could not append step {record['step']} to {self.path}: {failure_reason(e)}") from e
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
        if r.get("world_size", 1) > 1:
            parts.append(f"{r['tokens_per_s_per_device'] / 1000:.1f}k tok/s/device")
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("peak_mem_gib") is not None:
            parts.append(f"mem {r['peak_mem_gib']:.1f} GiB")
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


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the file and the console)."""

    def log(self, record: dict) -> None:
        pass

    def print(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
