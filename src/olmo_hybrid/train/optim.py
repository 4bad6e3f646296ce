"""AdamW parameter groups and learning-rate schedules.

Schedules are pure functions of the step, so the "scheduler state" a checkpoint needs is the step
itself: resuming at step s gives exactly the learning rate an uninterrupted run had at step s.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from olmo_hybrid.config import ConfigError

if TYPE_CHECKING:
    from olmo_hybrid.train.config import OptimConfig, ScheduleConfig

SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_RULES = ("all_but_embeddings", "matrices")


def param_groups(model: nn.Module, weight_decay: float, decay_rule: str) -> list[dict]:
    """Split parameters into a decayed and an undecayed AdamW group.

    ``all_but_embeddings`` is OLMo Hybrid's recipe (OLMo-core decays every parameter except
    ``embeddings.weight``: norms, A_log, dt_bias and convolutions included). ``matrices`` is the
    nanoGPT/FLA convention: only weights with two or more dimensions decay (projections, MLP, LM head,
    convolution kernels), never embeddings, norm gains, biases or the per-head GDN scalars A_log and
    dt_bias, whose zero point is not "no information". A tied LM head shares the embedding tensor and
    therefore follows the embedding's rule.
    """
    if decay_rule not in DECAY_RULES:
        raise ConfigError(f"optim.decay_rule: expected one of {DECAY_RULES}, got {decay_rule!r}")
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_ids
        if decay_rule == "all_but_embeddings":
            decays = not is_embedding
        else:
            decays = not is_embedding and p.ndim >= 2
        (decay if decays else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: "OptimConfig", device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_rule)
    # The fused CUDA kernel is much faster than the per-tensor loop; on CPU foreach is the fast path.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused,
                             foreach=None if fused else True)


def lr_at(step: int, total_steps: int, peak_lr: float, cfg: "ScheduleConfig") -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    All schedules warm up linearly from peak/warmup to peak over ``warmup_steps``, then:
    ``cosine`` follows a half cosine to ``final_lr_fraction * peak`` at the last step (OLMo-core
    CosWithWarmup, alpha_f); ``linear`` decays linearly to the same floor; ``wsd`` holds the peak
    and decays linearly to the floor over the last ``decay_fraction`` of the steps
    (warmup-stable-decay); ``constant`` holds the peak.
    """
    warmup = min(cfg.warmup_steps, total_steps)
    floor = cfg.final_lr_fraction * peak_lr
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if cfg.name == "constant":
        return peak_lr
    last = max(total_steps - 1, warmup)
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(warmup, last - decay_steps)
        if step <= decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start) / max(1, last - decay_start))
        return peak_lr - (peak_lr - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, last - warmup))
    if cfg.name == "linear":
        return peak_lr - (peak_lr - floor) * progress
    if cfg.name == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"schedule.name: expected one of {SCHEDULES}, got {cfg.name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
