"""The run directory: its layout, which of its checkpoints are valid, and whether a run may start in it.

Layout::

    RUN/config.json                    resolved config of the run (written at start-up)
    RUN/tokenizer.json                 the run's tokenizer (+ tokenizer_config.json)
    RUN/metrics.jsonl                  one JSON object per optimizer step
    RUN/checkpoints/step_000200/       a checkpoint (``state.py``): DCP shards, per-rank state, MANIFEST.json
    RUN/hf/                            Hugging Face export of the finished model + tokenizer.json
    RUN/.lock                          held by the trainer writing the directory (``lock.py``)

A checkpoint counts as complete when its manifest exists and every listed file has the listed size
(cheap: listing, rotation, the fallback after a kill). Before its contents are used they are also
checked against the SHA-256 sums in the manifest, so a file damaged without a change of size (a bad
disk, a stray write) is named instead of being loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from olmo_hybrid.distributed import DistEnv, all_gather_objects, single_process
from olmo_hybrid.errors import CheckpointError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
HF_EXPORT = "hf"
LOCK = ".lock"
MANIFEST = "MANIFEST.json"
# 3: the manifest lists {"size", "sha256"} per file. 2 (sizes only) is still read: its contents cannot be verified.
FORMAT_VERSION = 3
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointInfo:
    path: Path
    step: int


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_run_config(path: str | Path) -> dict:
    """``config.json`` of a run directory or checkpoint, as a dict."""
    f = Path(path) / CONFIG
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f} does not exist: {path} is not a training run directory or checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is unreadable: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{f} is not a training config (no 'model' section)")
    return data


def is_run_dir(path: str | Path) -> bool:
    """A directory a trainer wrote: it has checkpoints, or a config.json with a ``trainer`` section."""
    path = Path(path)
    if checkpoints_dir(path).is_dir():
        return True
    try:
        return "trainer" in read_run_config(path)
    except CheckpointError:
        return False


# --------------------------------------------------------------------------------------------------
# Manifest and validation


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None, f"{MANIFEST} missing (save interrupted?)"
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        return None, f"{MANIFEST} unreadable: {e}"
    return meta, None


def validate_checkpoint(path: str | Path, checksums: bool = False, env: DistEnv | None = None) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None if it is.

    Always: the manifest exists and every listed file has the listed size. With ``checksums`` also every
    file's SHA-256 (collective: every rank calls it and hashes a share of the files; all get one answer).
    """
    env = env or single_process()
    path = Path(path)
    meta, why = _read_manifest(path)
    entries = meta["files"] if meta else {}
    named = _STEP_DIR.match(path.name)
    if why is None and named and meta.get("step", int(named.group(1))) != int(named.group(1)):
        why = f"its {MANIFEST} is step {meta['step']}'s, not the one its name says (renamed?)"
    for name, entry in entries.items():
        size = entry["size"] if isinstance(entry, dict) else entry
        f = path / name
        if why is None and not f.is_file():
            why = f"{name} missing"
        elif why is None and f.stat().st_size != size:
            why = f"{name} has {f.stat().st_size} bytes, {MANIFEST} says {size}"
    if checksums:
        mismatch = None
        if why is None:
            summed = sorted(n for n, e in entries.items() if isinstance(e, dict) and "sha256" in e)
            for name in summed[env.rank::env.world_size]:
                if file_sha256(path / name) != entries[name]["sha256"]:
                    mismatch = f"{name} is damaged: its SHA-256 differs from the one in {MANIFEST}"
                    break
        why = why or next((m for m in all_gather_objects(mismatch, env) if m), None)
    return why


def read_checkpoint_world_size(path: str | Path) -> int:
    """How many processes wrote checkpoint ``path``."""
    meta, why = _read_manifest(Path(path))
    if why:
        raise CheckpointError(f"{path}: {why}")
    return int(meta.get("world_size", 1))


def list_checkpoints(run_dir: str | Path, valid_only: bool = True) -> list[CheckpointInfo]:
    """Checkpoints of a run, oldest first; temporary directories of interrupted saves are skipped, and
    with ``valid_only`` those whose files do not match their manifest's sizes."""
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
    """The newest complete checkpoint (sizes checked); incomplete newer ones are reported through ``log``."""
    for info in reversed(list_checkpoints(run_dir, valid_only=False)):
        why = validate_checkpoint(info.path)
        if why is None:
            return info
        log(f"skipping incomplete checkpoint {info.path}: {why}")
    return None


# --------------------------------------------------------------------------------------------------
# Starting a run in a directory


def check_run_dir(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse (``CheckpointError``) to start a run where it would replace something: a file, a non-empty
    directory that is not a run, or an earlier run unless ``resume`` (continue it) or ``overwrite``
    (start over, discarding its checkpoints, export and metrics) is asked for. Reads only."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite contradict each other: continue the run or start it over")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is a file, not a directory")
    if checkpoints_dir(run_dir).exists() and not checkpoints_dir(run_dir).is_dir():
        raise CheckpointError(f"{checkpoints_dir(run_dir)} is a file, not the run's checkpoint directory: "
                              "move it away, or choose another --out directory")
    for owned in run_dir.absolute().parents:  # what a run replaces or rotates away would take this run with it
        if owned in (checkpoints_dir(owned.parent), owned.parent / HF_EXPORT) and is_run_dir(owned.parent):
            raise CheckpointError(f"--out {run_dir} is inside {owned}, which the run in {owned.parent} replaces "
                                  "(checkpoint rotation, export, --overwrite): choose a directory outside it")
    if not run_dir.is_dir() or not any(p.name != LOCK for p in run_dir.iterdir()):
        return
    if not is_run_dir(run_dir):
        raise CheckpointError(f"--out {run_dir} is not empty and holds no training run (no checkpoints/, no "
                              f"{CONFIG} of a run): refusing to write into it; choose a new or empty directory")
    done = list_checkpoints(run_dir, valid_only=False)
    if resume and not done and (run_dir / HF_EXPORT).is_dir():  # a resume from step 0 would replace the export
        raise CheckpointError(f"--resume: {run_dir} holds a finished run (hf/ export) but no checkpoint to continue "
                              "from: pass --overwrite to start it over, or choose another --out directory")
    if resume or overwrite:
        return
    what = (f"checkpoints up to {done[-1].path.name}" if done else
            "a finished run (hf/ export)" if (run_dir / HF_EXPORT).is_dir() else "the start of a run")
    raise CheckpointError(f"{run_dir} already holds {what}: pass --resume to continue it, --overwrite to start "
                          "over (deletes its checkpoints, export and metrics), or choose another --out directory")


def model_config_diff(saved: dict, current: dict) -> list[str]:
    """Fields where two ``model`` config dicts differ, as 'model.name: checkpoint X, config Y'."""
    keys = sorted(set(saved) | set(current))
    return [f"model.{k}: checkpoint {saved.get(k, '<absent>')!r}, config {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k) != current.get(k)]


def check_model_config(path: str | Path, current_model: dict) -> None:
    """Refuse to continue checkpoint ``path`` with a model config that differs from the one it was trained with.
    The kernel settings (``model.kernels``) may change: they choose numerics and tiles, not the model."""
    saved = {k: v for k, v in read_run_config(path)["model"].items() if k != "kernels"}
    diff = model_config_diff(saved, {k: v for k, v in current_model.items() if k != "kernels"})
    if diff:
        raise CheckpointError(f"checkpoint {path} was trained with a different model config: " + "; ".join(diff)
                              + ". Use the checkpoint's config, or start a fresh run in another --out directory.")
