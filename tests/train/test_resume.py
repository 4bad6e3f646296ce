"""Exact resume, crash safety of checkpoint saves, and the errors around checkpoints."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.checkpoint import state as ckpt_state
from olmo_hybrid.config import to_dict
from olmo_hybrid.train.metrics import read_metrics
from olmo_hybrid.train.trainer import Trainer

from .conftest import make_config, quiet

STEPS = 8


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight_run(corpus_dir, tmp_path_factory):
    """An uninterrupted 8-step run: its per-step losses and final weights."""
    run = tmp_path_factory.mktemp("straight")
    cfg = make_config(corpus_dir, f"trainer.steps={STEPS}", "trainer.save_interval=2")
    trainer = Trainer(cfg, run, log=quiet)
    trainer.fit()
    return cfg, losses(run), {k: v.clone() for k, v in trainer.model.state_dict().items()}


class Crash(RuntimeError):
    pass


def test_resume_gives_bit_identical_losses(straight_run, corpus_dir, tmp_path):
    cfg, expected, weights = straight_run
    assert len(expected) == STEPS and expected[-1] < expected[0]
    first = Trainer(cfg, tmp_path, log=quiet)
    real_step = first.train_step

    def crash_after_half():
        if first.step == STEPS // 2:
            raise Crash("simulated crash")
        return real_step()

    first.train_step = crash_after_half
    with pytest.raises(Crash):
        first.fit()
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    second = Trainer(cfg, tmp_path, resume=True, log=quiet)
    result = second.fit()
    assert result.losses == expected[STEPS // 2:]  # this invocation's steps only
    assert losses(tmp_path) == expected  # the metrics file reads like the uninterrupted run's: exact floats
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, weights[name]), name


KILL_SCRIPT = r"""
import json, os, signal, sys
from olmo_hybrid.checkpoint import state
from olmo_hybrid.config import from_dict
from olmo_hybrid.train.config import TrainConfig
from olmo_hybrid.train.trainer import Trainer

cfg = from_dict(TrainConfig, json.load(open(sys.argv[1])))
real_write = state._write_file

def write_then_die(path, obj):
    # The second checkpoint (step 4) dies after its weights and optimizer state (DCP) and this rank's
    # loader state, before the global state and the manifest.
    real_write(path, obj)
    if path.parent.parent.name.startswith(".tmp-step_000004") and path.name == "rank0.pt":
        os.kill(os.getpid(), signal.SIGKILL)

state._write_file = write_then_die
Trainer(cfg, sys.argv[2], log=lambda *a: None).fit()
"""


def test_sigkill_during_save_resumes_from_previous_checkpoint(straight_run, tmp_path):
    cfg, expected, weights = straight_run
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(cfg_file), str(run)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = ckpt.checkpoints_dir(run)
    assert any(p.name.startswith(".tmp-step_000004") for p in root.iterdir())  # the save really was cut short
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2]
    assert ckpt.latest_checkpoint(run, log=quiet).step == 2

    resumed = Trainer(cfg, run, resume=True, log=quiet)
    assert resumed.step == 0  # loading happens in fit()
    resumed.fit()
    assert losses(run) == expected
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # the next save cleared the debris
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_incomplete_newest_checkpoint_is_skipped(corpus_dir, tmp_path):
    cfg = make_config(corpus_dir, "trainer.steps=3", "trainer.save_interval=1", "trainer.keep_last_k=0")
    Trainer(cfg, tmp_path, log=quiet).fit()
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1, 2, 3]
    newest = ckpt.checkpoints_dir(tmp_path) / "step_000003"
    shard = newest / ckpt.DCP_DIR / "__0_0.distcp"
    with open(shard, "r+b") as f:  # a torn write: the file is shorter than the manifest says
        f.truncate(10)
    skipped = []
    assert ckpt.latest_checkpoint(tmp_path, log=skipped.append).step == 2
    assert "__0_0.distcp" in skipped[0]
    (ckpt.checkpoints_dir(tmp_path) / "step_000002" / ckpt.MANIFEST).unlink()
    assert ckpt.latest_checkpoint(tmp_path, log=quiet).step == 1
    with pytest.raises(ckpt.CheckpointError, match="__0_0.distcp has 10 bytes"):
        ckpt.restore_checkpoint(newest, model=torch.nn.Linear(1, 1), optimizer=None)


def test_keep_last_k(corpus_dir, tmp_path):
    cfg = make_config(corpus_dir, "trainer.steps=5", "trainer.save_interval=1", "trainer.keep_last_k=2")
    Trainer(cfg, tmp_path, log=quiet).fit()
    assert sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir()) == ["step_000004", "step_000005"]


def test_disk_full_during_save_keeps_previous_checkpoint(corpus_dir, tmp_path, monkeypatch):
    cfg = make_config(corpus_dir, "trainer.steps=4", "trainer.save_interval=2")
    trainer = Trainer(cfg, tmp_path, log=quiet)
    real_write = ckpt_state._write_file

    def full_disk(path, obj):
        if path.parent.name.startswith(".tmp-step_000004") and path.name == "state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, obj)

    monkeypatch.setattr(ckpt_state, "_write_file", full_disk)
    with pytest.raises(ckpt.WriteError, match=r"step 4 .*no space left on device.*step_000002 is intact"):
        trainer.fit()
    root = ckpt.checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]  # no half-written directory left
    good = root / "step_000002"
    assert ckpt.validate_checkpoint(good) is None
    model = Trainer(cfg, tmp_path / "other", log=quiet).model
    state = ckpt.restore_checkpoint(good, model=model, optimizer=None)
    assert state["step"] == 2


def test_checkpoint_from_different_model_config_is_refused(corpus_dir, tmp_path):
    cfg = make_config(corpus_dir, "trainer.steps=2")
    Trainer(cfg, tmp_path, log=quiet).fit()
    before = sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir())
    other = make_config(corpus_dir, "trainer.steps=4", "model.d_model=48", "model.layer_pattern=G")
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(other, tmp_path, resume=True, log=quiet).fit()
    message = str(info.value)
    assert "model.d_model: checkpoint 32, config 48" in message
    assert "model.layer_pattern: checkpoint 'GA', config 'G'" in message
    assert "n_heads" not in message  # only the fields that differ
    assert sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir()) == before


def test_existing_run_needs_resume(corpus_dir, tmp_path):
    cfg = make_config(corpus_dir, "trainer.steps=2")
    Trainer(cfg, tmp_path, log=quiet).fit()
    with pytest.raises(ckpt.CheckpointError, match="--resume"):
        Trainer(cfg, tmp_path, log=quiet).fit()
    assert ckpt.latest_checkpoint(tmp_path).step == 2


def test_finished_run_exports_and_loads(corpus_dir, tmp_path):
    cfg = make_config(corpus_dir, "trainer.steps=2", "trainer.export_hf=true")
    trainer = Trainer(cfg, tmp_path, log=quiet)
    trainer.fit()
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "config.json").is_file()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    hf_model, hf_tok = ckpt.load_model_and_tokenizer(tmp_path)
    step_model, _ = ckpt.load_model_and_tokenizer(tmp_path, step=2)
    with torch.no_grad():
        expected = trainer.model.eval()(ids)
        from_hf, from_ckpt = hf_model(ids), step_model(ids)
    torch.testing.assert_close(from_hf, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_ckpt, expected, rtol=0, atol=0)
    assert hf_tok.fingerprint == trainer.tokenizer.fingerprint
    assert ckpt.read_model_config(tmp_path) == cfg.model
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint for step 7"):
        ckpt.load_model_and_tokenizer(tmp_path, step=7)
