"""Keeps ranks identical under torchrun: see `cmtl.distributed` for why this is not a DDP wrapper."""

from __future__ import annotations

from avalanche.training.plugins import SupervisedPlugin

from cmtl import distributed as D

from .emtal import EMTALPlugin


class DistributedSync(SupervisedPlugin):
    """Broadcast the model when its structure changes, average gradients, share the QR buffer.

    Install it after `EMTALPlugin` so the buffer is shared once the plugin has filled it.
    """

    supports_distributed = True

    def before_training_exp(self, strategy, **kwargs):
        D.broadcast_module(strategy.model)  # the new adapter and head start equal on every rank

    def before_update(self, strategy, **kwargs):
        D.average_gradients(p for p in strategy.model.parameters() if p.requires_grad)

    def after_training_exp(self, strategy, **kwargs):
        for p in strategy.plugins:
            if isinstance(p, EMTALPlugin) and p.controller is not None and p.controller.qr is not None:
                state = D.broadcast_object(p.controller.state_dict() if D.is_main_process() else None)
                p.controller.load_state_dict(state)
        D.broadcast_module(strategy.model)
