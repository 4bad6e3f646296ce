"""Training checkpoints: atomic sharded save, verified restore, and no checkpoint with non-finite values.

A checkpoint, written by any number of processes::

    model_and_optim/                   Distributed Checkpoint: .metadata + one __R_0.distcp per rank
    train/rank{R}.pt                   rank R's data-loader position and RNG state
    state.pt                           step, tokens, world_size;  config.json;  MANIFEST.json

Distributed Checkpoint stores each tensor with its global shape, so any number of processes loads it
(2 -> 1, 1 -> 4), and so does a plain model (``load_model_weights``, the HF export).

A save first checks that every weight and optimizer moment is finite (a diverged run is stopped, not
saved over its last good checkpoint). It writes into ``checkpoints/.tmp-step_N``; every file is fsynced,
the ranks hash the files (each a share) and rank 0 writes the manifest (size and SHA-256 of every file)
last, then renames the directory to ``step_N``. A process killed at any point of a save leaves either the
new checkpoint complete or an ignored temporary directory; a failed write (full disk) removes the
temporary directory and says why; the previous checkpoint is never touched. A restore verifies the
checksums and the finiteness of what it loaded before the run continues from it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from olmo_hybrid.checkpoint.run_dir import (FORMAT_VERSION, MANIFEST, CheckpointInfo, checkpoints_dir, file_sha256,
                                            latest_checkpoint, list_checkpoints, step_dir_name, validate_checkpoint)
from olmo_hybrid.distributed import DistEnv, all_gather_objects, any_rank, barrier, single_process
from olmo_hybrid.errors import CheckpointError, DivergenceError, WriteError
from olmo_hybrid.fsio import fsync_dir, install_dir, failure_reason

DCP_DIR = "model_and_optim"


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
# Finite values


def nonfinite_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      env: DistEnv | None = None) -> list[str]:
    """Names of the parameters (and AdamW moments, as 'NAME (optimizer exp_avg)') holding a NaN or inf.

    One host sync for all tensors. Collective under FSDP: each rank checks its shards, all get the union.
    """
    env = env or single_process()
    names, flags = [], []
    for name, p in model.named_parameters():
        tensors = [("", p)] + [(f" (optimizer {k})", v) for k, v in (optimizer.state.get(p, {}) if optimizer else {}).items()
                               if torch.is_tensor(v) and v.dim() > 0]
        for suffix, t in tensors:
            local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
            names.append(name + suffix)
            flags.append(torch.isfinite(local.detach()).all())
    bad = []
    if flags:
        device = flags[0].device
        bad = [n for n, ok in zip(names, torch.stack([f.to(device) for f in flags]).tolist()) if not ok]
    return sorted({n for part in all_gather_objects(bad, env) for n in part}, key=names.index)


def summarize_names(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --------------------------------------------------------------------------------------------------
# Save


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


def _hash_share(root: Path, env: DistEnv) -> dict[str, dict]:
    """Size and SHA-256 of this rank's share (round-robin) of the files under ``root``."""
    names = sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())
    return {n: {"size": (root / n).stat().st_size, "sha256": file_sha256(root / n)}
            for n in names[env.rank::env.world_size]}


def _remove_debris(root: Path) -> None:
    """Temporary directories of saves that were killed (never valid checkpoints)."""
    for stale in [*root.glob(".tmp-step_*"), *root.glob(".step_*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, config: dict, rank_state: dict | None = None, keep_last_k: int = 0,
                    env: DistEnv | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep_last_k`` (0: keep all).

    Collective: every rank calls it. Weights and optimizer state go through Distributed Checkpoint
    (each rank writes its shards into ``model_and_optim/``), ``rank_state`` (the data loader's) and the
    RNG state into ``train/rank{r}.pt``; rank 0 writes ``train_state``, the config and, once every rank
    has finished and hashed its share of the files, the manifest, then renames the directory into place.

    Raises ``DivergenceError`` (writing nothing) when a weight or optimizer moment is not finite, and
    ``WriteError`` when any rank cannot write (a full disk, a permission problem): the temporary directory
    is removed and existing checkpoints are untouched. All ranks must see one shared directory.
    """
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint import save as dcp_save

    env = env or single_process()
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    bad = nonfinite_tensors(model, optimizer, env)
    previous = latest_checkpoint(run_dir, log=lambda _: None)
    kept = f"the previous checkpoint {previous.path} is intact" if previous else "no earlier checkpoint exists"
    if bad:
        raise DivergenceError(f"not saving checkpoint for step {step}: non-finite values in {summarize_names(bad)} "
                              f"(the run diverged); {kept}")
    error: BaseException | None = None
    if env.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_debris(root)
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
        except (Exception, CheckpointException) as e:  # torch.save reports a failed write as RuntimeError
            error = e
    if not any_rank(error is not None, env):  # every rank's files are on disk: hash them, a share each
        share: dict = {}
        try:
            share = _hash_share(tmp, env)
        except OSError as e:
            error = e
        files = {k: v for part in all_gather_objects(share, env) for k, v in part.items()}
        if env.is_main and error is None:
            try:
                for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                    fsync_dir(d)
                manifest = {"format": FORMAT_VERSION, "step": step, "world_size": env.world_size,
                            "files": dict(sorted(files.items()))}
                _write_file(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
                install_dir(tmp, final)  # a re-save of the same step (after a resume) replaces it whole
                fsync_dir(root)
            except OSError as e:
                error = e
    if any_rank(error is not None, env):
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = failure_reason(error) if error is not None else "another rank failed to write its part"
        raise WriteError(f"could not write checkpoint for step {step} in {root}: {reason}; {kept}") from error
    if env.is_main and keep_last_k > 0:
        for old in list_checkpoints(run_dir)[:-keep_last_k]:
            # Removing the manifest first makes the directory invalid at once, so a kill in the
            # middle of rmtree never leaves something that looks like a checkpoint.
            (old.path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(old.path, ignore_errors=True)
    barrier(env)
    return final


# --------------------------------------------------------------------------------------------------
# Load


def _verify(path: Path, env: DistEnv) -> None:
    why = validate_checkpoint(path, checksums=True, env=env)
    if why is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {why}")


def _read(path: Path, what: str, fn):
    """Run a loader of checkpoint files; whatever it raises on a damaged file becomes a CheckpointError."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        return fn()
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {what}: {failure_reason(e)}") from e


def load_model_weights(path: str | Path, model: torch.nn.Module, env: DistEnv | None = None) -> None:
    """Load only the weights of checkpoint ``path`` into ``model`` (plain or sharded, any world size),
    after verifying the checkpoint's checksums."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    env = env or single_process()
    path = Path(path)
    _verify(path, env)
    state = _model_and_optim_state(model, None)
    _read(path, DCP_DIR, lambda: _dcp(dcp_load, state, path / DCP_DIR))
    set_model_state_dict(model, state["model"])


def restore_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                       env: DistEnv | None = None, log=print) -> dict:
    """Continue a run from checkpoint ``path``: verify its checksums, load weights (and optimizer state)
    in place on any number of ranks (DCP reshards), check that they are finite, restore this rank's RNG
    state when the world size is the one that saved, and return the train state: the global fields of
    ``state.pt`` plus this rank's ``rank_state`` (rank 0's when this rank did not exist).

    Raises ``CheckpointError`` naming the file when the checkpoint is damaged or holds non-finite values.
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    env = env or single_process()
    path = Path(path)
    _verify(path, env)
    state = _model_and_optim_state(model, optimizer)
    _read(path, DCP_DIR, lambda: _dcp(dcp_load, state, path / DCP_DIR))
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    bad = nonfinite_tensors(model, optimizer, env)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {summarize_names(bad)}")
    train = _read(path, "state.pt", lambda: torch.load(path / "state.pt", map_location="cpu", weights_only=True))
    mine = path / "train" / f"rank{env.rank}.pt"
    rank_file = mine if mine.is_file() else path / "train" / "rank0.pt"
    rank_state = _read(path, rank_file.name, lambda: torch.load(rank_file, map_location="cpu", weights_only=True))
    rng = rank_state.pop("rng")
    if train.get("world_size", 1) == env.world_size:
        set_rng_state(rng)
    else:
        log(f"note: {path} was saved by {train.get('world_size', 1)} processes and is resumed by "
            f"{env.world_size}: weights, optimizer and data order carry over, per-rank RNG streams do not")
    return {**train, **rank_state}


def restore_newest(run_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   env: DistEnv | None = None, log=print) -> tuple[CheckpointInfo, dict] | None:
    """``restore_checkpoint`` of the newest checkpoint that restores; each damaged, incomplete or
    non-finite newer one is reported through ``log`` and skipped. None when no checkpoint restores."""
    for info in reversed(list_checkpoints(run_dir, valid_only=False)):
        try:
            return info, restore_checkpoint(info.path, model=model, optimizer=optimizer, env=env, log=log)
        except CheckpointError as e:
            log(f"{e}: falling back to the previous checkpoint")
    return None
