"""What each named strategy is, independent of Avalanche: which model, which losses, which buffer.

`strategy_spec(name, model_cfg, strategy_cfg)` is the one place that turns the YAML sections into
`AdapterConfig` / `EMTALConfig` / `QRConfig`; `cmtl.strategies.build_strategy` turns a spec into an
Avalanche strategy. Every baseline sees the same backbone, data, seed, optimiser and buffer budget.

| name              | model                               | extra                                   |
|-------------------|-------------------------------------|-----------------------------------------|
| `emtal`           | MoE LoRA per task, frozen backbone  | QR buffer (KL), fading, consolidation   |
| `emtal_no_qr`     | same                                | no QR                                   |
| `emtal_no_moe`    | plain LoRA per task (no experts)    | QR buffer                               |
| `emtal_no_fading` | same as emtal                       | routers on until the task ends          |
| `lora`            | plain LoRA per task, merged after   | nothing                                 |
| `frozen`          | the backbone as pre-trained         | only the heads train (linear probing)   |
| `naive`           | full fine-tuning                    | nothing                                 |
| `der`             | full fine-tuning                    | cmtl's buffer, MSE on stored logits     |
| `replay`          | full fine-tuning                    | Avalanche `ReplayPlugin`                |
| `lwf`             | full fine-tuning                    | Avalanche `LwFPlugin`                   |
| `ewc`             | full fine-tuning                    | Avalanche `EWCPlugin`                   |
| `joint`           | full fine-tuning                    | all tasks at once (upper bound)         |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from cmtl.config import ModelConfig, StrategyConfig
from cmtl.continual import EMTALConfig
from cmtl.model import AdapterConfig
from cmtl.qr import QRConfig
from cmtl.registry import Registry

STRATEGIES: Registry = Registry("strategy")


@dataclass
class StrategySpec:
    """A strategy as cmtl builds it.

    Attributes:
        name: registered name.
        adapter: adapters added per task; None trains without adapters.
        backbone_trainable: full fine-tuning of the backbone.
        emtal: the per-task procedure (heads, fading, QR, consolidation) the plugin runs.
        avalanche: an Avalanche component added on top: "replay", "lwf", "ewc", "joint" or None.
    """

    name: str
    adapter: AdapterConfig | None
    backbone_trainable: bool
    emtal: EMTALConfig
    avalanche: str | None = None


def adapter_config(mc: ModelConfig, moe: bool = True) -> AdapterConfig:
    """The adapter settings of the `model` section."""
    return AdapterConfig(
        num_experts=mc.num_experts,
        rank=mc.rank,
        alpha=mc.alpha,
        tau=mc.tau,
        attn_lora=mc.attn_lora,
        moe=moe,
        dropout=mc.lora_dropout,
    )


def qr_config(st: StrategyConfig, seed: int = 0, **changes) -> QRConfig:
    """The QR buffer settings of the `strategy` section."""
    cfg = QRConfig(
        budget=st.buffer_size,
        per_class=st.buffer_per_class,
        selection=st.buffer_selection,
        loss=st.qr_loss,
        temperature=st.qr_temperature,
        lambda_replay=st.qr_lambda,
        ce_weight=st.qr_ce_weight,
        weighting=st.qr_weighting,
        storage=st.buffer_storage,
        batch_size=st.replay_batch_size,
        in_task_weight=1.0 if st.qr_in_task else 0.0,
        max_weight=st.qr_in_task_max_weight,
        bank_update=st.qr_bank_update,
        refresh=st.qr_refresh,
        refresh_keep=st.qr_refresh_keep,
        distill_weight=st.qr_distill_weight,
        augment=st.qr_augment,
        seed=seed,
    )
    return dataclasses.replace(cfg, **changes)


def emtal_config(st: StrategyConfig, qr: QRConfig | None, fading: bool = True) -> EMTALConfig:
    """The per-task procedure of the `strategy` section."""
    return EMTALConfig(
        fading_start=st.fading_start,
        fading_end=st.fading_end,
        fading=fading,
        consolidate_every=st.consolidate_every,
        qr=qr,
        align_heads=st.weight_aligning,
        head_init=st.head_init,
        classifier_alignment=st.classifier_alignment,
        alignment_samples=st.alignment_samples,
        alignment_shrinkage=st.alignment_shrinkage,
        alignment_covariance=st.alignment_covariance,
        alignment_drift=st.alignment_drift,
        alignment_drift_map=st.alignment_drift_map,
        alignment_drift_ridge=st.alignment_drift_ridge,
        alignment_drift_task_samples=st.alignment_drift_task_samples,
        feature_distill=st.qr_feature_lambda if qr is not None else 0.0,
    )


def _full_finetuning(name: str, st: StrategyConfig, qr: QRConfig | None = None, extra: str | None = None):
    return StrategySpec(name, None, True, emtal_config(st, qr), extra)


@STRATEGIES.register("emtal")
def _emtal(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    return StrategySpec("emtal", adapter_config(mc), False, emtal_config(st, qr_config(st, seed)))


@STRATEGIES.register("emtal_no_qr")
def _emtal_no_qr(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    return StrategySpec("emtal_no_qr", adapter_config(mc), False, emtal_config(st, None))


@STRATEGIES.register("emtal_no_moe")
def _emtal_no_moe(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    return StrategySpec(
        "emtal_no_moe", adapter_config(mc, moe=False), False, emtal_config(st, qr_config(st, seed))
    )


@STRATEGIES.register("emtal_no_fading")
def _emtal_no_fading(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    cfg = emtal_config(st, qr_config(st, seed), fading=False)
    return StrategySpec("emtal_no_fading", adapter_config(mc), False, cfg)


@STRATEGIES.register("lora")
def _lora(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    cfg = dataclasses.replace(emtal_config(st, None, fading=False), consolidate_every=1)
    return StrategySpec("lora", adapter_config(mc, moe=False), False, cfg)


@STRATEGIES.register("frozen")
def _frozen(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    # The pre-trained features as they are, the reference every adaptation must beat: no adapter,
    # no buffer, only the task heads train (at `lr`); with head_init: probe each head starts as a
    # linear probe. In class-incremental mode every row trains on the new task's data alone, as in
    # naive, so old classes are forgotten there; it is a task-incremental reference
    return StrategySpec("frozen", None, False, emtal_config(st, None, fading=False))


@STRATEGIES.register("naive")
def _naive(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    return _full_finetuning("naive", st)


@STRATEGIES.register("der")
def _der(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    # Dark Experience Replay (DER++ with qr_ce_weight > 0): MSE to the logits stored with each buffer
    # sample, every sample alike and as stored; none of EMTAL's in-task term, refresh or weighting
    qr = qr_config(st, seed, loss="mse", in_task_weight=0.0, refresh=False, distill_weight="uniform")
    return _full_finetuning("der", st, qr)


@STRATEGIES.register("replay")
def _replay(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    return _full_finetuning("replay", st, extra="replay")


@STRATEGIES.register("lwf")
def _lwf(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    return _full_finetuning("lwf", st, extra="lwf")


@STRATEGIES.register("ewc")
def _ewc(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    return _full_finetuning("ewc", st, extra="ewc")


@STRATEGIES.register("joint")
def _joint(mc: ModelConfig, st: StrategyConfig, seed: int) -> StrategySpec:
    return _full_finetuning("joint", st, extra="joint")


def strategy_spec(name: str, mc: ModelConfig, st: StrategyConfig, seed: int = 0) -> StrategySpec:
    """The registered strategy `name` for these config sections (ValueError lists the valid names)."""
    builder: Callable[..., StrategySpec] = STRATEGIES.get(name)
    # the section's `per_strategy` entry for `name` (a strategy registered outside the config has none)
    return builder(mc, st.resolved(name) if st.per_strategy.get(name) else st, seed)


def list_strategies() -> list[str]:
    return STRATEGIES.names()
