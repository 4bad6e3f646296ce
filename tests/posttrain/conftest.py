"""A tiny source checkpoint (HF directory: 2-layer GA model, 300-id BPE without chat tokens) and small
conversation / preference files for the post-training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.data import train_bpe
from olmo_hybrid.model import HybridLM

WORDS = "apple pear plum fig lime kiwi date".split()
TINY = dict(vocab_size=384, d_model=32, n_layers=2, layer_pattern="GA", n_heads=2, gdn_heads=2, gdn_head_k=16,
            gdn_head_v=16, mlp_hidden=64, max_seq_len=256, rope_theta=10000.0)


def conversation(i: int) -> dict:
    ws = [WORDS[(i + k * 3) % len(WORDS)] for k in range(3)]
    return {"messages": [{"role": "user", "content": "first of: " + " ".join(ws)},
                         {"role": "assistant", "content": ws[0]}]}


def pair(i: int) -> dict:
    ws = [WORDS[(i + k * 3) % len(WORDS)] for k in range(3)]
    return {"prompt": "first of: " + " ".join(ws), "chosen": ws[0], "rejected": ws[1]}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe(["first of: " + " ".join(WORDS) + "\n"] * 8 + ["the quick brown fox jumps over the lazy dog"] * 4,
                     vocab_size=300)


@pytest.fixture(scope="session")
def source(tmp_path_factory, tokenizer):
    """An HF checkpoint directory without a chat template or chat tokens."""
    out = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    HybridLM(ModelConfig(**TINY)).save_pretrained(out)
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "chat.jsonl", [conversation(i) for i in range(40)])


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", [pair(i) for i in range(40)])


def quiet(*_args, **_kwargs) -> None:
    pass


class Crash(RuntimeError):
    pass


def crash_then_resume(trainer, kind: str, source, data: str, out, overrides: list[str], at: int = 4):
    """Run ``trainer`` until step ``at`` (the checkpoint saved there is the last thing it does), then continue the
    run with ``olmo-hybrid KIND ... --resume`` in a fresh process; returns that process."""
    real_step = trainer.train_step

    def crash():
        if trainer.step == at:
            raise Crash("killed")
        return real_step()

    trainer.train_step = crash
    with pytest.raises(Crash):
        trainer.fit()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "olmo_hybrid", kind, str(source), data, "--out", str(out),
                           "--resume", *overrides], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"(step {at}," in proc.stdout
    return proc
