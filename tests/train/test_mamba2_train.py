"""The trainer with Mamba2 layers: a 3:1 hybrid Mamba2 (``MMMA``) tiny model trains on the CPU, and its
export loads back; on a GPU (``pytest -m gpu``) bf16 training through the Triton SSD kernels."""

from __future__ import annotations

import math

import pytest
import torch

from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.trainer import Trainer

from .conftest import make_config, quiet

MAMBA = ("model.layer_pattern=MMMA", "model.n_layers=4", "model.mamba_head_dim=16", "model.mamba_state_size=16")


def test_hybrid_mamba2_trains_exports_and_samples(corpus_dir, tmp_path):
    cfg = make_config(corpus_dir, *MAMBA, "trainer.steps=8", "trainer.eval_interval=4", "trainer.export_hf=true",
                      "trainer.sample_tokens=4")
    trainer = Trainer(cfg, tmp_path, log=quiet)
    result = trainer.fit()
    assert "".join(trainer.model.config.layer_types) == "MMMA"
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]
    assert math.isfinite(result.final_val_loss) and result.sample is not None
    loaded = HybridLM.from_pretrained(result.hf_dir)
    ids = torch.randint(0, 384, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(ids), trainer.model.eval()(ids))


@pytest.mark.gpu
def test_cuda_bf16_hybrid_mamba2_training(corpus_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = make_config(corpus_dir, *MAMBA, "trainer.device=cuda", "trainer.steps=6", "trainer.eval_interval=3",
                      "trainer.compile=true")
    result = Trainer(cfg, tmp_path, log=quiet).fit()
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]
