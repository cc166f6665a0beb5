"""Avalanche strategies for cmtl: the `EMTAL` template and the registered baselines, built by name.

`build_strategy(spec, model, strategy_cfg, ...)` turns a `cmtl.recipes.StrategySpec` into an
Avalanche `SupervisedTemplate` (or `JointTraining`) that every baseline shares: same optimiser,
per-task learning-rate schedule and batch sizes; only the spec's differences apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from avalanche.training import JointTraining
from avalanche.training.plugins import EWCPlugin, LwFPlugin, SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.utils.data import DataLoader

from cmtl.config import StrategyConfig
from cmtl.continual import EMTALConfig, init_heads
from cmtl.distributed import is_distributed
from cmtl.heads import check_head_init
from cmtl.model import CMTLModel
from cmtl.optim import lr_factor, make_optimizer, scale_groups, set_lr
from cmtl.recipes import StrategySpec

from .distributed import DistributedSync
from .emtal import AvalancheCMTL, EMTALPlugin, eval_batches
from .state import replay_plugin


class TaskLRSchedule(SupervisedPlugin):
    """Warm-up then cosine (or constant) learning rate, restarted at every experience."""

    def __init__(self, lr: float, schedule: str = "cosine", warmup_epochs: int = 0):
        super().__init__()
        self.lr, self.schedule, self.warmup_epochs = lr, schedule, warmup_epochs
        self.step = 0

    def before_training_exp(self, strategy, **kwargs):
        self.step = 0

    def before_training_iteration(self, strategy, **kwargs):
        per_epoch = len(strategy.dataloader)
        factor = lr_factor(
            self.step, strategy.train_epochs * per_epoch, self.warmup_epochs * per_epoch, self.schedule
        )
        set_lr(strategy.optimizer, self.lr * factor)
        self.step += 1


class _Resumed:
    """A data loader whose iteration continues an iterator already positioned (keeps `len`)."""

    def __init__(self, loader, batches):
        self.loader, self.batches = loader, batches

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self.batches

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _FreshOptimizer:
    """Fresh optimiser state per experience; parameters merged away are dropped from the optimiser.

    Under torch.distributed every rank evaluates the whole test set (exact metrics, no padding
    duplicates from a distributed sampler); training data stays sharded.

    Also resumable inside an experience: set `resume_point` (a `state.ResumePoint`) before
    `train(experience)` and the experience continues at the checkpointed epoch and step. To make
    such checkpoints possible the RNG state is noted at the start of every epoch (`epoch_rng`) and
    after every step (`fetch_rng`); see `state.mid_task_state`.
    """

    resume_point = None
    epoch_rng = None
    fetch_rng = None
    _skip_to = None

    def __init__(self, *args, head_lr_scale: float = 1.0, base_lr_scale: float = 1.0, **kwargs):
        """`head_lr_scale`: the heads' learning rate relative to the rest (`StrategyConfig.head_lr`);
        `base_lr_scale`: the same for the pre-trained weights chosen by `CMTLModel.tune_base`."""
        self.head_lr_scale, self.base_lr_scale = head_lr_scale, base_lr_scale
        super().__init__(*args, **kwargs)

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        point, self.resume_point = self.resume_point, None
        if point is None:
            return super()._train_exp(experience, eval_streams, **kwargs)
        for epoch in range(point.epoch, self.train_epochs):
            self._before_training_epoch(**kwargs)
            if self._stop_training:
                self._stop_training = False
                break
            if epoch == point.epoch:
                point.restore(self)
                self._skip_to = point
            self.training_epoch(**kwargs)
            self._after_training_epoch(**kwargs)

    def training_epoch(self, **kwargs):
        from cmtl.checkpoint import rng_state

        point, self._skip_to = self._skip_to, None
        if point is None:
            self.epoch_rng = self.fetch_rng = rng_state()
            return super().training_epoch(**kwargs)
        loader = self.dataloader
        self.epoch_rng = (point.epoch_rng, point.meta["epoch_rng"])
        self.dataloader = _Resumed(loader, point.batches(loader))
        try:
            return super().training_epoch(**kwargs)
        finally:
            self.dataloader = loader

    def _after_training_iteration(self, **kwargs):
        from cmtl.checkpoint import rng_state

        super()._after_training_iteration(**kwargs)
        self.fetch_rng = rng_state()  # the next batch's augmentation draws from this

    def make_optimizer(self, **kwargs):
        kwargs["reset_optimizer_state"] = True
        kwargs["remove_params"] = True
        super().make_optimizer(**kwargs)
        # Avalanche places new parameters (heads, re-MoEfied layers) by name; regroup every time
        model = self.model.cmtl
        groups = [(model.heads.parameters(), self.head_lr_scale)] if self.head_lr_scale != 1.0 else []
        if self.base_lr_scale != 1.0 and model.tuned_base:
            groups.append((model.tuned_base_parameters(), self.base_lr_scale))
        if groups:
            scale_groups(self.optimizer, groups)

    def make_eval_dataloader(self, num_workers=0, **kwargs):
        super().make_eval_dataloader(num_workers=num_workers, **kwargs)
        if is_distributed():
            collate = getattr(self.adapted_dataset, "collate_fn", None)
            self.dataloader = DataLoader(
                self.adapted_dataset,
                batch_size=self.eval_mb_size,
                num_workers=num_workers,
                collate_fn=collate,
            )


class CMTLStrategy(_FreshOptimizer, SupervisedTemplate):
    """`SupervisedTemplate` with a fresh optimiser state per experience and merged parameters dropped."""


class EMTAL(CMTLStrategy):
    """EMTAL as an Avalanche strategy: `CMTLStrategy` with `EMTALPlugin` installed.

    Args:
        model: a `CMTLModel` (wrapped in `AvalancheCMTL` here) or an `AvalancheCMTL`.
        optimizer: None gives AdamW(lr=1e-3, weight decay 0.01) over the model's parameters.
        config: the EMTAL procedure (fading, QR buffer, consolidation); None uses the defaults.
        train_mb_size, eval_mb_size: batch sizes (Avalanche's own default is 1: pass them).
        Remaining arguments go to `SupervisedTemplate`.
    """

    def __init__(
        self,
        model: CMTLModel | AvalancheCMTL,
        optimizer: torch.optim.Optimizer | None = None,
        criterion=None,
        config: EMTALConfig | None = None,
        train_mb_size: int = 32,
        train_epochs: int = 4,
        eval_mb_size: int = 128,
        device: str | torch.device = "cpu",
        plugins: Sequence[SupervisedPlugin] | None = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        **kwargs,
    ):
        net = model if isinstance(model, AvalancheCMTL) else AvalancheCMTL(model)
        if optimizer is None:
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        self.emtal_plugin = EMTALPlugin(config)
        super().__init__(
            model=net,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else torch.nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[self.emtal_plugin, *(plugins or [])],
            evaluator=evaluator,
            eval_every=eval_every,
            **kwargs,
        )


class CMTLJoint(_FreshOptimizer, JointTraining):
    """Avalanche's `JointTraining` (all experiences at once), with the same optimiser handling.

    `head_init` ("random", "prototype" or "probe", as `StrategyConfig.head_init`) starts the heads
    from the pre-trained features of every experience's training images before training, as the
    continual strategies start each new task's: each task its own head (task-incremental), or one
    classifier over all classes (class-incremental), so the upper bound starts where they do.
    """

    def __init__(self, *, head_init: str = "random", head_batch_size: int = 256, **kwargs):
        check_head_init(head_init)  # before Avalanche builds anything
        super().__init__(**kwargs)
        self.head_init, self.head_batch_size = head_init, head_batch_size

    def _before_training_exp(self, **kwargs):
        super()._before_training_exp(**kwargs)
        if self.head_init == "random":
            return
        model = self.model.cmtl
        if model.mode == "til":
            for exp in self._experiences:
                t = exp.current_experience
                init_heads(
                    model, self.head_init, eval_batches(exp.dataset, self.head_batch_size), range(t, t + 1)
                )
        else:
            batches = (
                b for exp in self._experiences for b in eval_batches(exp.dataset, self.head_batch_size)
            )
            init_heads(model, self.head_init, batches, range(len(model.heads.heads)))


def find_emtal_plugin(strategy) -> EMTALPlugin | None:
    """The `EMTALPlugin` installed in `strategy`, if any."""
    return next((p for p in strategy.plugins if isinstance(p, EMTALPlugin)), None)


def build_strategy(
    spec: StrategySpec,
    model: CMTLModel,
    st: StrategyConfig,
    *,
    classes_per_task: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    evaluator=default_evaluator,
    plugins: Sequence[SupervisedPlugin] = (),
) -> SupervisedTemplate:
    """An Avalanche strategy for `spec` training `model` with the `strategy` config section.

    `classes_per_task` is needed by `joint`, which creates every head before training. `plugins`
    come first, so their callbacks see each step before the strategy's own plugins.
    """
    model.set_backbone_trainable(spec.backbone_trainable)
    if not spec.backbone_trainable:
        model.tune_base(st.tune_base)
    net = AvalancheCMTL(model)
    lr = st.backbone_lr if spec.backbone_trainable and st.backbone_lr is not None else st.lr
    base_lr = st.lr if st.backbone_lr is None else st.backbone_lr
    common = dict(
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=st.batch_size,
        train_epochs=st.epochs,
        eval_mb_size=st.eval_batch_size,
        device=device,
        evaluator=evaluator,
        eval_every=-1,
        head_lr_scale=1.0 if st.head_lr is None else st.head_lr / lr,
        base_lr_scale=base_lr / lr,
    )
    extra: list[SupervisedPlugin] = [TaskLRSchedule(lr, st.scheduler, st.warmup_epochs)]
    if spec.avalanche == "joint":
        if classes_per_task is None:
            raise ValueError("strategy 'joint' needs classes_per_task to create every head up front")
        for n in classes_per_task:
            model.add_task(n, adapter=False)
        optimizer = make_optimizer(st.optimizer, net.parameters(), lr, st.weight_decay, st.momentum)
        if is_distributed():
            extra.append(DistributedSync())
        return CMTLJoint(
            model=net, optimizer=optimizer, plugins=[*plugins, *extra], head_init=st.head_init, **common
        )
    if spec.avalanche == "replay":
        extra.append(replay_plugin(st.buffer_size, st.replay_batch_size))
    elif spec.avalanche == "lwf":
        extra.append(LwFPlugin(alpha=st.lwf_alpha, temperature=st.lwf_temperature))
    elif spec.avalanche == "ewc":
        extra.append(EWCPlugin(ewc_lambda=st.ewc_lambda))
    elif spec.avalanche is not None:
        raise ValueError(f"unknown Avalanche component {spec.avalanche!r}; valid: joint, replay, lwf, ewc")
    optimizer = make_optimizer(st.optimizer, net.parameters(), lr, st.weight_decay, st.momentum)
    if is_distributed():
        extra.append(DistributedSync())
    return CMTLStrategy(
        model=net, optimizer=optimizer, plugins=[*plugins, EMTALPlugin(spec.emtal), *extra], **common
    )
