"""The kernel settings are part of the model config: every GDN and SSD op call of the model gets them, a run
records them in its config.json, and a resume may change them (they choose numerics and tiles, not the model)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from olmo_hybrid import ops
from olmo_hybrid.checkpoint.run_dir import check_model_config
from olmo_hybrid.config import KernelSettings, ModelConfig, apply_overrides, to_dict
from olmo_hybrid.errors import CheckpointError
from olmo_hybrid.model import HybridLM

TUNED = KernelSettings(dot="tf32", warps=8, backward_block_v=32)


def _config(**kw) -> ModelConfig:
    cfg = dict(vocab_size=61, d_model=48, n_layers=4, n_heads=4, gdn_heads=2, gdn_head_k=12, gdn_head_v=24,
               mamba_head_dim=12, mamba_state_size=16, mlp_hidden=96, rope_theta=10_000.0, max_seq_len=64,
               layer_pattern="GMGA", kernels=TUNED)
    cfg.update(kw)
    return ModelConfig(**cfg)


def test_every_sequence_op_of_the_model_gets_the_configured_settings(monkeypatch):
    seen = []

    def spy(name):
        real = getattr(ops, name)

        def call(*args, settings=None, **kwargs):
            seen.append((name, settings))
            return real(*args, settings=None, **kwargs)  # the torch reference takes the defaults only

        return call

    for name in ("gated_delta_rule", "gated_delta_rule_step", "ssd", "ssd_step"):
        monkeypatch.setattr(ops, name, spy(name))
    torch.manual_seed(0)
    model = HybridLM(_config()).eval()
    ids = torch.randint(0, 61, (1, 9))
    model.generate(ids, max_new_tokens=3)  # prefill into the cache, then decode steps
    model(ids)  # the training path
    assert {name for name, _ in seen} == {"gated_delta_rule", "gated_delta_rule_step", "ssd", "ssd_step"}
    assert all(s is TUNED for _, s in seen), seen


def test_overrides_reach_the_recorded_config_and_resume_may_change_them(tmp_path):
    from olmo_hybrid.train import build_config

    cfg = build_config(preset="smoke", overrides=["model.kernels.dot=tf32", "model.kernels.warps=8"])
    assert cfg.model.kernels == KernelSettings(dot="tf32", warps=8)
    recorded = json.loads(json.dumps(to_dict(cfg)))  # what the trainer writes to RUN/config.json
    assert recorded["model"]["kernels"]["dot"] == "tf32" and recorded["model"]["kernels"]["warps"] == 8
    with pytest.raises(ValueError, match=r"model.kernels: KernelSettings.dot='fp8'"):
        apply_overrides(cfg, ["model.kernels.dot=fp8"])

    (tmp_path / "config.json").write_text(json.dumps(recorded))
    check_model_config(tmp_path, to_dict(dataclasses.replace(cfg.model, kernels=KernelSettings())))
    with pytest.raises(CheckpointError, match="model.d_model"):
        check_model_config(tmp_path, to_dict(dataclasses.replace(cfg.model, d_model=cfg.model.d_model * 2)))
