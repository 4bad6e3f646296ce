"""Guard rails of training runs: settings checked before any work, one trainer per run directory,
a finished run never replaced by accident, divergence stopped before it reaches a checkpoint or the export,
damaged checkpoints and metrics lines survived, a full disk reported, Ctrl-C answered with the resume point.

In every case that could destroy something, the run directory's files are hashed before and after.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket

import pytest
import torch

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.checkpoint import state as ckpt_state
from olmo_hybrid.cli import main
from olmo_hybrid.config import ConfigError, apply_overrides, to_dict
from olmo_hybrid.train.config import build_config
from olmo_hybrid.train.metrics import read_metrics
from olmo_hybrid.train.trainer import Trainer

from .conftest import make_config, quiet


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def finished_run(corpus_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 and an HF export; tests work on copies."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = make_config(corpus_dir, "trainer.steps=4", "trainer.save_interval=2", "trainer.keep_last_k=0",
                      "trainer.export_hf=true", "trainer.eval_interval=0")
    Trainer(cfg, run, log=quiet).fit()
    return cfg, run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    cfg, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    return cfg, tmp_path / "run"


# --------------------------------------------------------------------------------------------------
# Settings


def test_non_finite_settings_are_refused_like_nan(corpus_dir, tmp_path):
    for bad in ("inf", "nan", "-inf", "1e999"):
        with pytest.raises(ConfigError, match=r"optim\.lr"):
            build_config(None, [f"optim.lr={bad}"])
    with pytest.raises(ConfigError, match=r"model\.norm_eps"):
        build_config(None, ["model.norm_eps=inf"])
    path = tmp_path / "cfg.json"
    path.write_text('{"optim": {"lr": Infinity}}')
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        build_config(path)
    cfg = make_config(corpus_dir)
    cfg.optim.lr = float("inf")  # the Python API checks what the command line checks
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a finite number"):
        Trainer(cfg, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()


def test_lengths_and_sample_settings_are_checked_before_any_work(corpus_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"data\.seq_len=128 exceeds the model's limit model\.max_seq_len=64"):
        make_config(corpus_dir, "data.seq_len=128")
    for override, why in (("trainer.sample_temperature=-1", "sample_temperature must be >= 0"),
                          ("trainer.sample_top_k=-1", "sample_top_k must be >= 0"),
                          ("trainer.max_consecutive_skips=0", "max_consecutive_skips must be positive")):
        with pytest.raises(ConfigError, match=why):
            make_config(corpus_dir, override)

    # The prompt needs the tokenizer; it is checked before the model is built or anything is written.
    monkeypatch.setattr("olmo_hybrid.train.trainer.HybridLM", None)  # building a model would fail loudly
    for overrides, why in ((["trainer.sample_tokens=5", "trainer.sample_prompt="], "encodes to zero tokens"),
                           (["trainer.sample_tokens=60", "trainer.sample_prompt=ROMEO: what say you, good friar?"],
                            r"\+ trainer\.sample_tokens=60 exceeds model\.max_seq_len=64")):
        with pytest.raises(ConfigError, match=why):
            Trainer(make_config(corpus_dir, *overrides), tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# One trainer per run directory; a run is never replaced by accident


def test_second_trainer_on_a_running_directory_is_refused(corpus_dir, tmp_path, hash_tree):
    cfg = make_config(corpus_dir, "trainer.steps=3", "trainer.save_interval=1", "trainer.eval_interval=0")
    first = Trainer(cfg, tmp_path, log=quiet)
    real_step, seen = first.train_step, {}

    def step_then_intrude():
        if first.step == 2:
            before = hash_tree(tmp_path)
            with pytest.raises(ckpt.CheckpointError) as info:
                Trainer(cfg, tmp_path, resume=True, log=quiet).fit()
            seen["error"], seen["same"] = str(info.value), hash_tree(tmp_path) == before
        return real_step()

    first.train_step = step_then_intrude
    first.fit()
    assert f"in use by another training process (pid {os.getpid()} on host {socket.gethostname()}" in seen["error"]
    assert seen["same"]
    assert ckpt.latest_checkpoint(tmp_path).step == 3  # the first trainer finished undisturbed
    assert (tmp_path / ckpt.LOCK).read_text() == ""  # and released the lock


def test_a_run_that_finished_since_the_trainer_was_built_is_not_overwritten(corpus_dir, tmp_path, hash_tree):
    cfg = make_config(corpus_dir, "trainer.steps=2", "trainer.eval_interval=0")
    late = Trainer(cfg, tmp_path, log=quiet)  # built while the directory was still empty
    Trainer(cfg, tmp_path, log=quiet).fit()
    before = hash_tree(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints up to step_000002"):
        late.fit()
    assert hash_tree(tmp_path) == before


def test_a_run_is_never_replaced_without_resume_or_overwrite(run_copy, tmp_path, hash_tree):
    cfg, run = run_copy
    before = hash_tree(run)
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints up to step_000004: pass --resume"):
        Trainer(cfg, run, log=quiet)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ckpt.CheckpointError, match=r"already holds a finished run \(hf/ export\)"):
        Trainer(cfg, run, log=quiet)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "config.json").write_text('{"mine": true}')
    with pytest.raises(ckpt.CheckpointError, match="is not empty and holds no training run"):
        Trainer(cfg, stranger, resume=True, log=quiet)
    assert hash_tree(stranger) == {"config.json": hash_tree(stranger)["config.json"]}
    assert hash_tree(run) == {k: v for k, v in before.items() if not k.startswith("checkpoints/")}

    Trainer(cfg, run, overwrite=True, log=quiet).fit()  # asked for: starts over
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------
# Divergence


def test_weights_gone_non_finite_stop_the_run_before_any_checkpoint_or_export(run_copy, hash_tree):
    """What `optim.lr=inf` did on a resume: an update makes the weights NaN. The next save refuses, so neither
    the keep-last-k rotation nor the export replaces a finite checkpoint."""
    cfg, run = run_copy
    kept = {name: hash_tree(run / name) for name in ("checkpoints", "hf")}
    cfg = apply_overrides(cfg, ["trainer.steps=8", "trainer.save_interval=1", "trainer.keep_last_k=1"])
    trainer = Trainer(cfg, run, resume=True, log=quiet)
    real_step = trainer.optimizer.step

    def diverging_step(*args, **kwargs):
        real_step(*args, **kwargs)
        with torch.no_grad():
            trainer.model.lm_head.weight.mul_(float("inf"))

    trainer.optimizer.step = diverging_step
    with pytest.raises(ckpt.DivergenceError, match=r"not saving checkpoint for step 5: non-finite values in "
                                                   r"lm_head\.weight.*step_000004 is intact"):
        trainer.fit()
    assert {name: hash_tree(run / name) for name in kept} == kept


def test_consecutive_skipped_steps_stop_the_run(run_copy, hash_tree):
    cfg, run = run_copy
    kept = {name: hash_tree(run / name) for name in ("checkpoints", "hf")}
    cfg = apply_overrides(cfg, ["trainer.steps=20", "trainer.max_consecutive_skips=3", "trainer.log_interval=2",
                                "trainer.save_interval=0"])
    trainer = Trainer(cfg, run, resume=True, log=quiet)
    real_forward = trainer.forward_model
    trainer.forward_model = lambda ids, doc_ids=None: real_forward(ids, doc_ids=doc_ids) * float("nan")
    with pytest.raises(ckpt.DivergenceError) as info:
        trainer.fit()
    message = str(info.value)
    assert "3 steps in a row were skipped, the last at step 7 (non-finite loss (nan))" in message
    assert "step_000004 (step 4) is finite" in message and "\n" not in message
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]  # read back every 2 steps: 8 was logged too
    assert all("skipped" in r for r in records[4:])
    assert {name: hash_tree(run / name) for name in kept} == kept


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints and metrics


def test_resume_falls_back_from_a_damaged_or_non_finite_checkpoint(run_copy, hash_tree):
    cfg, run = run_copy
    expected = _losses(run)
    newest = run / "checkpoints" / "step_000004"
    shard = newest / ckpt.DCP_DIR / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4] = b"\x00\x00\xc0\x7f"  # NaN written in place: the size is unchanged
    shard.write_bytes(bytes(data))
    shutil.rmtree(run / "hf")  # a run killed after step 4's save, before the export
    notes = []
    resumed = Trainer(cfg, run, resume=True, log=notes.append)
    resumed.fit()
    assert any("model_and_optim/__0_0.distcp is damaged" in n and "falling back" in n for n in notes), notes
    assert any("resumed from" in n and "step_000002" in n for n in notes)
    assert _losses(run) == expected  # steps 3 and 4 again, bit for bit
    assert ckpt.validate_checkpoint(newest, checksums=True) is None  # step 4 written anew

    # A checkpoint that holds NaN with matching checksums (written by a run without this guard).
    with torch.no_grad():
        resumed.model.model.embed_tokens.weight[0, 0] = float("nan")
    original = ckpt_state.nonfinite_tensors
    ckpt_state.nonfinite_tensors = lambda *a, **k: []
    try:
        resumed.save()
    finally:
        ckpt_state.nonfinite_tensors = original
    notes.clear()
    Trainer(cfg, run, resume=True, log=notes.append).fit()
    assert any("holds non-finite values in model.embed_tokens.weight" in n for n in notes), notes
    assert _losses(run) == expected


def test_truncated_last_metrics_line_is_trimmed_on_resume(run_copy):
    cfg, run = run_copy
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:3]) + lines[3][:25])  # killed while writing step 4's record
    shutil.rmtree(run / "checkpoints" / "step_000004")
    notes = []
    Trainer(cfg, run, resume=True, log=notes.append).fit()
    assert any("line 4 is incomplete" in n for n in notes), notes
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]

    metrics.write_text("".join(lines[:1]) + "{damaged\n" + "".join(lines[2:]))
    with pytest.raises(ckpt.CheckpointError, match=r"metrics\.jsonl line 2: not valid JSON"):
        read_metrics(metrics)

    metrics.write_bytes(b"".join(l.encode() for l in lines[:1]) + lines[1].replace('"loss"', '"lo\xe9ss"')
                        .encode("latin-1") + "".join(lines[2:]).encode())  # whole JSON, but not UTF-8
    with pytest.raises(ckpt.CheckpointError, match=r"metrics\.jsonl line 2: not valid JSON \('utf-8' codec"):
        read_metrics(metrics)
    metrics.write_bytes("".join(lines[:3]).encode() + lines[3][:25].encode() + b"\xff")  # cut inside a byte sequence
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3]


def test_a_damaged_metrics_line_stops_a_resume_before_it_rewrites_the_file(run_copy, hash_tree):
    """The log used to be read with undecodable bytes replaced and written back so: the damage spread silently."""
    cfg, run = run_copy
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes().replace(b'"loss"', b'"lo\xe9ss"', 1))
    before = hash_tree(run)
    with pytest.raises(ckpt.CheckpointError, match=r"metrics\.jsonl line 1: not valid JSON"):
        Trainer(cfg, run, resume=True, log=quiet).fit()
    after = hash_tree(run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_a_renamed_checkpoint_is_skipped_and_never_outlives_the_real_newest(run_copy, hash_tree):
    """step_000002 renamed step_000010 was resumed from as the newest (step 2's state), and the rotation then
    deleted the real step 4 while keeping it."""
    cfg, run = run_copy
    (run / "checkpoints" / "step_000002").rename(run / "checkpoints" / "step_000010")
    kept = hash_tree(run / "checkpoints")
    notes = []
    Trainer(apply_overrides(cfg, ["trainer.steps=6", "trainer.keep_last_k=2"]), run, resume=True,
            log=notes.append).fit()
    assert any("step_000010 is not usable: its MANIFEST.json is step 2's" in n and "renamed?" in n for n in notes), notes
    assert any("resumed from" in n and "step_000004" in n for n in notes), notes
    after = hash_tree(run / "checkpoints")
    assert {k: v for k, v in after.items() if not k.startswith("step_000006/")} == kept
    assert [c.step for c in ckpt.list_checkpoints(run)] == [4, 6]


def test_resume_without_a_checkpoint_never_replaces_a_finished_export(run_copy, hash_tree):
    """Checkpoints deleted (or a file in their place) but hf/ kept: --resume used to start from step 0 and
    replace the export with a model trained from scratch."""
    cfg, run = run_copy
    shutil.rmtree(run / "checkpoints")
    before = hash_tree(run)
    with pytest.raises(ckpt.CheckpointError, match=r"holds a finished run \(hf/ export\) but no checkpoint"):
        Trainer(cfg, run, resume=True, log=quiet)
    (run / "checkpoints").write_text("not a directory")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints is a file, not the run's checkpoint directory"):
        Trainer(cfg, run, resume=True, log=quiet)
    (run / "checkpoints").unlink()
    assert hash_tree(run) == before


# --------------------------------------------------------------------------------------------------
# A full disk and Ctrl-C


def test_full_disk_in_the_middle_of_a_sharded_save(corpus_dir, tmp_path, hash_tree, file_size_limit):
    """Distributed Checkpoint wraps a rank's failed write in (exception, traceback) pairs; the error used to be
    an AttributeError from the handler. Now: one line, the reason, the previous checkpoint intact."""
    cfg = make_config(corpus_dir, "trainer.steps=4", "trainer.save_interval=2", "trainer.eval_interval=0")
    trainer = Trainer(cfg, tmp_path, log=quiet)
    real_save, kept = trainer.save, {}

    def save_on_a_full_disk():
        if trainer.step < 4:
            return real_save()
        kept.update(hash_tree(tmp_path / "checkpoints"))
        with file_size_limit(16 << 10):
            return real_save()

    trainer.save = save_on_a_full_disk
    with pytest.raises(ckpt.WriteError) as info:
        trainer.fit()
    message = str(info.value)
    assert message.startswith("could not write checkpoint for step 4") and "file too large" in message
    assert "step_000002 is intact" in message and "\n" not in message
    assert hash_tree(tmp_path / "checkpoints") == kept  # no temporary directory left, step 2 untouched


def test_ctrl_c_says_where_resume_continues(corpus_dir, tmp_path, monkeypatch, capsys):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(make_config(corpus_dir, "trainer.steps=6", "trainer.save_interval=2"))))
    real_step = Trainer.train_step

    def interrupted(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    run = tmp_path / "run"
    assert main(["train", str(cfg_file), "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert err == (f"olmo-hybrid train: interrupted at step 3: --resume continues from "
                   f"{run / 'checkpoints' / 'step_000002'} (step 2)\n")
    assert (run / ckpt.LOCK).read_text() == ""
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(["train", str(cfg_file), "--out", str(run), "--resume"]) == 0
    assert math.isfinite(_losses(run)[-1]) and len(_losses(run)) == 6
