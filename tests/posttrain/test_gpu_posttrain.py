"""SFT and DPO on a CUDA device (bf16 autocast): they train, export and resume there as on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from olmo_hybrid.posttrain.config import DPOConfig, SFTConfig, build_posttrain_config
from olmo_hybrid.posttrain.dpo import run_dpo
from olmo_hybrid.posttrain.trainer import run_sft
from olmo_hybrid.train.metrics import read_metrics

from .conftest import quiet

pytestmark = pytest.mark.gpu
COMMON = ["data.seq_len=96", "data.batch_size=4", "trainer.eval_interval=4", "trainer.device=cuda",
          "trainer.save_interval=4"]


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def test_sft_then_dpo_on_cuda(source, sft_file, pairs_file, tmp_path):
    # 40 conversations pack into 3 batches of 4x96 tokens: 2 epochs are 6 steps, and max_steps stops at 5.
    sft = build_posttrain_config(SFTConfig, None, [*COMMON, "optim.lr=3e-3", "sft.max_steps=5", f"data.path={sft_file}"])
    result = run_sft(sft, source, tmp_path / "sft", log=quiet)
    losses = [r["loss"] for r in read_metrics(tmp_path / "sft" / "metrics.jsonl")]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert math.isfinite(result.final_val_loss) and (tmp_path / "sft" / "hf" / "tokenizer_config.json").is_file()
    records = {}
    for reference in ("precomputed", "model"):
        dpo = build_posttrain_config(DPOConfig, None, [*COMMON, "optim.lr=1e-4", "dpo.max_steps=6",
                                                       f"dpo.reference={reference}", f"data.path={pairs_file}"])
        run_dpo(dpo, tmp_path / "sft" / "hf", tmp_path / reference, log=quiet)
        records[reference] = read_metrics(tmp_path / reference / "metrics.jsonl")
    first = records["precomputed"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=2e-2)  # bf16: policy and reference batched differently
    for a, b in zip(records["precomputed"], records["model"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-2)
    assert all(math.isfinite(r["val_reward_margin"]) for r in records["model"] if "val_reward_margin" in r)
