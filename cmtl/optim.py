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
    """Every parameter group's learning rate to `lr`, times the group's "lr_scale" if it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scale_group(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], scale: float) -> int:
    """Move `params` (those the optimiser holds) into a parameter group of their own whose learning
    rate `set_lr` scales by `scale`; every other parameter goes back into the first group. Returns
    how many were moved. The groups' optimiser state is kept (it is per parameter)."""
    ids = {id(p) for p in params}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    moved = [p for p in held if id(p) in ids]
    optimizer.param_groups[0]["params"] = [p for p in held if id(p) not in ids]
    optimizer.param_groups[0].pop("lr_scale", None)
    del optimizer.param_groups[1:]
    if moved:
        optimizer.add_param_group({"params": moved, "lr_scale": scale})
    return len(moved)
