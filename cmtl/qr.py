"""Quality Retaining (QR): historical high-quality logits, within a task and across a task stream.

EMTAL's QR (arXiv 2501.06884) keeps, per class, an EMA of the logits of that class's samples and pulls
each sample's logits toward its class's entry with a temperature-2 KL, weighted per task by
1 / (running cross-entropy): a task that has converged is held close to its past outputs, a task still
learning follows its labels. `QRBuffer` keeps that within the task being trained and adds a bounded
replay store of `(x, y, task, logits, quality)` for the tasks that came before.

A training loop uses it like this (framework-free; the Avalanche plugin only forwards callbacks)::

    qr = QRBuffer(QRConfig(budget=200))
    for task, data in enumerate(stream):
        idx = class_balanced_indices(data.y, qr.pool_per_class(data.num_classes), seed=task)
        qr.begin_task(task, data.x[idx], data.y[idx], num_valid_classes=head_width)
        for epoch in range(epochs):
            for x, y in data.loader:
                logits = model(x, task)
                losses = {"ce": F.cross_entropy(logits, y), "qr_in": qr.in_task_loss(logits, y, task)}
                if len(qr):
                    batch = qr.sample(batch_size)
                    losses |= qr.replay_loss(model(batch.x, batch.task), batch)
                sum(losses.values()).backward()
                qr.update_bank(logits, y, task)
            qr.record(model(pool_x, task))  # un-augmented pool, eval mode, pool order
        qr.end_task()

Labels and logits are always "as the model sees them": local class indices and the task's head in
task-incremental mode, global indices and the whole (grown) head in class-incremental mode. The number
of valid columns of a stored sample is its task's head width (TIL) or the classes seen when it was
stored (CIL); wider or padded student logits are handled through that mask.

Checkpoints: `state_dict()` returns `{"tensors": {...}, "meta": {...}}`; save the tensors with
`safetensors.torch.save_file` and the meta with `json.dump`. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cmtl.augment import AUGMENTS, augment_batch
from cmtl.losses import (
    create_distill_loss,
    get_distill_loss,
    kl_distill,
    list_distill_losses,
)

__all__ = [
    "QRBuffer",
    "QRConfig",
    "ReplayBatch",
    "DISTILL_WEIGHTS",
    "REFRESH_KEEPS",
    "SELECTIONS",
    "STORAGES",
    "WEIGHTINGS",
    "balanced_quota",
    "class_balanced_indices",
    "logit_quality",
]

logger = logging.getLogger(__name__)

SELECTIONS = ("balanced", "random", "reservoir")
WEIGHTINGS = ("fixed", "classes")
STORAGES = ("float32", "uint8")
BANK_UPDATES = ("ema", "best")
DISTILL_WEIGHTS = ("uniform", "correct", "confidence")
REFRESH_KEEPS = ("best", "latest")
STATE_FORMAT = 1
# quality of an incorrectly classified sample: below every correct one (whose margin is > 0)
INCORRECT_QUALITY = float("-inf")


@dataclass
class QRConfig:
    """Configuration of the QR buffer.

    Attributes:
        budget: Samples kept in the replay buffer over all tasks; None: only `per_class` bounds it.
        per_class: Cap per class; None divides `budget` over the classes seen.
        selection: "balanced" (class-balanced, highest quality first), "random" (the same
            class-balanced quotas, filled uniformly at random within each class: the buffer keeps
            typical samples, not only the easiest) or "reservoir" (uniform random over every
            candidate seen, like reservoir sampling over the stream; classes are not balanced).
        loss: Distance to the stored logits, a name from `cmtl.losses` ("kl" or "mse").
        temperature: Temperature of the KL terms (replay with `loss="kl"` and the in-task term).
        lambda_replay: Weight of the distillation term on buffer batches.
        ce_weight: Weight of cross-entropy on buffer labels over all current classes (0: distillation
            only). Needed in class-incremental streams, where it calibrates old against new classes.
        weighting: "fixed" uses `lambda_replay` and `ce_weight` as they are; "classes" multiplies
            both by (classes in the buffer) / (classes of the current task), so that each class seen
            weighs about the same in the loss however many tasks came before (a buffer batch is as
            large as the task's batch, whatever the number of classes it spreads over).
        storage: How buffer images are kept: "float32" as given, or "uint8", quantised per sample
            between its own minimum and maximum (4x smaller; each value moves by at most 1/510 of
            the sample's range) and restored to float32 when sampled. The pool a task records its
            logits on stays float32.
        bank_momentum: EMA momentum of the per-class logit bank (weight of the old value).
        bank_update: How a class's bank entry follows the batches: "ema" (moving average of the
            correct samples' mean logits, `bank_momentum`) or "best" (replaced only by a batch mean of
            higher quality, i.e. a larger true-class margin, so the entry keeps the best logits seen).
        ce_momentum: EMA momentum of each task's running cross-entropy.
        in_task_weight: Scale of the in-task QR term (0 disables it); the term is
            `in_task_weight / max(running_ce, ce_floor)`, capped at `max_weight`.
        ce_floor: Lower clamp of the running cross-entropy, so the weight stays finite.
        max_weight: Upper cap of the in-task weight; None: only `ce_floor` bounds it.
        pool_factor: Candidate pool size per class = `pool_factor` x the per-class budget.
        seed: Seed of the buffer's own generator (reservoir keys, `sample` without a generator).
        batch_size: Buffer samples replayed per training step; None: as many as the step's new
            samples. A smaller replay batch makes each step cheaper (the replay forward/backward is
            as large as the new batch otherwise).
        refresh: Keep each buffer sample's best logits over the whole stream, not only over its own
            task: `refresh` offers the model's logits on the buffer (the controller does so after
            every task) and a stored record is replaced where the new one has higher quality. False
            freezes a sample's logits when it enters the buffer (DER's behaviour).
        refresh_keep: What `refresh` keeps: "best" (the higher-quality record, as above) or
            "latest" (always the new logits: the buffer follows the current model, and a
            class-incremental record widens to every class seen, as a teacher of the last model).
        distill_weight: How much each buffer sample's distillation term counts: "uniform" (all the
            same), "correct" (only samples whose stored logits classify them correctly: a wrong
            record is not worth retaining) or "confidence" (the stored softmax probability of the
            true class, over the sample's own columns).
        augment: What `sample` does to the replayed images: "none" (as stored: the un-augmented
            pool's), "crop" (a random resized crop per sample, 80-100% of the area, as the dev
            scenarios' train transform) or "crop_flip" (and a random horizontal flip); see
            `cmtl.augment`. The stored logits stay those of the un-augmented image.
    """

    budget: int | None = 200
    per_class: int | None = None
    selection: str = "balanced"
    loss: str = "kl"
    temperature: float = 2.0
    lambda_replay: float = 1.0
    ce_weight: float = 0.0
    weighting: str = "fixed"
    storage: str = "float32"
    bank_momentum: float = 0.9
    bank_update: str = "ema"
    ce_momentum: float = 0.9
    in_task_weight: float = 1.0
    ce_floor: float = 0.05
    max_weight: float | None = 10.0
    pool_factor: float = 2.0
    seed: int = 0
    batch_size: int | None = None
    refresh: bool = False
    refresh_keep: str = "best"
    distill_weight: str = "uniform"
    augment: str = "none"

    def __post_init__(self) -> None:
        if self.budget is None and self.per_class is None:
            raise ValueError("QRConfig needs budget or per_class (or both); got neither")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 0):
            raise ValueError(f"QRConfig.budget must be an int >= 0 or None, got {self.budget!r}")
        if self.per_class is not None and (not isinstance(self.per_class, int) or self.per_class < 1):
            raise ValueError(f"QRConfig.per_class must be an int >= 1 or None, got {self.per_class!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"QRConfig.selection {self.selection!r} is unknown; valid: {', '.join(SELECTIONS)}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"QRConfig.weighting {self.weighting!r} is unknown; valid: {', '.join(WEIGHTINGS)}"
            )
        if self.bank_update not in BANK_UPDATES:
            raise ValueError(
                f"QRConfig.bank_update {self.bank_update!r} is unknown; valid: {', '.join(BANK_UPDATES)}"
            )
        if self.distill_weight not in DISTILL_WEIGHTS:
            raise ValueError(
                f"QRConfig.distill_weight {self.distill_weight!r} is unknown; "
                f"valid: {', '.join(DISTILL_WEIGHTS)}"
            )
        if self.refresh_keep not in REFRESH_KEEPS:
            raise ValueError(
                f"QRConfig.refresh_keep {self.refresh_keep!r} is unknown; valid: {', '.join(REFRESH_KEEPS)}"
            )
        if self.augment not in AUGMENTS:
            raise ValueError(f"QRConfig.augment {self.augment!r} is unknown; valid: {', '.join(AUGMENTS)}")
        if self.storage not in STORAGES:
            raise ValueError(f"QRConfig.storage {self.storage!r} is unknown; valid: {', '.join(STORAGES)}")
        if self.loss not in list_distill_losses():
            raise ValueError(
                f"QRConfig.loss {self.loss!r} is unknown; valid: {', '.join(list_distill_losses())}"
            )
        for name in ("temperature", "ce_floor", "pool_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"QRConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("lambda_replay", "ce_weight", "in_task_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"QRConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("bank_momentum", "ce_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"QRConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.max_weight is not None and not self.max_weight > 0:
            raise ValueError(f"QRConfig.max_weight must be > 0 or None, got {self.max_weight!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"QRConfig.batch_size must be an int >= 1 or None, got {self.batch_size!r}")
        if self.pool_factor < 1:
            raise ValueError(f"QRConfig.pool_factor must be >= 1, got {self.pool_factor!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return dataclasses.asdict(self)


@dataclass
class ReplayBatch:
    """A batch drawn from the buffer.

    Attributes:
        x: Inputs.
        y: Labels as the model sees them (local in TIL, global in CIL).
        task: Task id of each sample.
        logits: Stored high-quality logits, `(B, W)` with `W` the widest `num_valid` in the batch.
        mask: `(B, W)` bool, True on each sample's valid columns.
        num_valid: Valid columns of each sample.
        index: Positions in the buffer.
    """

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor
    num_valid: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device | str) -> ReplayBatch:
        """The batch on `device`."""
        return ReplayBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


# ---------------------------------------------------------------------------------------------- helpers


def class_balanced_indices(
    labels: torch.Tensor | Sequence[int],
    per_class: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Indices of up to `per_class` random samples of every class, sorted (dataset order).

    Args:
        labels: Label of every sample.
        per_class: Samples per class (classes with fewer give all of theirs).
        generator: Source of randomness; `seed` builds one when it is None.
        seed: Seed used when no generator is given (None: torch's global generator).
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero(as_tuple=True)[0]
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    if not chosen:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat(chosen)).values


def balanced_quota(available: Sequence[int], budget: int | None, per_class: int | None = None) -> list[int]:
    """How many samples each class keeps so that classes stay as balanced as possible.

    Water-filling: every class gets the same share of `budget`, classes with fewer samples than their
    share keep all of theirs and hand the rest to the others; the last few samples of an uneven split
    go to the first classes in order.

    Args:
        available: Samples each class can offer (its current buffer count, or its pool size).
        budget: Total samples; None: unbounded.
        per_class: Cap per class; None: no cap.
    """
    avail = [min(a, per_class) if per_class is not None else a for a in available]
    if budget is None:
        return avail
    quota = [0] * len(avail)
    left = list(range(len(avail)))
    remaining = budget
    while left and remaining > 0:
        share = remaining // len(left)
        small = [i for i in left if avail[i] <= share]
        if small:
            for i in small:
                quota[i] = avail[i]
                remaining -= avail[i]
            left = [i for i in left if avail[i] > share]
            continue
        extra = remaining - share * len(left)
        for k, i in enumerate(left):
            quota[i] = share + (1 if k < extra else 0)
        remaining = 0
    return quota


def logit_quality(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """True-class margin (true logit minus the largest other) when positive, else `INCORRECT_QUALITY`.

    A margin of exactly 0 (a tie) counts as incorrect: the prediction is not unambiguous. A single-class
    task has no other logit and its margin is +inf.
    """
    logits = logits.float()
    true = logits.gather(1, targets[:, None]).squeeze(1)
    other = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values
    margin = true - other
    return torch.where(margin > 0, margin, torch.full_like(margin, INCORRECT_QUALITY))


def _valid_columns(width: int, num_valid: torch.Tensor) -> torch.Tensor:
    """`(B, width)` bool mask, True on each sample's own columns (its first `num_valid`)."""
    return torch.arange(width, device=num_valid.device)[None, :] < num_valid[:, None]


def _true_class_probability(own_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each sample's true class; other samples' columns are -inf."""
    return own_logits.float().softmax(dim=1).gather(1, targets[:, None]).squeeze(1)


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[1] >= width else F.pad(t, (0, width - t.shape[1]))


def quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uint8 codes of `x` (N x ...) and each sample's (low, step), for `dequantize_uint8`."""
    flat = x.detach().float().reshape(x.shape[0], -1)
    low = flat.amin(dim=1) if flat.shape[1] else flat.new_zeros(x.shape[0])
    high = flat.amax(dim=1) if flat.shape[1] else low
    step = (high - low) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant sample: every code is 0
    codes = ((flat - low[:, None]) / step[:, None]).round().clamp(0, 255).to(torch.uint8)
    return codes.reshape(x.shape), torch.stack([low, step], dim=1)


def dequantize_uint8(codes: torch.Tensor, low_step: torch.Tensor) -> torch.Tensor:
    """float32 values of `quantize_uint8`'s codes."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return codes.float() * low_step[:, 1].reshape(shape) + low_step[:, 0].reshape(shape)


# -------------------------------------------------------------------------------------------- the buffer


class QRBuffer:
    """Per-class logit bank (in-task QR), candidate pool with high-quality logits, and replay buffer.

    Args:
        config: `QRConfig`; None uses the defaults.
    """

    _BUFFER_FIELDS = ("x", "y", "task", "logits", "num_valid", "quality", "key")
    _POOL_FIELDS = ("x", "y", "logits", "quality", "recorded")

    def __init__(self, config: QRConfig | None = None):
        self.config = config or QRConfig()
        loss_builder = get_distill_loss(self.config.loss)
        # only losses that take a temperature (kl) receive it; mse regresses raw logits
        kwargs = {}
        if "temperature" in inspect.signature(loss_builder).parameters:
            kwargs["temperature"] = self.config.temperature
        self.distill = create_distill_loss(self.config.loss, **kwargs)
        self._rng = torch.Generator().manual_seed(self.config.seed)
        self._buffer: dict[str, torch.Tensor] = {}
        self._bank: dict[int, torch.Tensor] = {}
        self._bank_filled: dict[int, torch.Tensor] = {}
        self._running_ce: dict[int, float] = {}
        self._num_valid: dict[int, int] = {}
        self._pool: dict[str, torch.Tensor] = {}
        self._pool_task: int | None = None

    # -------------------------------------------------------------------------------- introspection

    def __len__(self) -> int:
        return int(self._buffer["y"].shape[0]) if self._buffer else 0

    def __repr__(self) -> str:
        return f"QRBuffer(len={len(self)}, classes={len(self.class_counts())}, config={self.config})"

    @property
    def buffer(self) -> dict[str, torch.Tensor]:
        """The stored tensors (read-only view): x, y, task, logits, num_valid, quality, key, and with
        `storage="uint8"` x as uint8 codes plus x_range (each sample's low value and step)."""
        return dict(self._buffer)

    def buffer_images(self) -> torch.Tensor:
        """The buffer's images as float32 (decoded under `storage="uint8"`), in buffer order."""
        return self._decode(self._buffer) if self._buffer else torch.zeros(0)

    @property
    def pool_task(self) -> int | None:
        """Task whose candidate pool is open, or None."""
        return self._pool_task

    def class_counts(self) -> dict[tuple[int, int], int]:
        """Stored samples per class, keyed by `(task, y)`."""
        if not self._buffer:
            return {}
        keys = torch.stack([self._buffer["task"], self._buffer["y"]], dim=1)
        uniq, counts = torch.unique(keys, dim=0, return_counts=True)
        return {(int(t), int(y)): int(n) for (t, y), n in zip(uniq.tolist(), counts.tolist())}

    def nbytes(self) -> int:
        """Memory of the replay buffer's tensors in bytes (bank and pool excluded)."""
        return sum(t.element_size() * t.numel() for t in self._buffer.values())

    def record_quality(self) -> dict[str, Any] | None:
        """How good the stored logits are, judged on each sample's own columns; None while empty.

        `{"records": n, "wrong": share whose stored logits do not classify their own sample (a tie
        counts as wrong), "true_class_probability": mean softmax probability of the true class,
        "per_task": {task: the same three}}`. Distilling a wrong record teaches the model to stay
        wrong on that sample; a high share is what `distill_weight` and `refresh` are for.
        """
        if not self._buffer:
            return None
        b = self._buffer
        y = b["y"].long()
        valid = _valid_columns(b["logits"].shape[1], b["num_valid"])
        own = b["logits"].float().masked_fill(~valid, float("-inf"))
        wrong = (logit_quality(own, y) == INCORRECT_QUALITY).float()
        prob = _true_class_probability(own, y)

        def summary(sel: torch.Tensor) -> dict[str, Any]:
            return {
                "records": int(sel.sum()),
                "wrong": float(wrong[sel].mean()),
                "true_class_probability": float(prob[sel].mean()),
            }

        out = summary(torch.ones_like(y, dtype=torch.bool))
        out["per_task"] = {str(int(t)): summary(b["task"] == t) for t in torch.unique(b["task"]).tolist()}
        return out

    def running_ce(self, task: int) -> float | None:
        """Running cross-entropy of `task`, or None before its first update."""
        return self._running_ce.get(task)

    def task_weight(self, task: int) -> float:
        """Weight of the in-task QR term of `task`.

        `in_task_weight / max(running_ce, ce_floor)`, capped at `max_weight`: the floor keeps a task
        with (near) zero loss from an infinite weight, the cap bounds it independently of the floor.
        A task with no running CE yet gets 0: nothing says it has converged, so it follows its labels.
        """
        ce = self._running_ce.get(task)
        if ce is None or self.config.in_task_weight == 0:
            return 0.0
        w = self.config.in_task_weight / max(ce, self.config.ce_floor)
        return min(w, self.config.max_weight) if self.config.max_weight is not None else w

    def pool_per_class(self, num_new_classes: int) -> int:
        """Candidate pool size per class for a task adding `num_new_classes` classes.

        `pool_factor` x the per-class budget the buffer will have once those classes are in, so that
        selecting by quality has a choice.
        """
        if num_new_classes < 1:
            raise ValueError(f"num_new_classes must be >= 1, got {num_new_classes}")
        n_classes = len(self.class_counts()) + num_new_classes
        per_class = self.config.budget // n_classes if self.config.budget is not None else None
        if self.config.per_class is not None:
            per_class = self.config.per_class if per_class is None else min(per_class, self.config.per_class)
        assert per_class is not None
        return max(1, math.ceil(self.config.pool_factor * max(per_class, 1)))

    # ------------------------------------------------------------------------------ in-task QR (EMTAL)

    def _valid_width(self, task: int, logits: torch.Tensor) -> int:
        nv = self._num_valid.get(task, logits.shape[1])
        if logits.dim() != 2 or logits.shape[1] < nv:
            raise ValueError(
                f"logits of task {task} must be (B, >= {nv}) (its valid classes); got {tuple(logits.shape)}"
            )
        return nv

    def update_ce(self, task: int, ce_value: float | torch.Tensor) -> float:
        """Fold one cross-entropy value into the running CE of `task`; returns the new value."""
        value = float(ce_value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"cross-entropy must be finite and >= 0, got {value!r}")
        old = self._running_ce.get(task)
        m = self.config.ce_momentum
        self._running_ce[task] = value if old is None else m * old + (1 - m) * value
        return self._running_ce[task]

    @torch.no_grad()
    def update_bank(
        self, logits: torch.Tensor, targets: torch.Tensor, task: int, track_ce: bool = True
    ) -> None:
        """EMA-update the bank with the correctly classified samples of a training batch.

        Each class's entry moves toward the mean logits of its correct samples in the batch (the
        first observation is taken as is). Misclassified samples are skipped: their logits would teach
        the mistake. With `track_ce`, the batch's cross-entropy also updates the running CE of `task`.
        """
        nv = self._valid_width(task, logits)
        logits = logits.detach()[:, :nv].float()
        targets = targets.to(logits.device).long()
        if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < nv):
            raise ValueError(f"targets of task {task} must be in [0, {nv}); got {targets.tolist()}")
        if task not in self._bank:
            self._bank[task] = logits.new_zeros(nv, nv)
            self._bank_filled[task] = torch.zeros(nv, dtype=torch.bool, device=logits.device)
        bank, filled = self._bank[task], self._bank_filled[task]
        if bank.shape[0] != nv:
            raise ValueError(f"task {task} has {bank.shape[0]} valid classes in its bank, logits give {nv}")
        if bank.device != logits.device:
            bank, filled = bank.to(logits.device), filled.to(logits.device)
        if track_ce and targets.numel():
            self.update_ce(task, F.cross_entropy(logits, targets))
        correct = torch.isfinite(logit_quality(logits, targets))
        if correct.any():
            t = targets[correct]
            sums = torch.zeros_like(bank).index_add_(0, t, logits[correct])
            counts = torch.bincount(t, minlength=nv).to(bank.dtype)
            seen = counts > 0
            mean = sums[seen] / counts[seen, None]
            old = bank[seen]
            if self.config.bank_update == "best":
                cls = seen.nonzero().squeeze(1)
                better = ~filled[seen] | (logit_quality(mean, cls) > logit_quality(old, cls))
                bank[seen] = torch.where(better[:, None], mean, old)
            else:
                m = self.config.bank_momentum
                bank[seen] = torch.where(filled[seen, None], m * old + (1 - m) * mean, mean)
            filled |= seen
        self._bank[task], self._bank_filled[task] = bank, filled

    def in_task_loss(self, logits: torch.Tensor, targets: torch.Tensor, task: int) -> torch.Tensor:
        """EMTAL's in-task QR: `task_weight(task)` x KL(bank[target] || logits), temperature `T`.

        Averaged over the samples whose class has a bank entry; 0 when none has (or the weight is 0).
        The zero is a scalar that accepts `.backward()` and adds to other losses.
        """
        nv = self._valid_width(task, logits)
        weight = self.task_weight(task)
        zero = logits.new_zeros((), dtype=torch.float32).requires_grad_(logits.requires_grad)
        if weight == 0 or task not in self._bank:
            return zero
        targets = targets.to(logits.device).long()
        bank = self._bank[task].to(logits.device)
        has = self._bank_filled[task].to(logits.device)[targets]
        if not has.any():
            return zero
        student = logits[has, :nv]
        return weight * kl_distill(student, bank[targets[has]], temperature=self.config.temperature)

    # ---------------------------------------------------------------------- candidate pool and records

    def begin_task(
        self, task: int, x_pool: torch.Tensor, y_pool: torch.Tensor, num_valid_classes: int
    ) -> None:
        """Open the candidate pool of `task`: its un-augmented training samples (stored on CPU).

        Args:
            task: Task id.
            x_pool: Pool inputs (pick them with `class_balanced_indices`).
            y_pool: Pool labels as the model sees them.
            num_valid_classes: Valid logit columns of this task: its head width (TIL) or the classes
                seen so far including this task's (CIL).
        """
        if task < 0:
            raise ValueError(f"task must be >= 0, got {task}")
        if num_valid_classes < 1:
            raise ValueError(f"num_valid_classes must be >= 1, got {num_valid_classes}")
        y_pool = torch.as_tensor(y_pool).reshape(-1).long().cpu()
        if x_pool.shape[0] != y_pool.shape[0]:
            raise ValueError(f"x_pool has {x_pool.shape[0]} samples but y_pool has {y_pool.shape[0]}")
        if y_pool.numel() and not (0 <= int(y_pool.min()) and int(y_pool.max()) < num_valid_classes):
            raise ValueError(
                f"pool labels must be in [0, {num_valid_classes}); got {sorted(set(y_pool.tolist()))}"
            )
        if self._buffer and tuple(x_pool.shape[1:]) != tuple(self._buffer["x"].shape[1:]):
            raise ValueError(
                f"pool inputs have shape {tuple(x_pool.shape[1:])}, "
                f"the buffer holds {tuple(self._buffer['x'].shape[1:])}"
            )
        if self._pool_task is not None:
            logger.warning("begin_task(%d) replaces the open pool of task %d", task, self._pool_task)
        n = y_pool.shape[0]
        self._pool_task = task
        self._num_valid[task] = int(num_valid_classes)
        self._pool = {
            "x": x_pool.detach().cpu().clone(),
            "y": y_pool,
            "logits": torch.zeros(n, num_valid_classes),
            "quality": torch.full((n,), INCORRECT_QUALITY),
            "recorded": torch.zeros(n, dtype=torch.bool),
        }

    @torch.no_grad()
    def record(self, logits: torch.Tensor, indices: torch.Tensor | None = None) -> int:
        """Offer the model's current logits on the pool; keep them where quality improves.

        A sample's stored logits are replaced when it has no record yet or its new quality is strictly
        higher (see `logit_quality`): a correct record is never replaced by an incorrect one.

        Args:
            logits: Logits of the pool samples (all of them in pool order, or those in `indices`);
                at least the task's valid columns, extra columns are ignored.
            indices: Pool positions of the rows of `logits` (for chunked evaluation).

        Returns:
            The number of records replaced.
        """
        if self._pool_task is None:
            raise RuntimeError("record() needs an open pool; call begin_task() first")
        nv = self._num_valid[self._pool_task]
        n = self._pool["y"].shape[0]
        idx = torch.arange(n) if indices is None else torch.as_tensor(indices).long().cpu().reshape(-1)
        if logits.dim() != 2 or logits.shape[0] != idx.shape[0] or logits.shape[1] < nv:
            raise ValueError(
                f"record() expects logits of shape ({idx.shape[0]}, >= {nv}); got {tuple(logits.shape)}"
            )
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < n):
            raise ValueError(f"indices must be in [0, {n}); got min {int(idx.min())} max {int(idx.max())}")
        logits = logits.detach()[:, :nv].float().cpu()
        quality = logit_quality(logits, self._pool["y"][idx])
        better = ~self._pool["recorded"][idx] | (quality > self._pool["quality"][idx])
        upd = idx[better]
        self._pool["logits"][upd] = logits[better]
        self._pool["quality"][upd] = quality[better]
        self._pool["recorded"][upd] = True
        return int(better.sum())

    @torch.no_grad()
    def refresh(self, logits: torch.Tensor, indices: torch.Tensor | None = None, widen: bool = False) -> int:
        """Offer the model's current logits on buffer samples; keep them as `config.refresh_keep` says.

        The buffer's counterpart of `record`: with "best" each sample is judged on the columns of its
        own task (its `num_valid`), so a class-incremental head that grew since does not count, and a
        record is replaced where the new logits' quality is higher. With "latest" every record is
        replaced.

        Args:
            logits: Logits of the buffer samples (all of them in buffer order, or those in
                `indices`), at least as wide as the widest stored record; extra columns are ignored.
            indices: Buffer positions of the rows of `logits`.
            widen: With "latest", the records take every column of `logits` (a class-incremental
                head: the sample is then distilled over every class seen); the buffer widens to match.

        Returns:
            The number of records replaced.
        """
        n = len(self)
        idx = torch.arange(n) if indices is None else torch.as_tensor(indices).long().cpu().reshape(-1)
        width = self._buffer["logits"].shape[1] if n else 0
        if logits.dim() != 2 or logits.shape[0] != idx.shape[0] or logits.shape[1] < width:
            raise ValueError(
                f"refresh() expects logits of shape ({idx.shape[0]}, >= {width}); got {tuple(logits.shape)}"
            )
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < n):
            raise ValueError(f"indices must be in [0, {n}); got min {int(idx.min())} max {int(idx.max())}")
        if not idx.numel():
            return 0
        b = self._buffer
        latest = self.config.refresh_keep == "latest"
        if latest and widen:
            width = max(width, logits.shape[1])
            b["logits"] = _pad_columns(b["logits"], width)
            b["num_valid"][idx] = width
        valid = _valid_columns(width, b["num_valid"][idx])
        logits = logits.detach()[:, :width].float().cpu()
        quality = logit_quality(logits.masked_fill(~valid, float("-inf")), b["y"][idx])
        better = torch.ones_like(quality, dtype=torch.bool) if latest else quality > b["quality"][idx]
        upd = idx[better]
        b["logits"][upd] = logits[better].masked_fill(~valid[better], 0.0)
        b["quality"][upd] = quality[better]
        return int(better.sum())

    @property
    def pool(self) -> dict[str, torch.Tensor]:
        """The open pool (x, y, logits, quality, recorded); empty when none is open."""
        return dict(self._pool)

    # ------------------------------------------------------------------------------------ end of task

    def end_task(self) -> dict[tuple[int, int], int]:
        """Move a selection of the pool into the buffer, rebalancing every class seen; close the pool.

        Returns:
            The new per-class counts.
        """
        if self._pool_task is None:
            raise RuntimeError("end_task() needs an open pool; call begin_task() first")
        pool, task = self._pool, self._pool_task
        rec = pool["recorded"]
        if not rec.any():
            raise RuntimeError(f"end_task(): no logits were recorded for task {task}; call record() first")
        if not rec.all():
            logger.warning(
                "task %d: %d pool samples were never recorded and are skipped", task, int((~rec).sum())
            )
        n = int(rec.sum())
        cand = {
            **self._encode(pool["x"][rec]),
            "y": pool["y"][rec],
            "task": torch.full((n,), task, dtype=torch.long),
            "logits": pool["logits"][rec],
            "num_valid": torch.full((n,), self._num_valid[task], dtype=torch.long),
            "quality": pool["quality"][rec],
            # uniform keys: keeping the largest keys among all candidates ever seen is reservoir sampling
            "key": torch.rand(n, generator=self._rng),
        }
        merged = self._concat(self._buffer, cand) if self._buffer else cand
        keep = self._select(merged)
        self._buffer = {k: v[keep].contiguous() for k, v in merged.items()} if keep.numel() else {}
        self._pool, self._pool_task = {}, None
        counts = self.class_counts()
        logger.info("QR buffer after task %d: %d samples over %d classes", task, len(self), len(counts))
        return counts

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Buffer fields of images `x` under `config.storage`: {"x"} or {"x", "x_range"} (uint8)."""
        if self.config.storage == "uint8":
            codes, low_step = quantize_uint8(x)
            return {"x": codes, "x_range": low_step}
        return {"x": x.float()}

    @staticmethod
    def _decode(fields: dict[str, torch.Tensor], idx: torch.Tensor | None = None) -> torch.Tensor:
        """float32 images of buffer `fields` (rows `idx`, or all)."""
        x = fields["x"] if idx is None else fields["x"][idx]
        if "x_range" not in fields:
            return x
        return dequantize_uint8(x, fields["x_range"] if idx is None else fields["x_range"][idx])

    @staticmethod
    def _concat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(a["logits"].shape[1], b["logits"].shape[1])
        out = {k: torch.cat([a[k], b[k].to(a[k].dtype)]) for k in a if k != "logits"}
        out["logits"] = torch.cat([_pad_columns(a["logits"], width), _pad_columns(b["logits"], width)])
        return out

    def _select(self, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sorted positions to keep: per class ranked by priority, quotas from `balanced_quota`."""
        cfg = self.config
        # a sample keeps its random key for life, so "random" drops the same samples of a class as
        # its quota shrinks over the tasks, as reservoir sampling does
        priority = entries["quality"] if cfg.selection == "balanced" else entries["key"]
        keys = torch.stack([entries["task"], entries["y"]], dim=1)
        classes, inverse = torch.unique(keys, dim=0, return_inverse=True)
        ranked = []  # per class: positions sorted by priority, best first (ties: buffer order)
        for c in range(classes.shape[0]):
            pos = (inverse == c).nonzero(as_tuple=True)[0]
            order = torch.sort(priority[pos], descending=True, stable=True).indices
            ranked.append(pos[order])
        if cfg.selection != "reservoir":
            quota = balanced_quota([len(r) for r in ranked], cfg.budget, cfg.per_class)
            keep = [r[:q] for r, q in zip(ranked, quota)]
        else:
            capped = torch.cat([r[: cfg.per_class] if cfg.per_class is not None else r for r in ranked])
            if cfg.budget is not None:
                capped = capped[
                    torch.sort(priority[capped], descending=True, stable=True).indices[: cfg.budget]
                ]
            keep = [capped]
        return torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.long)

    # ------------------------------------------------------------------------------------------ replay

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> ReplayBatch:
        """A random batch of the buffer (without replacement when it holds enough samples), its
        images augmented as `config.augment` says.

        Args:
            batch_size: Samples to draw.
            generator: Source of randomness (CPU generator); None uses the buffer's own seeded one.
            device: Where to put the batch (default: CPU, where the buffer lives).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if n == 0:
            raise ValueError("cannot sample from an empty QR buffer (check len(buffer) first)")
        gen = generator if generator is not None else self._rng
        if batch_size <= n:
            idx = torch.randperm(n, generator=gen)[:batch_size]
        else:
            idx = torch.randint(n, (batch_size,), generator=gen)
        b = self._buffer
        nv = b["num_valid"][idx]
        width = int(nv.max())
        batch = ReplayBatch(
            x=augment_batch(self._decode(b, idx), self.config.augment, gen),
            y=b["y"][idx],
            task=b["task"][idx],
            logits=b["logits"][idx, :width],
            mask=_valid_columns(width, nv),
            num_valid=nv,
            index=idx,
        )
        return batch.to(device) if device is not None else batch

    def replay_weight(self, new_classes: int | None) -> float:
        """Factor on both replay terms: 1, or with `weighting="classes"` buffer classes / new classes."""
        if self.config.weighting == "fixed" or not new_classes:
            return 1.0
        return len(self.class_counts()) / new_classes

    def replay_loss(
        self, student_logits: torch.Tensor, batch: ReplayBatch, new_classes: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Named replay terms on a buffer batch: `qr` (lambda x D) and, if `ce_weight > 0`, `qr_ce`.

        `student_logits` may be wider than the stored logits (a class-incremental head that grew) or
        padded (e.g. with -1e4) beyond a task's head: only each sample's valid columns count.
        `new_classes` (the current task's class count) is what `weighting="classes"` divides by;
        None leaves the weights fixed.
        """
        if student_logits.dim() != 2 or student_logits.shape[0] != batch.y.shape[0]:
            raise ValueError(
                f"student logits must be ({batch.y.shape[0]}, C); got {tuple(student_logits.shape)}"
            )
        width, stored = student_logits.shape[1], batch.logits.shape[1]
        if width < stored:
            raise ValueError(f"student logits have {width} columns, the batch's stored logits need {stored}")
        dev = student_logits.device
        teacher = _pad_columns(batch.logits.to(dev), width)
        mask = F.pad(batch.mask.to(dev), (0, width - stored), value=False)
        scale = self.replay_weight(new_classes)
        weight = self._distill_weight(teacher, mask, batch.y.to(dev))
        terms = {
            "qr": scale * self.config.lambda_replay * self.distill(student_logits, teacher, mask, weight)
        }
        if self.config.ce_weight > 0:
            # over every column the student has now: in a class-incremental head this is what
            # teaches that an old sample is none of the classes added since it was stored (the
            # distillation term cannot, its mask stops at the classes known then); TIL's padding
            # columns hold -1e4 and add nothing
            terms["qr_ce"] = scale * self.config.ce_weight * F.cross_entropy(student_logits, batch.y.to(dev))
        return terms

    def _distill_weight(
        self, teacher: torch.Tensor, mask: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | None:
        """Per-sample weight of the distillation term under `config.distill_weight` (None: uniform)."""
        if self.config.distill_weight == "uniform":
            return None
        own = teacher.float().masked_fill(~mask, float("-inf"))
        if self.config.distill_weight == "correct":
            return (logit_quality(own, y) > INCORRECT_QUALITY).float()
        return _true_class_probability(own, y)

    # ------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """`{"tensors": {name: CPU tensor}, "meta": JSON-able dict}` covering buffer, bank, CE and pool.

        Save `tensors` with `safetensors.torch.save_file` and `meta` with `json.dump`.
        """
        tensors: dict[str, torch.Tensor] = {"rng": self._rng.get_state()}
        for k, v in self._buffer.items():
            tensors[f"buffer.{k}"] = v.detach().cpu().contiguous()
        for k, v in self._pool.items():
            tensors[f"pool.{k}"] = v.detach().cpu().contiguous()
        for t in self._bank:
            tensors[f"bank.{t}.logits"] = self._bank[t].detach().cpu().contiguous()
            tensors[f"bank.{t}.filled"] = self._bank_filled[t].cpu().contiguous()
        meta = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "running_ce": {str(t): v for t, v in self._running_ce.items()},
            "num_valid": {str(t): v for t, v in self._num_valid.items()},
            "bank_tasks": sorted(self._bank),
            "pool_task": self._pool_task,
            "buffer_len": len(self),
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (possibly after a safetensors + JSON round trip)."""
        tensors, meta = state["tensors"], state["meta"]
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported QR state format {meta.get('format')!r}; expected {STATE_FORMAT}")
        if meta["config"] != self.config.to_dict():
            logger.warning("loading a QR state saved with a different config; keeping the current config")
        expected = {"rng"}
        fields = self._BUFFER_FIELDS
        if "buffer.x" in tensors and tensors["buffer.x"].dtype == torch.uint8:
            fields = (*fields, "x_range")
        buffer = {k: tensors[f"buffer.{k}"] for k in fields if f"buffer.{k}" in tensors}
        if buffer and len(buffer) != len(fields):
            raise ValueError(f"QR state has an incomplete buffer: {sorted(buffer)}")
        expected |= {f"buffer.{k}" for k in buffer}
        pool_task = meta["pool_task"]
        pool = {}
        if pool_task is not None:
            pool = {k: tensors[f"pool.{k}"] for k in self._POOL_FIELDS}
            expected |= {f"pool.{k}" for k in pool}
        bank, filled = {}, {}
        for t in meta["bank_tasks"]:
            bank[int(t)] = tensors[f"bank.{t}.logits"].clone()
            filled[int(t)] = tensors[f"bank.{t}.filled"].clone()
            expected |= {f"bank.{t}.logits", f"bank.{t}.filled"}
        unknown = sorted(set(tensors) - expected)
        if unknown:
            raise ValueError(f"QR state has unexpected tensors: {unknown}")
        if len(buffer.get("y", ())) != meta["buffer_len"]:
            raise ValueError(
                f"QR state buffer holds {len(buffer.get('y', ()))} samples, meta says {meta['buffer_len']}"
            )
        self._rng.set_state(tensors["rng"].clone())
        self._buffer = {k: v.clone() for k, v in buffer.items()}
        if buffer and ("x_range" in buffer) != (self.config.storage == "uint8"):
            # saved under the other storage: keep the buffer consistent with this config's
            rest = {k: v for k, v in self._buffer.items() if k not in ("x", "x_range")}
            self._buffer = {**self._encode(self._decode(self._buffer)), **rest}
        self._pool = {k: v.clone() for k, v in pool.items()}
        self._pool_task = pool_task
        self._bank, self._bank_filled = bank, filled
        self._running_ce = {int(t): float(v) for t, v in meta["running_ce"].items()}
        self._num_valid = {int(t): int(v) for t, v in meta["num_valid"].items()}
