"""Load a model and its tokenizer from any checkpoint a user has (generate, convert, eval, lm-eval, info).

A checkpoint is either a Hugging Face directory (``config.json`` + safetensors, as written by
``HybridLM.save_pretrained``; its ``tokenizer.json`` when present) or a training run directory (its
``hf/`` export when the run finished, else its newest checkpoint whose checksums verify), or one checkpoint
of a run (``RUN/checkpoints/step_N``, with the run's tokenizer).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

from olmo_hybrid.checkpoint.run_dir import (CONFIG, HF_EXPORT, MANIFEST, is_hf_dir, is_run_dir, list_checkpoints,
                                            read_run_config)
from olmo_hybrid.checkpoint.state import load_model_weights
from olmo_hybrid.distributed import resolve_device
from olmo_hybrid.errors import CheckpointError, ConfigError

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _neither(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} is neither a Hugging Face checkpoint (config.json + *.safetensors) nor a "
                           "training run directory")


def read_model_config(path: str | Path):
    """The ``ModelConfig`` of a HF checkpoint or a run directory, without loading weights."""
    from olmo_hybrid.config import ModelConfig, from_dict
    from olmo_hybrid.model.hf_io import read_config

    path = Path(path)
    if is_hf_dir(path):
        return read_config(path)
    if (path / CONFIG).is_file() and is_run_dir(path):
        return from_dict(ModelConfig, read_run_config(path)["model"], "model")
    if is_hf_dir(path / HF_EXPORT):
        return read_config(path / HF_EXPORT)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise _neither(path)


def stored_dtype(hf_dir: str | Path) -> torch.dtype:
    """The floating-point dtype most tensors of a HF checkpoint are stored in (from the safetensors headers)."""
    from safetensors import SafetensorError, safe_open

    from olmo_hybrid.model.hf_io import weight_files

    counts: Counter = Counter()
    try:
        for name in weight_files(Path(hf_dir))[0]:
            with safe_open(str(Path(hf_dir) / name), framework="pt") as st:
                counts.update(st.get_slice(k).get_dtype() for k in st.keys())
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{hf_dir}: {e}") from e
    floating = [(n, d) for d, n in counts.items() if d in _SAFETENSORS_DTYPES]
    return _SAFETENSORS_DTYPES[max(floating)[1]] if floating else torch.float32


def _load_hf(path: Path, dtype, device):
    from safetensors import SafetensorError

    from olmo_hybrid.model import HybridLM

    try:
        return HybridLM.from_pretrained(path, dtype=dtype, device=device)
    except ConfigError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        text = str(e)
        raise CheckpointError(text if str(path) in text else f"{path}: {text}") from e


def _load_checkpoint(path: Path):
    """The model of one training checkpoint (``RUN/checkpoints/step_N``), its checksums verified first."""
    from olmo_hybrid.config import ModelConfig, from_dict
    from olmo_hybrid.model import HybridLM

    model = HybridLM(from_dict(ModelConfig, read_run_config(path)["model"], "model"), init=False)
    load_model_weights(path, model)
    return model


def _load_run(path: Path, step: int | None, log):
    found = list_checkpoints(path, valid_only=False)
    if step is not None:
        found = [c for c in found if c.step == step]
        if not found:
            raise CheckpointError(f"run directory {path} has no checkpoint for step {step}")
    for info in reversed(found):
        try:
            return _load_checkpoint(info.path)
        except CheckpointError as e:
            if step is not None:
                raise
            log(f"note: {e}; trying the previous checkpoint")
    raise CheckpointError(f"run directory {path} has no hf/ export and no usable checkpoint")


def _run_tokenizer_file(run_dir: Path) -> Path | None:
    """``tokenizer.json`` of a run: from its hf/ export, else the copy written at start-up."""
    for f in (run_dir / HF_EXPORT / "tokenizer.json", run_dir / "tokenizer.json"):
        if f.is_file():
            return f
    return None


def load_model_and_tokenizer(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                             tokenizer: str | None = None, require_tokenizer: bool = True, step: int | None = None,
                             log=_stderr):
    """``(model in eval mode on device, tokenizer)`` from a HF directory or a training run directory.

    A run directory gives its ``hf/`` export, else its newest checkpoint that verifies (damaged newer ones
    are skipped with a note through ``log``), or the checkpoint of ``step``. ``dtype`` casts the weights
    (default: fp32). ``tokenizer`` overrides the checkpoint's ("dolma2", a file or a directory). A HF
    directory without tokenizer.json gets dolma2 when its vocabulary has dolma2's padded size; otherwise
    the tokenizer is None, which is an error unless ``require_tokenizer`` is False. Every failure is a
    ``CheckpointError`` (or ``ConfigError``/``DataError``) naming the file at fault.
    """
    from olmo_hybrid.data.tokenizer import load_tokenizer

    path = Path(path)
    if not isinstance(device, torch.device):
        device = resolve_device(str(device), setting="device")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a Hugging Face directory or a training "
                              "run directory)")
    if is_hf_dir(path) and step is None:
        model = _load_hf(path, dtype, device)
        tok_source = tokenizer or (path if (path / "tokenizer.json").is_file() else None)
        if tok_source is None and model.config.vocab_size == load_tokenizer("dolma2").padded_vocab_size():
            tok_source = "dolma2"
    elif (path / MANIFEST).is_file() and step is None:  # one checkpoint of a run, given directly
        model = _load_checkpoint(path).to(device=device, dtype=dtype)
        tok_source = tokenizer or _run_tokenizer_file(path.parent.parent)
    elif path.is_dir() and is_run_dir(path):
        if step is None and is_hf_dir(path / HF_EXPORT):
            model = _load_hf(path / HF_EXPORT, dtype, device)
        else:
            model = _load_run(path, step, log).to(device=device, dtype=dtype)
        tok_source = tokenizer or _run_tokenizer_file(path)
    else:
        raise _neither(path)
    model.eval()
    if tok_source is None:
        if not require_tokenizer:
            return model, None
        raise CheckpointError(f"checkpoint {path} has no tokenizer.json: pass --tokenizer (e.g. dolma2)")
    tok = load_tokenizer(tok_source)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocab_size is "
                              f"{model.config.vocab_size}: wrong tokenizer for {path}?")
    return model, tok
