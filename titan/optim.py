"""AdamW and the learning-rate schedules (warmup + cosine, warmup-stable-decay, constant)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from titan.config import LRConfig, OptimConfig


def group_settings(cfg: OptimConfig) -> list[dict]:
    """Hyper-parameters of the two parameter groups: matrices (decayed), then vectors (not decayed)."""
    common = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    return [{**common, "weight_decay": cfg.weight_decay}, {**common, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices, vectors = group_settings(cfg)
    groups = [{**matrices, "params": [p for p in params if p.ndim >= 2]},
              {**vectors, "params": [p for p in params if p.ndim < 2]}]
    kwargs = {}
    if cfg.implementation == "fused":
        kwargs["fused"] = True
    elif cfg.implementation == "foreach":
        kwargs["foreach"] = True
    elif cfg.implementation == "for_loop":
        kwargs["foreach"] = False
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def lr_multiplier(step: int, total_steps: int, cfg: LRConfig) -> float:
    """Factor on the peak LR for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps - 1)  # the last trained step reaches the floor
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of steps.
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def apply_settings(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Set the configured hyper-parameters on the groups (a loaded optimizer state brings the saved ones)."""
    for group, settings in zip(optimizer.param_groups, group_settings(cfg)):
        group.update(settings, initial_lr=settings["lr"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: LRConfig, total_steps: int,
                    done_steps: int = 0) -> LambdaLR:
    """The schedule as a function of the step and the config alone, positioned after `done_steps`
    (a resume takes the current config's schedule from the step it resumes at)."""
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg), last_epoch=done_steps - 1)
