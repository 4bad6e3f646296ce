"""The training step waits for the device nowhere, and a non-finite step is skipped on the device.

On CUDA the optimizer is fused AdamW and a skipped step is its ``found_inf`` flag; the CPU build of torch has
the same fused kernel, so the contract (nothing moves: weights, moments, step counts) and the absence of host
reads in ``Trainer.train_step`` are checked here on the CPU, and on the GPU under ``pytest -m gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from olmo_hybrid.config import to_dict
from olmo_hybrid.train.metrics import read_back, read_metrics
from olmo_hybrid.train.trainer import Trainer

from .conftest import make_config, quiet, use_fused_adamw

# The tensor methods that read a value back to the host: on an accelerator each one waits for the device.
# (``numpy()`` is not one: it refuses device tensors; the step uses it on the loader's host batches.)
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu}


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _adam_state(opt) -> list[torch.Tensor]:
    return [v.clone() for s in opt.state.values() for v in s.values()]


def test_fused_adamw_found_inf_moves_nothing_and_a_skipped_first_step_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(8, 4)
    grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)

    def step(flag: float):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.found_inf = torch.tensor(flag)
        opt.step()

    step(0.0)
    before = [p.detach().clone() for p in model.parameters()], _adam_state(opt)
    step(1.0)  # skipped: weights, both moments and the step count stay bit for bit
    after = [p.detach().clone() for p in model.parameters()], _adam_state(opt)
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(a, b)
    step(0.0)
    assert not torch.equal(model.weight, before[0][0])

    # A skip before the first real step leaves zero moments and step 0: the same as a fresh optimizer.
    def trained(skip_first: bool):
        torch.manual_seed(1)
        m = torch.nn.Linear(8, 4)
        o = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        for flag in ([1.0] if skip_first else []) + [0.0, 0.0]:
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            o.found_inf = torch.tensor(flag)
            o.step()
        return [p.detach() for p in m.parameters()]

    for a, b in zip(trained(True), trained(False)):
        assert torch.equal(a, b)


def test_train_step_reads_nothing_back_from_the_device(corpus_dir, tmp_path):
    trainer = Trainer(make_config(corpus_dir), tmp_path, log=quiet)
    use_fused_adamw(trainer)
    lm = trainer.model
    # The model's own forward belongs to the model (its token-id check is a host read today); the step's
    # loss, normalisation, clipping, skip decision and update are what is measured here.
    trainer.forward_model = lambda ids, doc_ids=None: lm.lm_head(lm.model.embed_tokens(ids))
    trainer.train_step()  # the first step creates the optimizer state
    with CountHostReads() as mode:
        outputs = [trainer.train_step() for _ in range(3)]
    assert mode.calls == []
    records = read_back(outputs)
    assert [r["step"] for r in records] == [2, 3, 4] and all("skipped" not in r for r in records)


WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.gpu
def test_cuda_step_makes_no_host_sync(corpus_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    trainer = Trainer(make_config(corpus_dir, "trainer.device=cuda"), tmp_path, log=quiet)
    assert trainer.optimizer.defaults["fused"]
    lm = trainer.model
    trainer.forward_model = lambda ids, doc_ids=None: lm.lm_head(lm.model.embed_tokens(ids))
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = [trainer.train_step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(read_back(outputs)) == 3


@pytest.mark.gpu
def test_two_gpus_skip_a_nonfinite_step_on_the_device(corpus_dir, tmp_path):
    """FSDP2 (DTensor parameters) with fused AdamW: found_inf works on sharded parameters."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cfg = make_config(corpus_dir, "trainer.device=cuda", "trainer.steps=4", "trainer.save_interval=2",
                      "trainer.eval_interval=0", "data.batch_size=2")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(cfg_file), str(tmp_path / "run"), "--poison-step", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [("skipped" in r) for r in records] == [False, True, False, False]
    assert all(r["loss"] == r["loss"] for r in records)  # the poisoned gradient never reached the weights
    assert "optimizer steps 3" in proc.stdout

