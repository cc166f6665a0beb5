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


def scale_groups(
    optimizer: torch.optim.Optimizer,
    groups: Iterable[tuple[Iterable[torch.nn.Parameter], float]],
) -> list[int]:
    """Regroup the parameters the optimiser holds: each `(params, scale)` pair becomes a parameter
    group of its own whose learning rate `set_lr` scales by `scale` (a parameter listed twice goes
    to the first pair); every other parameter goes back into the first group. Returns how many
    moved into each pair's group. The optimiser state is kept (it is per parameter)."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    placed: dict[int, int] = {}
    scales = []
    for i, (params, scale) in enumerate(groups):
        for p in params:
            placed.setdefault(id(p), i)
        scales.append(scale)
    optimizer.param_groups[0]["params"] = [p for p in held if id(p) not in placed]
    optimizer.param_groups[0].pop("lr_scale", None)
    del optimizer.param_groups[1:]
    counts = []
    for i, scale in enumerate(scales):
        moved = [p for p in held if placed.get(id(p)) == i]
        counts.append(len(moved))
        if moved:
            optimizer.add_param_group({"params": moved, "lr_scale": scale})
    return counts
