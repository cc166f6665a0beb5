"""Optimisers and the per-task learning-rate schedule, shared by every strategy."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "none")


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """A torch optimiser by name, with a single parameter group (Avalanche grows that group)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"optimizer {name!r} is unknown; valid: {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "cosine") -> float:
    """Multiplier of the peak learning rate at `step` of a task's `total` steps.

    A linear warm-up over the first `warmup` steps (from 1/(warmup+1) to 1), then cosine decay to 0
    at `total` ("cosine") or a constant 1 ("none").
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "none" or total <= warmup:
        return 1.0
    frac = min(max(step - warmup, 0) / (total - warmup), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
