"""Training checkpoints: atomic save, validation, keep-last-k, resume, and export.

Layout of a run directory::

    RUN/config.json                    resolved config of the run
    RUN/metrics.jsonl                  one JSON object per optimizer step
    RUN/checkpoints/step_000200/       a checkpoint (below)
    RUN/hf/                            Hugging Face export of the finished model + tokenizer.json

A checkpoint (format 2, any number of processes)::

    model_and_optim/                   Distributed Checkpoint: .metadata + one __R_0.distcp per rank
    train/rank{R}.pt                   rank R's data-loader position and RNG state
    state.pt                           step, tokens, world_size;  config.json;  MANIFEST.json

Distributed Checkpoint stores each tensor with its global shape, so any number of processes loads
it (2 -> 1, 1 -> 4), and so does a plain model (``load_model_from_run``, the HF export). Format 1
(``model.pt``, ``optim.pt``, ``state.pt`` of one process) is still read.

A checkpoint is written into ``checkpoints/.tmp-step_N``; every file is fsynced, the manifest (file
names and sizes, written by rank 0 once every rank has finished) comes last, and only then is the
directory renamed to ``step_N``. A checkpoint counts as valid only if its manifest exists and every
listed file has the listed size, so a process killed at any point of a save leaves either the new
checkpoint complete or an ignored temporary directory, and the previous checkpoint is never touched.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torch.distributed as dist

from olmo_hybrid.fsio import fsync_dir
from olmo_hybrid.train.distributed import DistEnv, any_rank, barrier

MANIFEST = "MANIFEST.json"
FORMAT_VERSION = 2  # 1: model.pt + optim.pt + state.pt of one process (still read)
DCP_DIR = "model_and_optim"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit the run that tries to load it."""


@dataclass
class CheckpointInfo:
    path: Path
    step: int


# --------------------------------------------------------------------------------------------------
# Low-level atomic writes


def _write_file(path: Path, obj: Any) -> None:
    """Write ``obj`` (torch-serialisable, or ``str`` for text) to ``path`` and fsync it."""
    with open(path, "wb") as f:
        if isinstance(obj, str):
            f.write(obj.encode("utf-8"))
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Listing and validation


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def validate_checkpoint(path: Path) -> str | None:
    """Return why ``path`` is not a complete checkpoint, or None if it is."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest.name} missing (save interrupted?)"
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {e}"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, manifest says {size}"
    return None


def list_checkpoints(run_dir: str | Path, valid_only: bool = True) -> list[CheckpointInfo]:
    """Checkpoints of a run, oldest first; temporary directories of interrupted saves are skipped."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (not valid_only or validate_checkpoint(p) is None):
            found.append(CheckpointInfo(p, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | Path, log=print) -> CheckpointInfo | None:
    """The newest valid checkpoint; invalid newer ones are reported through ``log`` and skipped."""
    for info in reversed(list_checkpoints(run_dir, valid_only=False)):
        why = validate_checkpoint(info.path)
        if why is None:
            return info
        log(f"skipping incomplete checkpoint {info.path}: {why}")
    return None


# --------------------------------------------------------------------------------------------------
# Save / load


def _dcp(fn, state: dict, path: Path):
    """``dcp.save`` / ``dcp.load`` of ``state`` at ``path``; without a process group it runs in this process
    alone (DCP's warning that it 'assumes' so is silenced: here that is intended)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        return fn(state, checkpoint_id=path, no_dist=not dist.is_initialized())


def _model_and_optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """``{"model": ..., "optim": ...}`` keyed by parameter names, sharded as the model is (DTensors under
    FSDP); the same names whatever wrappers (activation checkpointing, compile, FSDP) are applied."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _tree_sizes(root: Path) -> dict[str, int]:
    return {f.relative_to(root).as_posix(): f.stat().st_size for f in sorted(root.rglob("*")) if f.is_file()}


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, config: dict, rank_state: dict | None = None, keep_last_k: int = 0,
                    env: DistEnv | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep_last_k`` (0: keep all).

    Collective: every rank calls it. Weights and optimizer state go through Distributed Checkpoint
    (each rank writes its shards into ``model_and_optim/``), ``rank_state`` (the data loader's) and the
    RNG state into ``train/rank{r}.pt``; rank 0 writes ``train_state``, the config and, once every rank
    has finished, the manifest, then renames the directory into place. On any write error (a full disk,
    a permission problem) on any rank the temporary directory is removed and every rank raises a
    ``CheckpointError``; existing checkpoints are untouched. All ranks must see one shared directory.
    """
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint import save as dcp_save

    env = env or DistEnv(0, 1, 0, torch.device("cpu"))
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}"
    previous = None
    error: BaseException | None = None
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left by saves that were killed
            shutil.rmtree(stale, ignore_errors=True)
        previous = latest_checkpoint(run_dir, log=lambda _: None)
        try:
            tmp.mkdir()
        except OSError as e:
            error = e
    barrier(env)
    if not any_rank(error is not None, env):
        try:
            _dcp(dcp_save, _model_and_optim_state(model, optimizer), tmp / DCP_DIR)
            (tmp / "train").mkdir(exist_ok=True)
            _write_file(tmp / "train" / f"rank{env.rank}.pt", {**(rank_state or {}), "rng": rng_state()})
            if env.is_main:
                _write_file(tmp / "state.pt", {**train_state, "step": step, "world_size": env.world_size})
                _write_file(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        except (OSError, CheckpointException) as e:
            error = e
    failed = any_rank(error is not None, env)  # every rank's files are on disk (or someone failed)
    if env.is_main and not failed:
        try:
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                fsync_dir(d)
            manifest = {"format": FORMAT_VERSION, "step": step, "world_size": env.world_size,
                        "files": _tree_sizes(tmp)}
            _write_file(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. after a resume); replace it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(root)
        except OSError as e:
            error = e
    failed = any_rank(error is not None, env)
    if failed:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous.path} is intact" if previous else "no earlier checkpoint exists"
        cause = error
        while cause is not None and not isinstance(cause, OSError):  # DCP wraps the rank's OSError
            inner = getattr(cause, "failures", None)
            cause = next(iter(inner.values()), None) if isinstance(inner, dict) and inner else cause.__cause__
        if error is None:
            reason = "another rank failed to write its part"
        elif isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            reason = "the disk is full"
        else:
            reason = str(cause or error)
        raise CheckpointError(f"could not write checkpoint for step {step} in {root}: {reason}; {kept}") from error
    if env.is_main and keep_last_k > 0:
        for old in list_checkpoints(run_dir)[:-keep_last_k]:
            # Removing the manifest first makes the directory invalid at once, so a kill in the
            # middle of rmtree never leaves something that looks like a checkpoint.
            (old.path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(old.path, ignore_errors=True)
    barrier(env)
    return final


def checkpoint_format(path: str | Path) -> int:
    return int(json.loads((Path(path) / MANIFEST).read_text()).get("format", 1))


def read_checkpoint_world_size(path: str | Path) -> int:
    """How many processes wrote checkpoint ``path`` (1 for format 1)."""
    return int(json.loads((Path(path) / MANIFEST).read_text()).get("world_size", 1))


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the weights of checkpoint ``path`` into ``model`` (plain or sharded, any world size)."""
    path = Path(path)
    if checkpoint_format(path) == 1:
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
        return
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = _model_and_optim_state(model, None)
    _dcp(dcp_load, state, path / DCP_DIR)
    set_model_state_dict(model, state["model"])


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    map_location: str | torch.device = "cpu", env: DistEnv | None = None, log=print) -> dict:
    """Load weights (and optimizer state) in place, on any number of ranks (DCP reshards); restore this
    rank's RNG state when the world size is the one that saved; return the train state: the global
    fields of ``state.pt`` plus this rank's ``rank_state`` (rank 0's when this rank did not exist)."""
    env = env or DistEnv(0, 1, 0, torch.device("cpu"))
    path = Path(path)
    why = validate_checkpoint(path)
    if why is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {why}")
    if checkpoint_format(path) == 1:
        if env.distributed:
            raise CheckpointError(f"{path} is a single-process checkpoint (format 1): resume it with one process "
                                  "first; every later checkpoint is sharded and resumes on any number of processes")
        model.load_state_dict(torch.load(path / "model.pt", map_location=map_location, weights_only=True))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optim.pt", map_location=map_location, weights_only=True))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        set_rng_state(state.pop("rng"))
        return state
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _model_and_optim_state(model, optimizer)
    _dcp(dcp_load, state, path / DCP_DIR)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    mine = path / "train" / f"rank{env.rank}.pt"
    rank_file = mine if mine.is_file() else path / "train" / "rank0.pt"
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    rng = rank_state.pop("rng")
    if train.get("world_size", 1) == env.world_size:
        set_rng_state(rng)
    else:
        log(f"note: {path} was saved by {train.get('world_size', 1)} processes and is resumed by "
            f"{env.world_size}: weights, optimizer and data order carry over, per-rank RNG streams do not")
    return {**train, **rank_state}


def read_checkpoint_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def model_config_diff(saved: dict, current: dict) -> list[str]:
    """Fields where two ``model`` config dicts differ, as 'model.name: checkpoint X, config Y'."""
    keys = sorted(set(saved) | set(current))
    return [f"model.{k}: checkpoint {saved.get(k, '<absent>')!r}, config {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k) != current.get(k)]


def check_model_config(path: str | Path, current_model: dict) -> None:
    saved = read_checkpoint_config(path).get("model", {})
    diff = model_config_diff(saved, current_model)
    if diff:
        raise CheckpointError(f"checkpoint {path} was trained with a different model config:\n  "
                              + "\n  ".join(diff)
                              + "\nUse the checkpoint's config, or start a fresh run in another --out directory.")


# --------------------------------------------------------------------------------------------------
# Export and loading for other tools


def export_hf(run_dir: str | Path, model: torch.nn.Module, tokenizer=None) -> Path:
    """Write ``RUN/hf`` (``save_pretrained`` + the tokenizer's files) atomically; return its path."""
    run_dir = Path(run_dir)
    final = run_dir / "hf"
    tmp = run_dir / f".tmp-hf-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not export the Hugging Face checkpoint to {final}: {e}") from e
    return final


def load_model_from_run(run_dir: str | Path, device: str | torch.device = "cpu", step: int | None = None):
    """The trained model of a run directory, in eval mode on ``device``.

    Uses ``RUN/hf`` when the run finished (and no ``step`` is asked for); otherwise the newest valid
    training checkpoint, or the one for ``step``.
    """
    from olmo_hybrid.config import ModelConfig, from_dict
    from olmo_hybrid.model import HybridLM

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if step is None and (run_dir / "hf" / "config.json").is_file():
        model = HybridLM.from_pretrained(run_dir / "hf")
    else:
        if step is None:
            info = latest_checkpoint(run_dir)
        else:
            info = next((c for c in list_checkpoints(run_dir) if c.step == step), None)
        if info is None:
            what = f"no valid checkpoint for step {step}" if step is not None else "no hf/ export and no valid checkpoint"
            raise CheckpointError(f"run directory {run_dir} has {what}")
        model = HybridLM(from_dict(ModelConfig, read_checkpoint_config(info.path)["model"], "model"), init=False)
        load_model_weights(info.path, model)
    return model.to(device).eval()


def model_config_from_run(run_dir: str | Path):
    """The ``ModelConfig`` of a run: from ``RUN/config.json`` (written at start-up), else its ``hf/`` export."""
    from olmo_hybrid.config import ModelConfig, from_dict

    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file():
        return from_dict(ModelConfig, read_checkpoint_config(run_dir)["model"], "model")
    if (run_dir / "hf" / "config.json").is_file():
        from olmo_hybrid.model.hf_io import read_config

        return read_config(run_dir / "hf")
    raise CheckpointError(f"{run_dir} is not a training run directory: no config.json")


def tokenizer_file_of_run(run_dir: str | Path) -> Path:
    """``tokenizer.json`` of a run (from its hf/ export, else the path recorded in its config)."""
    run_dir = Path(run_dir)
    exported = run_dir / "hf" / "tokenizer.json"
    if exported.is_file():
        return exported
    recorded = run_dir / "tokenizer.json"
    if recorded.is_file():
        return recorded
    raise CheckpointError(f"run directory {run_dir} has no tokenizer.json (neither hf/ nor the run root)")
