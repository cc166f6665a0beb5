"""Checkpointable state of the Avalanche side of a run: plugins' memories and the strategy clock.

`strategy_state(strategy)` returns `(tensors, meta)` (plain tensors + JSON) and
`load_strategy_state(strategy, tensors, meta, train_stream)` puts it back into a freshly built
strategy, so a resumed run continues exactly where the checkpoint was written. Inside an
experience, `mid_task_state(strategy)` adds the optimiser, clock, schedule and RNG position, and a
`ResumePoint` set on the strategy continues the experience from there.
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


def replay_plugin(mem_size: int, batch_size_mem: int | None = None) -> ReplayPlugin:
    """Avalanche's `ReplayPlugin` with a checkpointable experience-balanced reservoir memory.

    `batch_size_mem`: buffer samples per step (None: Avalanche's default, the training batch size).
    """
    return ReplayPlugin(
        mem_size=mem_size,
        batch_size_mem=batch_size_mem,
        storage_policy=IndexedExperienceBalancedBuffer(mem_size),
    )


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
            if p.lwf.prev_model is not None:  # inside a task the live model has moved on from it
                tensors.update({f"lwf.prev.{k}": v for k, v in p.lwf.prev_model.state_dict().items()})
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
            prev = {k[9:]: v for k, v in tensors.items() if k.startswith("lwf.prev.")}
            if prev and p.lwf.prev_model is not None:  # exact even where the live model is not restored yet
                p.lwf.prev_model.load_state_dict(prev, strict=True)
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


# ---------------------------------------------------------------------------------------------
# Inside an experience: what a mid-task checkpoint adds, and how a strategy continues from it
# ---------------------------------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`optimizer.state_dict()` as plain tensors + JSON (parameters by their position, as torch does)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        scalars = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[k] = v
        per_param[str(idx)] = {
            "scalars": scalars,
            "tensors": sorted(k for k, v in st.items() if torch.is_tensor(v)),
        }
    return tensors, {"state": per_param, "param_groups": sd["param_groups"]}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Put `optimizer_state()` back; the optimiser must hold the same parameters in the same order."""
    groups = meta["param_groups"]
    have = [len(g["params"]) for g in optimizer.param_groups]
    want = [len(g["params"]) for g in groups]
    if have != want:
        raise ValueError(f"optimizer has parameter groups of sizes {have}; the checkpoint has {want}")
    state = {}
    for idx, entry in meta["state"].items():
        st = dict(entry["scalars"])
        st.update({k: tensors[f"{idx}.{k}"] for k in entry["tensors"]})
        state[int(idx)] = st
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _clock_counters(clock) -> dict[str, int]:
    return {k: v for k, v in vars(clock).items() if isinstance(v, int) and not isinstance(v, bool)}


def _schedule(strategy):
    from .build import TaskLRSchedule

    return next((p for p in strategy.plugins if isinstance(p, TaskLRSchedule)), None)


def mid_task_state(strategy) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Where `strategy` is inside the current experience, for a checkpoint written before a step.

    Call it at `before_training_iteration` ahead of every other plugin (as `cmtl run` does): the
    step about to run is the first the resumed run takes. Holds the optimiser, the clock, the
    learning-rate schedule position and the two RNG states that reproduce the data order
    (`ResumePoint` explains how).
    """

    clock = strategy.clock
    tensors, optim_meta = optimizer_state(strategy.optimizer)
    tensors = {f"optim.{k}": v for k, v in tensors.items()}
    epoch_rng, fetch_rng = strategy.epoch_rng, strategy.fetch_rng
    if epoch_rng is None:
        raise RuntimeError("mid_task_state() needs a strategy inside training_epoch")
    iteration = clock.train_epoch_iterations
    if iteration == 0:
        fetch_rng = epoch_rng
    tensors.update({f"epoch_{k}": v for k, v in epoch_rng[0].items()})
    tensors.update({f"fetch_{k}": v for k, v in fetch_rng[0].items()})
    schedule = _schedule(strategy)
    meta = {
        "task": strategy.experience.current_experience,
        "epoch": clock.train_exp_epochs,
        "iteration": iteration,
        "clock": _clock_counters(clock),
        "schedule_step": None if schedule is None else schedule.step,
        "optimizer": optim_meta,
        "epoch_rng": epoch_rng[1],
        "fetch_rng": fetch_rng[1],
    }
    return tensors, meta


class ResumePoint:
    """Continues an experience from `mid_task_state()` plus the model and plugin state saved with it.

    The strategy re-enters the experience normally (adapters and heads are added, the optimiser
    and data loader are built), then, after the hooks of the checkpointed epoch have run, this
    restores the model, the EMTAL state, the optimiser, the clock and the schedule. The data order
    is reproduced from two RNG states: the one at the start of the epoch (the loader's shuffling
    and worker seeds are drawn from it) and the one just before the checkpointed batch was fetched
    (its random augmentation is drawn from that). The batches before it are fetched and dropped.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        model_state: dict[str, torch.Tensor],
        emtal_state: dict | None,
    ):
        self.meta = meta
        self.epoch, self.iteration = int(meta["epoch"]), int(meta["iteration"])
        self.optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
        self.epoch_rng = {k[6:]: v for k, v in tensors.items() if k.startswith("epoch_rng.")}
        self.fetch_rng = {k[6:]: v for k, v in tensors.items() if k.startswith("fetch_rng.")}
        self.model_state, self.emtal_state = model_state, emtal_state

    def restore(self, strategy) -> None:
        """Called by the strategy after `before_training_epoch` of the checkpointed epoch."""
        from cmtl.checkpoint import CheckpointError

        from .emtal import _cmtl

        model = _cmtl(strategy.model)
        try:
            model.load_state_dict(self.model_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"mid-task checkpoint does not match the model: {str(e).splitlines()[0]}"
            ) from None
        if self.emtal_state is not None:
            from .build import find_emtal_plugin

            find_emtal_plugin(strategy).load_state_dict(self.emtal_state)
        load_optimizer_state(strategy.optimizer, self.optim, self.meta["optimizer"])
        for k, v in self.meta["clock"].items():
            setattr(strategy.clock, k, int(v))
        schedule = _schedule(strategy)
        if schedule is not None and self.meta["schedule_step"] is not None:
            schedule.step = int(self.meta["schedule_step"])

    def batches(self, loader):
        """An iterator over `loader` that starts at the checkpointed batch, with the RNG as it was."""
        import itertools

        from cmtl.checkpoint import set_rng_state

        set_rng_state(self.epoch_rng, self.meta["epoch_rng"])
        it = iter(loader)
        if self.iteration == 0:
            return it
        for _ in range(self.iteration):
            next(it)
        set_rng_state(self.fetch_rng, self.meta["fetch_rng"])
        return itertools.chain([next(it)], it)
