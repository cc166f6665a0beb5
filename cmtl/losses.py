"""Distillation losses between a student's logits and stored (teacher) logits, with a validity mask.

Every loss takes `(student_logits, teacher_logits, mask=None, weight=None)`:

- `mask` (B x C bool) marks the columns that exist for each sample (its task's head in task-incremental
  mode, the classes seen when the logits were stored in class-incremental mode). Columns outside the
  mask never influence the value or the gradient, whatever they hold (padding such as -1e4, zeros).
- `weight` (B,) scales each sample's term; the batch is still averaged over all `B` samples, so a
  weight of 1 everywhere equals no weight.
- The teacher is a constant: it is detached, so gradients reach the student only.

Losses live in one registry (`register_distill_loss`, `create_distill_loss`, `list_distill_losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from cmtl.registry import Registry

__all__ = [
    "KLDistillLoss",
    "MSEDistillLoss",
    "create_distill_loss",
    "get_distill_loss",
    "kl_distill",
    "list_distill_losses",
    "masked_cross_entropy",
    "mse_distill",
    "register_distill_loss",
]

DISTILL_LOSSES = Registry("distillation loss")


def register_distill_loss(name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a distillation-loss class or factory under `name`."""
    return DISTILL_LOSSES.register(name)


def get_distill_loss(name: str) -> Callable[..., Any]:
    """The registered builder for `name` (raises `ValueError` listing valid names)."""
    return DISTILL_LOSSES.get(name)


def create_distill_loss(name: str, **kwargs: Any) -> Callable[..., torch.Tensor]:
    """Build the distillation loss `name`; the result is called as `loss(student, teacher, mask, weight)`."""
    return DISTILL_LOSSES.create(name, **kwargs)


def list_distill_losses() -> list[str]:
    """Registered distillation-loss names, sorted."""
    return DISTILL_LOSSES.names()


def _check_inputs(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor | None
) -> torch.Tensor:
    """Validate shapes and return a bool mask (all True when `mask` is None)."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher logits must both be (B, C); got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if mask is None:
        mask = torch.ones_like(student, dtype=torch.bool)
    elif mask.shape != student.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(student.shape)}; "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    mask = mask.to(student.device)
    if student.shape[0] and not bool(mask.any(dim=1).all()):
        # a sample with no valid column has no distribution to match: always a caller bug
        raise ValueError("every row of mask needs at least one valid (True) column")
    if weight is not None and weight.shape != (student.shape[0],):
        raise ValueError(f"weight must have shape ({student.shape[0]},); got {tuple(weight.shape)}")
    return mask


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log-softmax over the valid columns; invalid entries are 0 (not -inf) so products stay finite."""
    logp = F.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
    # filling after the softmax also zeroes the gradient there, so no NaN can flow back
    return logp.masked_fill(~mask, 0.0)


def kl_distill(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    temperature: float = 2.0,
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions over the valid columns.

    Multiplied by `temperature**2` (Hinton et al.) so the gradient scale does not depend on the
    temperature, summed over classes and averaged over the batch.
    """
    mask = _check_inputs(student, teacher, mask, weight)
    if student.shape[0] == 0:
        return student.sum() * 0.0
    log_p_s = _masked_log_softmax(student.float() / temperature, mask)
    log_p_t = _masked_log_softmax(teacher.detach().float().to(student.device) / temperature, mask)
    per_sample = (log_p_t.exp() * mask * (log_p_t - log_p_s)).sum(dim=1)
    # KL >= 0, but rounding puts near-equal distributions slightly below zero; the value is raised
    # to 0 for the logs while the gradient stays that of the exact expression (a clamp would zero
    # it, and change every run's trajectory by a little)
    per_sample = per_sample + (per_sample.clamp_min(0.0) - per_sample).detach()
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean() * temperature**2


def mse_distill(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between raw logits over the valid entries (logit replay, as in DER)."""
    mask = _check_inputs(student, teacher, mask, weight)
    if student.shape[0] == 0:
        return student.sum() * 0.0
    diff = (student.float() - teacher.detach().float().to(student.device)).masked_fill(~mask, 0.0)
    per_sample = diff.pow(2).sum(dim=1)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.sum() / mask.sum()


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy with the softmax restricted to each sample's valid columns."""
    if mask is None:
        return F.cross_entropy(logits.float(), targets)
    if mask.shape != logits.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
    targets = targets.to(logits.device)
    mask = mask.to(logits.device)
    if logits.shape[0] and not bool(mask.gather(1, targets[:, None]).all()):
        raise ValueError("every target must be a valid (True) column of mask")
    return F.cross_entropy(logits.float().masked_fill(~mask, float("-inf")), targets)


@register_distill_loss("kl")
class KLDistillLoss:
    """`kl_distill` with a fixed temperature (default 2, as in EMTAL's QR)."""

    def __init__(self, temperature: float = 2.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kl_distill(student, teacher, mask, weight, temperature=self.temperature)

    def __repr__(self) -> str:
        return f"KLDistillLoss(temperature={self.temperature})"


@register_distill_loss("mse")
class MSEDistillLoss:
    """`mse_distill` as a registered loss (no temperature: DER regresses raw logits)."""

    def __call__(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return mse_distill(student, teacher, mask, weight)

    def __repr__(self) -> str:
        return "MSEDistillLoss()"
