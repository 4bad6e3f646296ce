"""Hugging Face exports: a finished run's ``RUN/hf``, and ``convert`` from any checkpoint to a clean HF directory.

Both build the new directory beside its destination and swap it in whole (``fsio.install_dir``): an
interrupted or failed write (a full disk) leaves the previous export as it was, and a model with
non-finite weights is never exported. ``convert`` also refuses to write where it would destroy
something: onto its source, into a directory that is not a HF checkpoint, or over another model
unless asked to (``overwrite``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from olmo_hybrid.checkpoint.load import load_model_and_tokenizer, stored_dtype
from olmo_hybrid.checkpoint.run_dir import HF_EXPORT, is_hf_dir, is_run_dir
from olmo_hybrid.checkpoint.state import summarize_names, nonfinite_tensors
from olmo_hybrid.errors import CheckpointError, DivergenceError, WriteError
from olmo_hybrid.fsio import failure_reason, install_dir, staging_dir


def write_hf_dir(model: torch.nn.Module, dst: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 5 * 1024**3) -> Path:
    """``model.save_pretrained`` (+ the tokenizer) into a new directory swapped in for ``dst`` whole.

    Raises ``DivergenceError`` for non-finite weights and ``WriteError`` when the write fails; either way
    ``dst`` is left as it was."""
    from safetensors import SafetensorError

    dst = Path(dst)
    previous = f"{dst} is unchanged" if dst.exists() else f"nothing was written to {dst}"
    bad = nonfinite_tensors(model)
    if bad:
        raise DivergenceError(f"not exporting to {dst}: the model holds non-finite values in {summarize_names(bad)}; "
                              f"{previous}")
    tmp = None
    try:
        tmp = staging_dir(dst)
        model.save_pretrained(tmp, dtype=dtype, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
        install_dir(tmp, dst)
    except (OSError, SafetensorError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"could not write the Hugging Face checkpoint {dst}: {failure_reason(e)}; {previous}") from e
    return dst


def export_hf(run_dir: str | Path, model: torch.nn.Module, tokenizer=None) -> Path:
    """Write ``RUN/hf`` (``save_pretrained`` + the tokenizer's files) atomically; return its path."""
    return write_hf_dir(model, Path(run_dir) / HF_EXPORT, tokenizer)


def check_convert_destination(src: str | Path, dst: str | Path, overwrite: bool = False) -> None:
    """Refuse (``CheckpointError``) a destination whose contents ``convert`` would destroy."""
    src, dst = Path(src), Path(dst)
    read_from = src / HF_EXPORT if is_run_dir(src) and is_hf_dir(src / HF_EXPORT) else src
    if dst.resolve() in (src.resolve(), read_from.resolve()):
        raise CheckpointError(f"{dst} is the checkpoint being converted: convert writes a new directory, "
                              "choose another DST")
    if is_hf_dir(read_from) and read_from.resolve() in dst.resolve().parents:
        raise CheckpointError(f"{dst} is inside the checkpoint being converted ({read_from}): a copy there would "
                              "travel with it; choose a DST outside it")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory")
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    if not is_hf_dir(dst):
        raise CheckpointError(f"{dst} is not empty and is not a Hugging Face checkpoint (config.json + "
                              "*.safetensors): refusing to write into it; choose a new or empty directory")
    if not overwrite:
        raise CheckpointError(f"{dst} already holds a Hugging Face checkpoint: pass --overwrite to replace it")


def convert_checkpoint(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None,
                       overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3):
    """Write a clean HF ``olmo_hybrid`` checkpoint of ``src`` (any accepted HF naming variant or a run
    directory) to ``dst``; returns ``(model, tokenizer or None, dtype written)``.

    The tensors keep the source's dtype unless ``dtype`` is given (a run directory's weights are fp32).
    ``dst`` must be new, empty, or (with ``overwrite``) another HF checkpoint, which is then replaced whole.
    """
    check_convert_destination(src, dst, overwrite)
    src = Path(src)
    if dtype is None:
        hf = src if is_hf_dir(src) else src / HF_EXPORT
        dtype = stored_dtype(hf) if is_hf_dir(hf) else torch.float32
    model, tok = load_model_and_tokenizer(src, dtype=dtype, require_tokenizer=False)
    write_hf_dir(model, dst, tok, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return model, tok, dtype
