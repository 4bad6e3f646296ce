"""Data-parallel training on 2 CPU processes (torchrun, gloo, FSDP2) against one process, resharding
checkpoints 2 -> 1 and 1 -> 2, the HF export of a sharded run, and a rank killed mid-training.

One process with batch 4 and two with batch 2 each see the same global batches (loader.py), and the
loss is normalised over both ranks' tokens, so the runs differ only in summation order: losses agree
to 1e-5 relative (measured: ~2e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.config import to_dict
from olmo_hybrid.train.metrics import read_metrics
from olmo_hybrid.train.trainer import Trainer

from .conftest import make_config, quiet

STEPS = 6
RTOL = 1e-5
WORKER = Path(__file__).with_name("dist_worker.py")


def _config(corpus_dir, batch_size: int, *overrides: str):
    return make_config(corpus_dir, f"trainer.steps={STEPS}", "trainer.save_interval=3", "trainer.keep_last_k=0",
                       f"data.batch_size={batch_size}", *overrides)


def _torchrun(tmp_path: Path, cfg, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    cfg_file = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    target = ["-m", "olmo_hybrid.train", str(cfg_file), "--out"] if module else [str(WORKER), str(cfg_file)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def _drop_after(run_dir: Path, step: int) -> None:
    """Make ``run_dir`` look like a run that crashed right after checkpoint ``step``."""
    for info in ckpt.list_checkpoints(run_dir):
        if info.step > step:
            shutil.rmtree(info.path)
    shutil.rmtree(run_dir / "hf", ignore_errors=True)


@pytest.fixture(scope="module")
def one_process(corpus_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("one")
    Trainer(_config(corpus_dir, 4), run, log=quiet).fit()
    return run, read_metrics(run / "metrics.jsonl")


@pytest.fixture(scope="module")
def two_processes(corpus_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    run = tmp / "run"
    proc = _torchrun(tmp, _config(corpus_dir, 2, "trainer.export_hf=true"), str(run), module=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, read_metrics(run / "metrics.jsonl"), proc.stdout


def test_two_processes_match_one_process(one_process, two_processes):
    (_, single), (run, double, stdout) = one_process, two_processes
    assert "FSDP2 over mesh {'dp_shard': 2}" in stdout and stdout.count("step 6/6") == 1  # rank 0 logs alone
    assert [r["step"] for r in double] == list(range(1, STEPS + 1))
    for a, b in zip(single, double):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"] and b["world_size"] == 2
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=RTOL)  # the same tokens, split over ranks
    assert single[-1]["loss"] < single[0]["loss"]
    saved = ckpt.latest_checkpoint(run)
    assert ckpt.read_checkpoint_world_size(saved.path) == 2
    assert sorted(p.name for p in (saved.path / ckpt.DCP_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_hf_export_of_a_sharded_run_matches_its_checkpoint(two_processes, tmp_path):
    run = two_processes[0]
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    from_shards, _ = ckpt.load_model_and_tokenizer(run, step=STEPS)  # gathered from the 2 ranks' DCP shards
    from olmo_hybrid.model import HybridLM

    exported = HybridLM.from_pretrained(run / "hf")  # written at the end of the 2-process run
    from_shards.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        want = from_shards(ids)
        torch.testing.assert_close(exported(ids), want, rtol=0, atol=0)
        torch.testing.assert_close(HybridLM.from_pretrained(tmp_path / "again")(ids), want, rtol=0, atol=0)


def test_resume_two_processes_on_one(corpus_dir, two_processes, tmp_path):
    run2, double, _ = two_processes
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    _drop_after(run, 3)
    logs = []
    resumed = Trainer(_config(corpus_dir, 4), run, resume=True, log=logs.append)
    result = resumed.fit()
    assert any("resumed from" in line and "step 3" in line for line in logs)
    assert any("saved by 2 processes and is resumed by 1" in line for line in logs)
    assert not any("data.batch_size" in line for line in logs)  # 2 x 2 -> 1 x 4 keeps the global batch
    assert result.losses[0] == pytest.approx(double[3]["loss"], rel=1e-6)  # the next step, same weights and data
    assert result.losses == pytest.approx([r["loss"] for r in double[3:]], rel=RTOL)


def test_resume_one_process_on_two(corpus_dir, one_process, tmp_path):
    run1, single = one_process
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    _drop_after(run, 3)
    # resumed into a differently wrapped model: chunked loss and checkpointed blocks, same parameter names
    cfg = _config(corpus_dir, 2, "trainer.loss_chunk_tokens=48", "trainer.activation_checkpointing=selective")
    proc = _torchrun(tmp_path, cfg, str(run), "--resume", module=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "(step 3," in proc.stdout
    assert _losses(run) == pytest.approx([r["loss"] for r in single], rel=RTOL)


def test_sigkill_of_one_rank_loses_only_the_steps_since_the_last_checkpoint(corpus_dir, one_process, tmp_path):
    """Hybrid sharding (2 replicas x 1 shard) this time; rank 1 dies before step 5, after checkpoint 4."""
    single = one_process[1]
    cfg = _config(corpus_dir, 2, "trainer.save_interval=2", "parallel.dp_replicate=2")
    run = tmp_path / "run"
    killed = _torchrun(tmp_path, cfg, str(run), "--kill-rank", "1", "--kill-before-step", "5")
    assert killed.returncode != 0 and "Signal 9 (SIGKILL) received" in killed.stderr
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2, 4]
    assert len(_losses(run)) == 4  # rank 0 cannot finish step 5 without rank 1
    resumed = _torchrun(tmp_path, cfg, str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 4," in resumed.stdout
    assert "mesh {'dp_replicate': 2, 'dp_shard': 1}" in resumed.stdout
    assert _losses(run) == pytest.approx([r["loss"] for r in single], rel=RTOL)
