"""Load what an evaluation needs from a checkpoint: the model (eval mode) and its tokenizer.

A checkpoint is either a Hugging Face directory (``config.json`` + safetensors, as written by
``HybridLM.save_pretrained``; its ``tokenizer.json`` when present) or a training run directory
(``olmo_hybrid.train.load_model_from_run``: the ``hf/`` export, else the newest valid checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_for_eval(path: str | Path, device: str = "cpu", tokenizer: str | None = None,
                  dtype: torch.dtype | None = None):
    """``(model, tokenizer)``. ``tokenizer`` overrides the checkpoint's ("dolma2", a file or a directory)."""
    from olmo_hybrid.data.tokenizer import load_tokenizer
    from olmo_hybrid.model import HybridLM

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a Hugging Face directory or a run directory)")
    if is_hf_dir(path):
        model = HybridLM.from_pretrained(path, dtype=dtype, device=device).eval()
        tok_source = tokenizer or (path if (path / "tokenizer.json").is_file() else None)
    elif path.is_dir():
        from olmo_hybrid.train import load_model_from_run, tokenizer_file_of_run

        model = load_model_from_run(path, device=device)
        if dtype is not None:
            model = model.to(dtype)
        tok_source = tokenizer or tokenizer_file_of_run(path)
    else:
        raise FileNotFoundError(f"checkpoint {path} is neither a Hugging Face directory (config.json + "
                                "*.safetensors) nor a training run directory")
    if tok_source is None:
        raise FileNotFoundError(f"checkpoint {path} has no tokenizer.json: pass --tokenizer (e.g. dolma2)")
    tok = load_tokenizer(tok_source)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}: wrong tokenizer for {path}?")
    return model, tok
