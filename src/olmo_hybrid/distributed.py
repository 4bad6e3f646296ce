"""Process-group set-up for ``torchrun`` and the few collectives the trainer and checkpoints need.

A run started by ``torchrun --nproc-per-node=N`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the
environment) joins one process group: NCCL when the device is CUDA, gloo on CPU (tests, laptops).
A plain ``python -m olmo_hybrid.train`` / ``olmo-hybrid train`` is world size 1: no process group is
created and every helper here is a no-op, so single-process runs stay exactly what they were.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from olmo_hybrid.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0, setting: str = "trainer.device") -> torch.device:
    """``auto``: cuda (this process's local GPU), then mps, then cpu; ``cuda`` means the local GPU too. Errors
    name ``setting``, the config field or command-line flag that gave ``name``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank) if dist_env_world_size() > 1 else torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{setting}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name!r} but CUDA is not available (use 'auto' or 'cpu')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{setting}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{setting}={name!r} but MPS (Apple GPU) is not available (use 'auto' or 'cpu')")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{setting}={name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and device.index is None and dist_env_world_size() > 1:
        device = torch.device("cuda", local_rank)
    return device


def dist_env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from e


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def single_process(device: str | torch.device = "cpu") -> DistEnv:
    """The environment of a plain (not torchrun) process."""
    return DistEnv(0, 1, 0, torch.device(device))


def init_distributed(device_name: str, timeout_minutes: float = 30.0) -> DistEnv:
    """Join the torchrun process group (if any) and pick this process's device."""
    world = dist_env_world_size()
    if world <= 1:
        return DistEnv(0, 1, 0, resolve_device(device_name))
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or bad ({e}): start with torchrun") from e
    device = resolve_device(device_name, local_rank)
    if device.type == "mps":
        raise ConfigError("multi-process training needs CUDA (NCCL) or CPU (gloo); set trainer.device=cpu")
    if not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device  # binds NCCL to this GPU up front (no guessing, no hang on first use)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    return DistEnv(rank, world, local_rank, device)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce(t: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place over all ranks (``sum``, ``max`` or ``min``); returns it. Identity on one process."""
    if env.distributed:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. "my write failed"). One process
    answers without touching the device (no host sync)."""
    if not env.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    return bool(all_reduce(t, env, "max").item() > 0)


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` on one process."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_zero(log, env: DistEnv):
    """``log`` on rank 0; a no-op elsewhere, so N processes print one log."""
    return log if env.is_main else (lambda *_a, **_k: None)
