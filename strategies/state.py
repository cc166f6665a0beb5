"""Checkpointable state of the Avalanche side of a run: plugins' memories and the strategy clock.

`strategy_state(strategy)` returns `(tensors, meta)` (plain tensors + JSON) and
`load_strategy_state(strategy, tensors, meta, train_stream)` puts it back into a freshly built
strategy, so a resumed run continues exactly where the checkpoint was written (between experiences).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer, ReservoirSamplingBuffer
from avalanche.training.utils import ParamData

from .emtal import EMTALPlugin


class IndexedReservoirBuffer(ReservoirSamplingBuffer):
    """Avalanche's reservoir group of one experience that also remembers which samples it kept.

    Draws the same random weights as `ReservoirSamplingBuffer` (one `torch.rand` per sample), so runs
    match Avalanche's; the kept indices make the group restorable from a checkpoint.
    """

    def __init__(self, max_size: int):
        super().__init__(max_size)
        self.indices = torch.zeros(0, dtype=torch.long)

    def update_from_dataset(self, new_data):
        if len(self.buffer) > 0:
            raise RuntimeError("IndexedReservoirBuffer holds one experience; it is filled once")
        weights = torch.rand(len(new_data))
        sorted_weights, order = weights.sort(descending=True)
        self.indices = order[: self.max_size]
        self._buffer_weights = sorted_weights[: self.max_size]
        self.buffer = new_data.subset(self.indices)

    def resize(self, strategy: Any, new_size: int):
        super().resize(strategy, new_size)
        self.indices = self.indices[: len(self.buffer)]

    def restore(self, data, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self.indices, self._buffer_weights = indices.long(), weights
        self.buffer = data.subset(self.indices)


class IndexedExperienceBalancedBuffer(ExperienceBalancedBuffer):
    """`ExperienceBalancedBuffer` (Avalanche's replay default) built from `IndexedReservoirBuffer`s."""

    def post_adapt(self, agent, exp):
        self._num_exps += 1
        lens = self.get_group_lengths(self._num_exps)
        group = IndexedReservoirBuffer(lens[-1])
        group.update_from_dataset(exp.dataset)
        self.buffer_groups[self._num_exps - 1] = group
        for size, g in zip(lens, self.buffer_groups.values()):
            g.resize(agent, size)


def replay_plugin(mem_size: int) -> ReplayPlugin:
    """Avalanche's `ReplayPlugin` with a checkpointable experience-balanced reservoir memory."""
    return ReplayPlugin(mem_size=mem_size, storage_policy=IndexedExperienceBalancedBuffer(mem_size))


def _param_dict(prefix: str, params: dict[str, ParamData], tensors: dict[str, torch.Tensor]) -> list[str]:
    names = []
    for name, p in params.items():
        tensors[f"{prefix}.{name}"] = p.data
        names.append(name)
    return names


def strategy_state(strategy) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of every supported plugin and of the clock, as `(tensors, meta)`."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"clock": {"train_exp_counter": strategy.clock.train_exp_counter}}
    for p in strategy.plugins:
        if isinstance(p, EMTALPlugin):
            st = p.state_dict()
            tensors.update({f"emtal.{k}": v for k, v in st["tensors"].items()})
            meta["emtal"] = st["meta"]
        elif isinstance(p, EWCPlugin):
            ewc: dict[str, Any] = {"saved": {}, "importances": {}}
            for exp, params in p.saved_params.items():
                ewc["saved"][str(exp)] = _param_dict(f"ewc.saved.{exp}", params, tensors)
            for exp, params in p.importances.items():
                ewc["importances"][str(exp)] = _param_dict(f"ewc.imp.{exp}", params, tensors)
            meta["ewc"] = ewc
        elif isinstance(p, LwFPlugin):
            meta["lwf"] = {"experiences": p.lwf.expcount}
        elif isinstance(p, ReplayPlugin):
            policy = p.storage_policy
            if not isinstance(policy, IndexedExperienceBalancedBuffer):
                raise TypeError("only replay_plugin()'s storage policy can be checkpointed")
            groups = {}
            for exp, g in policy.buffer_groups.items():
                tensors[f"replay.{exp}.indices"] = g.indices
                tensors[f"replay.{exp}.weights"] = g._buffer_weights
                groups[str(exp)] = g.max_size
            meta["replay"] = {"num_exps": policy._num_exps, "groups": groups}
    return tensors, meta


def load_strategy_state(
    strategy, tensors: dict[str, torch.Tensor], meta: dict[str, Any], train_stream
) -> None:
    """Put `strategy_state()` back into a fresh strategy whose model was already restored."""
    done = int(meta["clock"]["train_exp_counter"])
    strategy.clock.train_exp_counter = done
    net = strategy.model  # what Avalanche's MultiTaskModule.adaptation learnt from the finished experiences
    for exp in train_stream[:done]:
        net.max_class_label = max(net.max_class_label, max(exp.classes_in_this_experience) + 1)
        net.known_train_tasks_labels = net.known_train_tasks_labels | set(exp.task_labels)
    for p in strategy.plugins:
        if isinstance(p, EMTALPlugin):
            p.load_state_dict(
                {
                    "tensors": {k[6:]: v for k, v in tensors.items() if k.startswith("emtal.")},
                    "meta": meta["emtal"],
                }
            )
        elif isinstance(p, EWCPlugin):
            for kind, target in (("saved", p.saved_params), ("importances", p.importances)):
                short = "saved" if kind == "saved" else "imp"
                for exp, names in meta["ewc"][kind].items():
                    target[int(exp)] = {
                        n: ParamData(
                            n,
                            tensors[f"ewc.{short}.{exp}.{n}"].shape,
                            init_tensor=tensors[f"ewc.{short}.{exp}.{n}"],
                        )
                        for n in names
                    }
        elif isinstance(p, LwFPlugin):
            # LwF keeps a copy of the model after the last experience and the classes of each task
            for exp in train_stream[:done]:
                p.lwf.post_adapt(strategy, exp)  # copies strategy.model: the model after the last one
        elif isinstance(p, ReplayPlugin):
            policy = p.storage_policy
            policy._num_exps = int(meta["replay"]["num_exps"])
            for exp, size in meta["replay"]["groups"].items():
                g = IndexedReservoirBuffer(int(size))
                g.restore(
                    train_stream[int(exp)].dataset,
                    tensors[f"replay.{exp}.indices"],
                    tensors[f"replay.{exp}.weights"],
                )
                policy.buffer_groups[int(exp)] = g
