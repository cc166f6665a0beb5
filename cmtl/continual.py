"""The EMTAL continual procedure, framework-free: adapters per task, fading, QR, consolidation.

A training loop (or the Avalanche plugin in `cmtl.strategies`) calls, per task:

    ctl.start_task(num_classes, pool_x, pool_y)
    for each step: ctl.on_step(total_steps); loss = ce + sum(ctl.losses(logits, y).values())
                   ...backward/step...; ctl.after_step(logits, y)
    after each epoch: ctl.record_pool()
    ctl.end_task(batches)   # batches: the task's training images, for classifier alignment
and `ctl.end_stream()` at the end, which consolidates whatever is still open.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cmtl.alignment import (
    DRIFT_RIDGE,
    SHRINKAGE,
    ClassStatistics,
    align_classifier,
    check_covariance,
    check_drift_map,
    fit_drift_map,
)
from cmtl.heads import check_head_init
from cmtl.model import CMTLModel
from cmtl.qr import QRBuffer, QRConfig, class_balanced_indices

logger = logging.getLogger(__name__)


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, fixed norms) for the block, then the model's own mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def class_features(
    model: CMTLModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (on the CPU) and labels of every batch, in eval mode."""
    device = next(model.parameters()).device
    with _evaluating(model):
        pairs = [
            (model.forward_features(x.to(device)).float().cpu(), torch.as_tensor(y).long())
            for x, y in batches
        ]
    if not pairs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])


def _first_per_class(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], per_class: int, positions: list[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `per_class` samples of each class of `batches`, batch by batch; appends their
    positions in the whole sequence to `positions` as it goes."""
    counts: dict[int, int] = {}
    offset = 0
    for x, y in batches:
        y = torch.as_tensor(y).long()
        keep = torch.zeros(len(y), dtype=torch.bool)
        for i, c in enumerate(y.tolist()):
            if counts.get(c, 0) < per_class:
                counts[c] = counts.get(c, 0) + 1
                keep[i] = True
        if keep.any():
            positions.append(keep.nonzero().flatten() + offset)
            yield x[keep], y[keep]
        offset += len(y)


def fading_coefficient(step: int, total: int, start: float = 0.0, end: float = 0.55) -> float:
    """EMTAL's linear ramp: a = 1 before `start`, 0 after `end` (fractions of the task's steps)."""
    if total <= 0:
        return 0.0
    frac = step / total
    if frac <= start:
        return 1.0
    if frac >= end:
        return 0.0
    return 1.0 - (frac - start) / (end - start)


@dataclass
class EMTALConfig:
    """Settings of the continual procedure.

    Attributes:
        fading_start, fading_end: fractions of a task's steps over which a goes 1 -> 0.
        fading: False keeps the routers on until the task ends (the `emtal_no_fading` ablation);
            they are then switched off at once so the merge stays exact.
        consolidate_every: merge the open adapters every `k` tasks (and at the end of the stream).
        qr: QR buffer settings; None disables QR (the `emtal_no_qr` ablation).
        align_heads: class-incremental only: after every task, rescale the newest classes' head
            rows to the mean norm of the older ones (weight aligning; see `TaskHeads.align_newest`).
        head_init: "random" (small random weights), "prototype" (a new task's head starts as the
            nearest-class-mean classifier of its training images' features) or "probe" (as a
            logistic regression fitted to them); see `init_head`.
        classifier_alignment: class-incremental only: after every task, keep the feature mean and
            covariance of its classes and re-fit every head row on samples of all classes'
            Gaussians (SLCA's classifier alignment; see `cmtl.alignment`).
        alignment_samples: features sampled per class for that re-fit.
        alignment_shrinkage: pull of each class covariance toward its mean variance, in (0, 1].
        alignment_covariance: "full" or "shared" (see `cmtl.alignment.ClassStatistics`).
        alignment_drift: before the re-fit, move the old classes' statistics by how the features of
            their memory samples moved over the task (drift compensation measured on the replay
            memory instead of estimated from the new task's images).
        alignment_drift_map: "linear" (one ridge-regularised linear map fitted on all memory
            samples moves means and covariances) or "shift" (each class's mean by its own memory
            samples' mean change; see `cmtl.alignment.DRIFT_MAPS`).
        alignment_drift_ridge: that map's pull toward the identity (`cmtl.alignment.fit_drift_map`).
        alignment_drift_task_samples: fit that linear map on up to this many of the new task's
            training images per class as well (their features at the task's start and end), not
            on the memory alone; 0: the memory alone. The new classes have no statistics yet, so
            their images only pin down the map (as Learnable Drift Compensation fits it on the
            new task's data alone).
        feature_distill: weight of a term that keeps each QR buffer sample's features (pre-logits)
            where they were as the task started: the mean squared difference over the features of a
            buffer batch. Logit distillation holds only the few directions the head reads; this
            holds the rest too, so old classes' statistics go less stale (0: off).
    """

    fading_start: float = 0.0
    fading_end: float = 0.55
    fading: bool = True
    consolidate_every: int = 1
    qr: QRConfig | None = field(default_factory=QRConfig)
    align_heads: bool = False
    head_init: str = "random"
    classifier_alignment: bool = False
    alignment_samples: int = 256
    alignment_shrinkage: float = SHRINKAGE
    alignment_covariance: str = "full"
    alignment_drift: bool = False
    alignment_drift_map: str = "linear"
    alignment_drift_ridge: float = DRIFT_RIDGE
    alignment_drift_task_samples: int = 0
    feature_distill: float = 0.0

    def __post_init__(self) -> None:
        check_head_init(self.head_init)
        check_covariance(self.alignment_covariance)
        check_drift_map(self.alignment_drift_map)
        if self.alignment_drift_ridge <= 0:
            raise ValueError(f"alignment_drift_ridge={self.alignment_drift_ridge} must be > 0")
        if self.alignment_samples < 1:
            raise ValueError(f"alignment_samples={self.alignment_samples} must be >= 1")
        if self.feature_distill < 0:
            raise ValueError(f"feature_distill={self.feature_distill} must be >= 0")
        if self.alignment_drift_task_samples < 0:
            raise ValueError(f"alignment_drift_task_samples={self.alignment_drift_task_samples} must be >= 0")
        if self.alignment_drift_task_samples and self.alignment_drift_map != "linear":
            raise ValueError(
                f"alignment_drift_task_samples={self.alignment_drift_task_samples} needs "
                f"alignment_drift_map 'linear', not {self.alignment_drift_map!r} (a shift moves each "
                "class by its own memory samples; the new task's images have no class to move)"
            )
        if not 0.0 < self.alignment_shrinkage <= 1.0:
            raise ValueError(f"alignment_shrinkage={self.alignment_shrinkage} must be in (0, 1]")
        if not 0.0 <= self.fading_start <= self.fading_end <= 1.0:
            raise ValueError(
                f"fading_start={self.fading_start}, fading_end={self.fading_end}: need 0 <= start <= end <= 1"
            )
        if self.consolidate_every < 1:
            raise ValueError(f"consolidate_every={self.consolidate_every} must be >= 1")


class EMTALController:
    """Drives a `CMTLModel` and a `QRBuffer` through a stream of tasks."""

    def __init__(
        self, model: CMTLModel | None, config: EMTALConfig | None = None, pool_batch_size: int = 256
    ):
        self.model = model
        self.config = config or EMTALConfig()
        self.qr = QRBuffer(self.config.qr) if self.config.qr is not None else None
        self.stats = (
            ClassStatistics(self.config.alignment_shrinkage, self.config.alignment_covariance)
            if self.config.classifier_alignment
            else None
        )
        self.memory_start: tuple[torch.Tensor, torch.Tensor] | None = None  # drift: features at task start
        # drift, `alignment_drift_task_samples`: the new task's chosen images' features at its start
        # and their positions in the task's training batches
        self.task_start: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buffer_start: torch.Tensor | None = None  # feature_distill: buffer features at task start
        self.pool_batch_size = pool_batch_size
        self.task = -1
        self.step = 0
        self.tasks_since_merge = 0

    @property
    def adapter(self) -> str | None:
        return self.model.open_adapters[-1] if self.model.open_adapters else None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def start_task(
        self, num_classes: int, pool_x: torch.Tensor | None = None, pool_y: torch.Tensor | None = None
    ) -> int:
        """Add the task's adapter and head; register its un-augmented candidate pool with QR."""
        self.task = self.model.add_task(num_classes)
        self.step = 0
        if self.qr is not None and pool_x is not None:
            width = num_classes if self.model.mode == "til" else self.model.heads.num_classes
            self.qr.begin_task(self.task, pool_x.cpu(), pool_y.cpu(), num_valid_classes=width)
        return self.task

    def init_head(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        old_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> bool:
        """Start the new task's head from its training images' features, as `config.head_init` says.

        See `init_heads`; the features are those of the model as the task starts (its new adapter
        is still the identity). `old_batches`: the replay memory's (images, classes) that a
        class-incremental probe is fitted against; None takes the QR buffer's.
        """
        if old_batches is None:
            old_batches = self._buffer_batches()
        return init_heads(self.model, self.config.head_init, batches, old_batches=old_batches)

    def note_memory(
        self,
        memory: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """With `alignment_drift`: the features of the replay memory (None: the QR buffer) as the task
        starts, to measure at its end how far each old class's features moved. With
        `alignment_drift_task_samples`, also those of the first that many images per class of
        `batches` (the task's un-augmented training images, in the order `end_task` gets them).
        With `feature_distill`, the QR buffer's features, which its term holds the buffer to."""
        self.memory_start = self.task_start = self.buffer_start = None
        if self.config.feature_distill > 0 and self.qr is not None and len(self.qr):
            self.buffer_start = class_features(self.model, self._buffer_batches())[0]
        if self.stats is None or not self.config.alignment_drift or self.model.mode != "cil":
            return
        feats, labels = class_features(self.model, self._buffer_batches() if memory is None else memory)
        if not len(labels):
            return
        self.memory_start = (feats, labels)
        per_class = self.config.alignment_drift_task_samples
        if per_class and batches is not None and len(self.stats):
            chosen: list[torch.Tensor] = []
            taken = _first_per_class(batches, per_class, chosen)
            task_feats, _ = class_features(self.model, taken)
            if len(task_feats):
                self.task_start = (task_feats, torch.cat(chosen))

    @torch.no_grad()
    def compensate_drift(
        self,
        memory: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        task_features: torch.Tensor | None = None,
    ) -> int:
        """Move every old class's stored statistics by how its memory samples' features changed since
        `note_memory` (same samples, same order: the memory does not change inside a task): each
        mean by its samples' mean change ("shift"), or through one linear map fitted on all of them,
        which moves the covariances too ("linear"; classes without memory samples follow the map
        alone). `task_features`: the features now of every image of the task's batches, in order;
        the map is fitted on those `note_memory` chose too. Returns the number of classes moved."""
        task_start, self.task_start = self.task_start, None
        if self.memory_start is None:
            return 0
        start, labels = self.memory_start
        self.memory_start = None
        end, end_labels = class_features(self.model, self._buffer_batches() if memory is None else memory)
        if not torch.equal(end_labels, labels):
            logger.warning("the replay memory changed inside task %d; no drift compensation", self.task)
            return 0
        if torch.equal(start, end):
            return 0  # nothing moved (a frozen backbone): leave the statistics bit for bit
        if self.config.alignment_drift_map == "linear":
            extra = None
            if task_start is not None and task_features is not None:
                feats, positions = task_start
                if len(task_features) > int(positions.max()):
                    extra = (feats, task_features[positions])
                else:
                    logger.warning(
                        "task %d has fewer images than at its start; drift on the memory alone", self.task
                    )
            return self._transport(start, end, labels, extra)
        moved = 0
        for c in torch.unique(labels).tolist():
            moved += self.stats.shift(c, (end[labels == c] - start[labels == c]).mean(0))
        return moved

    def _transport(
        self,
        start: torch.Tensor,
        end: torch.Tensor,
        labels: torch.Tensor,
        extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> int:
        """`compensate_drift` by one linear map: mean_c -> end_c + (mean_c - start_c) W, where
        start_c / end_c are class c's memory mean before / after (mean_c W + b without memory).
        `extra`: more (before, after) features the map is fitted on (the new task's images)."""
        if len(labels) < 2 or not len(self.stats):
            return 0
        before, after = (
            (start, end) if extra is None else (torch.cat([start, extra[0]]), torch.cat([end, extra[1]]))
        )
        weight, bias = fit_drift_map(before, after, self.config.alignment_drift_ridge)
        means = self.stats.means.double() @ weight + bias
        for i, c in enumerate(self.stats.classes.tolist()):
            mine = labels == c
            if mine.any():
                means[i] = (
                    end[mine].double().mean(0)
                    + (self.stats.means[i].double() - start[mine].double().mean(0)) @ weight
                )
        self.stats.transform(weight, means)
        return len(self.stats)

    def _buffer_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The QR buffer's (images, labels), `pool_batch_size` at a time."""
        if self.qr is None or not len(self.qr):
            return
        x, y = self.qr.buffer_images(), self.qr.buffer["y"]
        for i in range(0, len(x), self.pool_batch_size):
            yield x[i : i + self.pool_batch_size], y[i : i + self.pool_batch_size]

    def pool_indices(self, targets: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
        """Which training samples (by index) form the candidate pool of a task."""
        per_class = self.qr.pool_per_class(num_classes) if self.qr is not None else 0
        return class_balanced_indices(targets, per_class, seed=seed) if per_class else targets[:0].long()

    def on_step(self, total_steps: int) -> float:
        """Apply the fading schedule for the current step; returns a."""
        cfg = self.config
        a = (
            fading_coefficient(self.step, total_steps, cfg.fading_start, cfg.fading_end)
            if cfg.fading
            else 1.0
        )
        if self.adapter is not None:
            self.model.set_fading(a, self.adapter)
        self.step += 1
        return a

    def _head_arg(self, task: torch.Tensor | int) -> torch.Tensor | int | None:
        return task if self.model.mode == "til" else None

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """QR terms to add to the task loss: in-task (EMTAL) and replay on a buffer batch."""
        out: dict[str, torch.Tensor] = {}
        if self.qr is None:
            return out
        out["qr_in"] = self.qr.in_task_loss(logits, targets, self.task)
        if len(self.qr):
            size = self.qr.config.batch_size or targets.shape[0]
            batch = self.qr.sample(size, device=logits.device)
            features = self.model.forward_features(batch.x)
            student = self.model.forward_head(features, self._head_arg(batch.task))
            out.update(self.qr.replay_loss(student, batch, self.model.heads.classes_per_task[-1]))
            if self.buffer_start is not None:
                teacher = self.buffer_start[batch.index.cpu()].to(features.device)
                out["qr_feat"] = self.config.feature_distill * F.mse_loss(features.float(), teacher)
        return out

    def after_step(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if self.qr is not None:
            self.qr.update_bank(logits.detach(), targets, self.task)

    @torch.no_grad()
    def record_pool(self) -> None:
        """Evaluate the pool and keep each sample's logits if their quality improved."""
        if self.qr is None or self.qr.pool_task != self.task:
            return
        x, size, head = self.qr.pool["x"], self.pool_batch_size, self._head_arg(self.task)
        with _evaluating(self.model):
            chunks = [
                self.model(x[i : i + size].to(self._device()), head).cpu() for i in range(0, len(x), size)
            ]
        if chunks:
            self.qr.record(torch.cat(chunks))

    @torch.no_grad()
    def refresh_buffer(self) -> int:
        """Evaluate the buffer under each sample's own head; keep logits where their quality improved
        (`refresh_keep: latest`: keep them all, over every class seen in class-incremental mode)."""
        if self.qr is None or not len(self.qr):
            return 0
        size, buf, dev = self.pool_batch_size, self.qr.buffer, self._device()
        x = self.qr.buffer_images()
        with _evaluating(self.model):
            chunks = [
                self.model(x[i : i + size].to(dev), self._head_arg(buf["task"][i : i + size].to(dev))).cpu()
                for i in range(0, len(x), size)
            ]
        # a TIL batch is as wide as its widest head; columns past a sample's own are not read
        width = buf["logits"].shape[1]
        logits = torch.cat([F.pad(c, (0, max(0, width - c.shape[1]))) for c in chunks])
        replaced = self.qr.refresh(logits, widen=self.model.mode == "cil")
        logger.info("QR buffer after task %d: %d of %d records improved", self.task, replaced, len(self.qr))
        return replaced

    def end_task(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        memory: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> bool:
        """Fade fully, fill the buffer, consolidate every `k` tasks (returns True if it merged),
        with `classifier_alignment` re-fit the class-incremental head on the class statistics
        (`batches`: the task's un-augmented training images and classes) and, with `qr.refresh`,
        let the buffer keep whatever logits of the final model are better. `memory`: the replay
        memory `note_memory` saw (None: the QR buffer), for `alignment_drift`."""
        if self.adapter is not None:
            self.model.set_fading(0.0, self.adapter)
        self.buffer_start = None  # the buffer takes the new task's samples below
        task_features = None
        if self.task_start is not None and batches is not None:
            # one pass over the task's images serves the drift map and the new classes' statistics
            task_features = class_features(self.model, batches)
            batches = None
        self.compensate_drift(memory, None if task_features is None else task_features[0])
        if self.qr is not None and self.qr.pool_task == self.task:
            self.qr.end_task()
        if self.config.align_heads:
            self.model.heads.align_newest()
        self.tasks_since_merge += 1
        merged = self.tasks_since_merge >= self.config.consolidate_every and self.consolidate()
        if self.stats is not None and self.model.mode == "cil":
            self.align_classifier(batches, task_features)
        if self.qr is not None and self.qr.config.refresh:
            self.refresh_buffer()
        return merged

    def align_classifier(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> bool:
        """Store the statistics of the task's classes, then re-fit the head on all classes' (see
        `cmtl.alignment`). The features are the model's as the task ends (routers faded out), taken
        from `batches` or given as (features, classes)."""
        if features is None and batches is not None:
            features = class_features(self.model, batches)
        if features is not None:
            feats, labels = features
            if len(labels):
                self.stats.update(feats, labels)
        generator = torch.Generator().manual_seed(self.task)
        done = align_classifier(self.model.heads, self.stats, self.config.alignment_samples, generator)
        logger.info("classifier aligned after task %d on %d classes: %s", self.task, len(self.stats), done)
        return done

    def consolidate(self) -> bool:
        if not self.model.open_adapters:
            return False
        self.model.set_fading(0.0)
        self.model.consolidate()
        self.tasks_since_merge = 0
        logger.info("consolidated after task %d", self.task)
        return True

    def end_stream(self) -> bool:
        return self.consolidate()

    def state_dict(self) -> dict:
        """The stream position and the QR buffer: `{"tensors": {...}, "meta": {...}}` (tensors + JSON)."""
        meta = {"task": self.task, "step": self.step, "tasks_since_merge": self.tasks_since_merge}
        tensors: dict[str, torch.Tensor] = {}
        if self.qr is not None:
            qr = self.qr.state_dict()
            tensors = {f"qr.{k}": v for k, v in qr["tensors"].items()}
            meta["qr"] = qr["meta"]
        if self.stats is not None:
            tensors.update({f"stats.{k}": v for k, v in self.stats.state_dict().items()})
        if self.memory_start is not None:
            tensors["drift.features"], tensors["drift.labels"] = self.memory_start
        if self.task_start is not None:
            tensors["drift.task_features"], tensors["drift.task_positions"] = self.task_start
        if self.buffer_start is not None:
            tensors["feat.buffer"] = self.buffer_start
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        meta, tensors = state["meta"], state["tensors"]
        if (self.qr is None) != ("qr" not in meta):
            raise ValueError("state and controller disagree on whether a QR buffer is used")
        self.task, self.step = int(meta["task"]), int(meta["step"])
        self.tasks_since_merge = int(meta["tasks_since_merge"])
        if self.qr is not None:
            qr_tensors = {k[3:]: v for k, v in tensors.items() if k.startswith("qr.")}
            self.qr.load_state_dict({"tensors": qr_tensors, "meta": meta["qr"]})
        if self.stats is not None and "stats.classes" in tensors:
            self.stats.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("stats.")})
        if "drift.features" in tensors:
            self.memory_start = (tensors["drift.features"], tensors["drift.labels"].long())
        if "feat.buffer" in tensors:
            self.buffer_start = tensors["feat.buffer"]
        if "drift.task_features" in tensors:
            self.task_start = (tensors["drift.task_features"], tensors["drift.task_positions"].long())


@torch.no_grad()
def init_heads(
    model: CMTLModel,
    head_init: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    tasks: range | None = None,
    old_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
) -> bool:
    """Start heads `tasks` (default: the newest) from the features of their training images.

    "random" leaves them as they are; "prototype" makes them the nearest-class-mean classifier of
    their classes (`TaskHeads.init_from_means`); "probe" does that, then fits them to a converged
    logistic regression on the same features (`TaskHeads.fit`). `batches` yields (images, labels),
    un-augmented; labels are the task's own (0..n-1, task-incremental: one head) or the global
    classes of those heads (class-incremental, where several heads are one classifier: joint
    training starts all of them at once). Returns False if fewer than two classes had samples (the
    heads keep their start).

    `old_batches` (class-incremental, "probe"): (images, classes) of stored samples of the earlier
    classes, a replay memory; the probe is fitted against those classes too (`TaskHeads.fit`'s
    `old`). Other modes and inits ignore them.
    """
    check_head_init(head_init)
    if head_init == "random":
        return False
    heads = model.heads
    tasks = heads.task_span(tasks)
    widths = heads.classes_per_task
    n, first = sum(widths[t] for t in tasks), (sum(widths[: tasks.start]) if model.mode == "cil" else 0)
    device = next(model.parameters()).device
    sums = torch.zeros(n, heads.in_features, device=device)
    counts = torch.zeros(n, device=device)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    with _evaluating(model):
        for x, y in batches:
            local = torch.as_tensor(y, device=device).long() - first
            if len(local) and (int(local.min()) < 0 or int(local.max()) >= n):
                bad = int(local[(local < 0) | (local >= n)][0]) + first
                raise ValueError(
                    f"label {bad} is not one of the classes of heads {tasks.start}..{tasks.stop - 1} "
                    f"({first}..{first + n - 1}); head_init={head_init!r} needs each task's classes "
                    "numbered after the previous ones"
                )
            feats = model.forward_features(x.to(device)).float()
            sums.index_add_(0, local, feats)
            counts.index_add_(0, local, torch.ones_like(local, dtype=counts.dtype))
            if head_init == "probe":
                kept.append((feats, local))
    means = sums / counts.clamp(min=1).unsqueeze(1)
    if not heads.init_from_means(means, counts > 0, tasks=tasks):
        return False
    if not kept:
        return True
    olds: list[tuple[torch.Tensor, torch.Tensor]] = []
    if model.mode == "cil":
        with _evaluating(model):
            for x, y in old_batches:
                olds.append((model.forward_features(x.to(device)).float(), torch.as_tensor(y).long()))
    old = (torch.cat([f for f, _ in olds]), torch.cat([y for _, y in olds])) if olds else None
    return heads.fit(torch.cat([f for f, _ in kept]), torch.cat([y for _, y in kept]), tasks=tasks, old=old)
