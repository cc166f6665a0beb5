"""EMTAL as an Avalanche plugin: a thin adapter from Avalanche callbacks to `EMTALController`."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin

from cmtl.continual import EMTALConfig, EMTALController
from cmtl.model import CMTLModel


class AvalancheCMTL(MultiTaskModule):
    """Lets Avalanche pass task labels to a `CMTLModel` (it only does so for a MultiTaskModule)."""

    def __init__(self, model: CMTLModel):
        super().__init__()
        self.cmtl = model

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | None = None):
        """Logits for `task_labels`; with None, Avalanche's convention: {task: logits} of every known task."""
        if task_labels is None:
            return self.forward_all_tasks(x)
        return self.cmtl(x, task_labels if self.cmtl.mode == "til" else None)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.cmtl(x, task_label if self.cmtl.mode == "til" else None)


def _cmtl(model: torch.nn.Module) -> CMTLModel:
    inner = getattr(model, "cmtl", model)
    if not isinstance(inner, CMTLModel):
        raise TypeError(f"EMTALPlugin needs AvalancheCMTL(CMTLModel(...)), got {type(model).__name__}")
    return inner


def eval_batches(data, size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of an Avalanche dataset in order, `size` at a time, with its eval transform."""
    data = data.eval()
    for i in range(0, len(data), size):
        yield _stack(data, range(i, min(i + size, len(data))))


def _stack(data, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of `data[i]` for `indices`, as two tensors (no DataLoader, no shuffling)."""
    items = [data[int(i)] for i in indices]
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


class EMTALPlugin(SupervisedPlugin):
    """Adds an adapter + head per experience, fades routers, adds QR losses, consolidates.

    Use with any `SupervisedTemplate` whose model is `AvalancheCMTL(CMTLModel(...))`. Adapters are
    keyed on the experience index (class-incremental streams give every experience task label 0).
    """

    def __init__(self, config: EMTALConfig | None = None, pool_batch_size: int = 256):
        super().__init__()
        self.config = config or EMTALConfig()
        self.pool_batch_size = pool_batch_size
        self.controller: EMTALController | None = None
        self.last_losses: dict[str, float] = {}
        self._pending_state: dict | None = None

    def _ctl(self, strategy) -> EMTALController:
        model = _cmtl(strategy.model)
        if self.controller is None or self.controller.model is not model:
            self.controller = EMTALController(model, self.config, self.pool_batch_size)
            if self._pending_state is not None:
                self.controller.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.controller

    def state_dict(self) -> dict:
        """Stream position and QR buffer as `{"tensors": ..., "meta": ...}` (see `EMTALController`)."""
        if self.controller is None:
            return (
                self._pending_state or EMTALController(None, self.config).state_dict()
            )  # the untrained state
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; applied when the plugin first sees its model if it has none yet."""
        if self.controller is None:
            self._pending_state = state
        else:
            self.controller.load_state_dict(state)

    # parameters added here are picked up by the optimizer Avalanche builds afterwards
    def before_train_dataset_adaptation(self, strategy, **kwargs):
        ctl = self._ctl(strategy)
        exp = strategy.experience
        num_classes = len(exp.classes_in_this_experience)
        pool_x = pool_y = None
        if ctl.qr is not None:
            data = exp.dataset.eval()
            targets = torch.as_tensor(list(data.targets))
            idx = ctl.pool_indices(targets, num_classes, seed=exp.current_experience)
            if len(idx):
                pool_x, pool_y = _stack(data, idx.tolist())
        ctl.start_task(num_classes, pool_x, pool_y)
        if self.config.head_init != "random":
            ctl.init_head(eval_batches(exp.dataset, self.pool_batch_size), self._memory_batches(strategy))
        ctl.note_memory(self._memory_batches(strategy), eval_batches(exp.dataset, self.pool_batch_size))

    def _memory_batches(self, strategy) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
        """An Avalanche replay memory's samples (replay baseline), or None: the QR buffer's are used."""
        for p in strategy.plugins:
            if isinstance(p, ReplayPlugin):
                return eval_batches(p.storage_policy.buffer, self.pool_batch_size)
        return None

    def before_training_iteration(self, strategy, **kwargs):
        self.controller.on_step(strategy.train_epochs * len(strategy.dataloader))

    def before_backward(self, strategy, **kwargs):
        terms = self.controller.losses(strategy.mb_output, strategy.mb_y)
        for v in terms.values():
            strategy.loss = strategy.loss + v
        self.last_losses = {k: float(v.detach()) for k, v in terms.items()}

    def after_training_iteration(self, strategy, **kwargs):
        self.controller.after_step(strategy.mb_output, strategy.mb_y)

    def after_training_epoch(self, strategy, **kwargs):
        self.controller.record_pool()

    def after_training_exp(self, strategy, **kwargs):
        exp = strategy.experience
        # both are lazy: read only where the controller aligns the classifier
        self.controller.end_task(
            eval_batches(exp.dataset, self.pool_batch_size), self._memory_batches(strategy)
        )
        stream = getattr(exp, "origin_stream", None)
        if stream is not None and exp.current_experience == len(stream) - 1:
            self.controller.end_stream()  # consolidate what `consolidate_every` left open
