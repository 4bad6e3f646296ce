"""Learning-rate schedule shapes and weight-decay parameter groups."""

from __future__ import annotations

import pytest
import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.config import ScheduleConfig
from olmo_hybrid.train.optim import lr_at, param_groups

from .conftest import TINY_MODEL

PEAK, STEPS = 1e-3, 100


def curve(steps=STEPS, **kw) -> list[float]:
    cfg = ScheduleConfig(**kw)
    return [lr_at(s, steps, PEAK, cfg) for s in range(steps)]


def test_cosine_warms_up_then_decays_to_ten_percent():
    lrs = curve(steps=111, name="cosine", warmup_steps=10, final_lr_fraction=0.1)
    assert lrs[0] == pytest.approx(PEAK / 10) and lrs[9] == pytest.approx(PEAK)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warmup, strictly rising
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then non-increasing
    assert lrs[-1] == pytest.approx(0.1 * PEAK)
    # the decay runs from step 10 (progress 0) to step 110 (progress 1); half-way the cosine is at
    # the mean of peak and floor
    assert lrs[10] == pytest.approx(PEAK) and lrs[60] == pytest.approx((PEAK + 0.1 * PEAK) / 2, rel=1e-6)


def test_linear_decay_is_a_straight_line():
    lrs = curve(name="linear", warmup_steps=0, final_lr_fraction=0.0)
    assert lrs[0] == pytest.approx(PEAK) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    steps = [a - b for a, b in zip(lrs, lrs[1:])]
    assert max(steps) == pytest.approx(min(steps))


def test_wsd_holds_then_decays_over_the_last_fraction():
    lrs = curve(name="wsd", warmup_steps=5, final_lr_fraction=0.0, decay_fraction=0.2)
    decay_start = STEPS - 1 - 20
    assert all(lr == pytest.approx(PEAK) for lr in lrs[4:decay_start + 1])
    assert all(a > b for a, b in zip(lrs[decay_start:], lrs[decay_start + 1:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_constant_after_warmup():
    assert curve(name="constant", warmup_steps=3)[3:] == [PEAK] * (STEPS - 3)


def test_decay_rules_choose_parameters():
    model = HybridLM(ModelConfig(**TINY_MODEL))
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(rule):
        groups = param_groups(model, 0.1, rule)
        assert sum(len(g["params"]) for g in groups) == len(names)  # every parameter exactly once
        return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    olmo = decayed("all_but_embeddings")
    assert "model.embed_tokens.weight" not in olmo
    assert {"lm_head.weight", "model.layers.0.linear_attn.A_log", "model.layers.0.input_layernorm.weight"} <= olmo
    matrices = decayed("matrices")
    assert "model.layers.0.linear_attn.A_log" not in matrices
    assert "model.layers.0.linear_attn.dt_bias" not in matrices
    assert "model.layers.0.input_layernorm.weight" not in matrices
    assert {"lm_head.weight", "model.layers.0.linear_attn.q_proj.weight"} <= matrices
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in matrices)


def test_tied_head_follows_the_embedding():
    model = HybridLM(ModelConfig(**{**TINY_MODEL, "tie_embeddings": True}))
    groups = param_groups(model, 0.1, "all_but_embeddings")
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    assert all(p is not model.lm_head.weight for p in decayed)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # shared tensor counted once


def test_lr_is_applied_each_step(corpus_dir, tmp_path):
    from olmo_hybrid.train.metrics import read_metrics
    from olmo_hybrid.train.trainer import Trainer

    from .conftest import make_config, quiet

    cfg = make_config(corpus_dir, "trainer.steps=4", "schedule.name=linear", "schedule.warmup_steps=0",
                      "schedule.final_lr_fraction=0", "trainer.eval_interval=0")
    trainer = Trainer(cfg, tmp_path, log=quiet)
    trainer.fit()
    logged = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert logged == [lr_at(s, 4, cfg.optim.lr, cfg.schedule) for s in range(4)]
    assert trainer.optimizer.param_groups[0]["lr"] == logged[-1]
    assert torch.isfinite(torch.tensor(logged)).all()
