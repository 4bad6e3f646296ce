"""Load a model and its tokenizer from any checkpoint a user has (used by generate, convert, eval, lm-eval).

A checkpoint is either a Hugging Face directory (``config.json`` + safetensors, as written by
``HybridLM.save_pretrained``; its ``tokenizer.json`` when present) or a training run directory
(``olmo_hybrid.train.load_model_from_run``: the ``hf/`` export, else the newest valid checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_checkpoint(path: str | Path, device: str = "cpu", tokenizer: str | None = None,
                    dtype: torch.dtype | None = None, require_tokenizer: bool = True):
    """``(model in eval mode, tokenizer)``. ``tokenizer`` overrides the checkpoint's ("dolma2", a file or a
    directory). A HF directory without tokenizer.json gets dolma2 when its vocabulary has dolma2's padded size;
    otherwise the tokenizer is None, which is an error unless ``require_tokenizer`` is False."""
    from olmo_hybrid.data.tokenizer import load_tokenizer
    from olmo_hybrid.model import HybridLM

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a Hugging Face directory or a run directory)")
    if is_hf_dir(path):
        model = HybridLM.from_pretrained(path, dtype=dtype, device=device).eval()
        tok_source = tokenizer or (path if (path / "tokenizer.json").is_file() else None)
        if tok_source is None and model.config.vocab_size == load_tokenizer("dolma2").padded_vocab_size():
            tok_source = "dolma2"
    elif path.is_dir():
        from olmo_hybrid.train import load_model_from_run, tokenizer_file_of_run

        model = load_model_from_run(path, device=device)
        if dtype is not None:
            model = model.to(dtype)
        model.eval()
        tok_source = tokenizer or tokenizer_file_of_run(path)
    else:
        raise FileNotFoundError(f"checkpoint {path} is neither a Hugging Face directory (config.json + "
                                "*.safetensors) nor a training run directory")
    if tok_source is None:
        if not require_tokenizer:
            return model.eval(), None
        raise FileNotFoundError(f"checkpoint {path} has no tokenizer.json: pass --tokenizer (e.g. dolma2)")
    tok = load_tokenizer(tok_source)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}: wrong tokenizer for {path}?")
    return model, tok
