"""Typed experiment configuration: dataclass defaults ⊕ YAML file ⊕ `--set a.b=c` overrides.

The dataclasses below are the single source of truth (PEFT's `LoraConfig`, DINOv2's default ⊕ file ⊕
command line, timm's saved `args.yaml`). Loading is strict: an unknown key, a value of the wrong type
or an impossible value raises `ConfigError` with one line naming the dotted key. Sections merge field
by field; free-form mappings (`model.kwargs`, `scenario.options`) and lists are values, replaced as a
whole by a file, while `--set model.kwargs.depth=2` edits inside them.

YAML is read with PyYAML's safe loader plus two fixes: `1e-3` is a float (YAML 1.2, not the string of
YAML 1.1) and a duplicated key is an error instead of silently keeping the last value.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from cmtl import optim
from cmtl.alignment import COVARIANCES, DRIFT_MAPS, DRIFT_RIDGE, SHRINKAGE
from cmtl.augment import AUGMENTS
from cmtl.heads import HEAD_INITS
from cmtl.losses import list_distill_losses
from cmtl.model import BASE_GROUPS
from cmtl.qr import BANK_UPDATES, DISTILL_WEIGHTS, REFRESH_KEEPS, SELECTIONS, STORAGES, WEIGHTINGS
from cmtl.registry import closest, did_you_mean

__all__ = [
    "STRATEGY_NAMES",
    "ConfigError",
    "ExperimentConfig",
    "LoggingConfig",
    "ModelConfig",
    "ScenarioConfig",
    "StrategyConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]

STRATEGY_NAMES: tuple[str, ...] = (
    "emtal",
    "emtal_no_qr",
    "emtal_no_moe",
    "emtal_no_fading",
    "naive",
    "lora",
    "frozen",
    "der",
    "replay",
    "lwf",
    "ewc",
    "joint",
)
MODES = ("til", "cil")
OPTIMIZERS = optim.OPTIMIZERS
SCHEDULERS = optim.SCHEDULES
BUFFER_SELECTIONS = SELECTIONS
QR_LOSSES = tuple(list_distill_losses())

_MAX_SEED = 2**32  # numpy's seed range
_MAX_DEPTH = 16  # nesting allowed inside free-form mappings
_MAX_NODES = 100_000  # values allowed inside one free-form mapping (alias bombs stay cheap)
_DEVICE_RE = re.compile(r"(auto|cpu|cuda(:\d+)?)")


class ConfigError(ValueError):
    """An invalid configuration: unknown key, wrong type, impossible value or unreadable file."""


# --------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe loader reading `1e-3` as a float and rejecting duplicated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Safe dumper that quotes strings `_Loader` would read as floats (e.g. "1e-3")."""


_FLOAT_NO_DOT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_NO_DOT, list("-+0123456789"))


def _yaml_error_line(err: BaseException) -> str:
    """A one-line description of a YAML parse error."""
    if isinstance(err, yaml.MarkedYAMLError):
        problem = err.problem or err.context or "invalid YAML"
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{problem}{where}"
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return " ".join(str(err).split()) or type(err).__name__


def _parse_yaml(text: str) -> Any:
    """Parse one YAML document; errors surface as `yaml.YAMLError` or `RecursionError`."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


# ------------------------------------------------------------------------------------ type checks


def _short(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to one short line."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # self-referencing YAML aliases, huge ints
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(tp: Any) -> str:
    """Readable name of a type annotation, e.g. `int | list[int] | None`."""
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _check_plain(value: Any, key: str, depth: int = 0, budget: list[int] | None = None) -> Any:
    """Check that `value` is plain YAML data (str, finite number, bool, null, list, str-keyed mapping).

    Returns a copy with tuples turned into lists, so saved configs read back equal.
    """
    budget = [_MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"config key {key!r} holds too many values (more than {_MAX_NODES})")
    if depth > _MAX_DEPTH:
        raise ConfigError(f"config key {key!r} is nested too deeply (more than {_MAX_DEPTH} levels)")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r} must be a finite number, got {_short(value)}")
        return value
    if isinstance(value, (list, tuple)):
        return [_check_plain(v, f"{key}[{i}]", depth + 1, budget) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"config key {key!r} has a non-string key {_short(k)}")
            out[k] = _check_plain(v, f"{key}.{k}", depth + 1, budget)
        return out
    raise ConfigError(
        f"config key {key!r} must hold plain YAML data (str, number, bool, null, list, mapping), "
        f"got {_short(value)} ({type(value).__name__})"
    )


class _Mismatch(Exception):
    """Internal: a value does not match an annotation."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp` (ints become floats, tuples lists) or raise `_Mismatch`."""
    if tp is Any:
        return _check_plain(value, key)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                as_float = float(value)
            except OverflowError as err:
                raise _Mismatch from err
            if math.isfinite(as_float):
                return as_float
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return _check_plain(value, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key!r}")  # a bug in this module


# ------------------------------------------------------------------------------------ value checks


def _fail(key: str, value: Any, requirement: str) -> None:
    raise ConfigError(f"config key {key!r} must be {requirement}, got {_short(value)}")


def _positive(section: _Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            _fail(section._key(name), value, "> 0")


def _non_negative(section: _Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 0:
            _fail(section._key(name), value, ">= 0")


def _one_of(section: _Section, name: str, options: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in options:
        hint = did_you_mean(value, list(options))
        raise ConfigError(
            f"config key {section._key(name)!r} is {_short(value)}{hint}; valid: {', '.join(options)}"
        )


def _seed(section: _Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and not 0 <= value < _MAX_SEED:
            _fail(section._key(name), value, "in [0, 2**32)")


def _no_glued_keys(section: _Section, name: str) -> None:
    """Catch `{img_size:16}`: YAML reads it as the key 'img_size:16' with no value."""
    for key, value in (getattr(section, name) or {}).items():
        if value is None and isinstance(key, str) and ":" in key:
            k, _, v = key.partition(":")
            raise ConfigError(
                f"config key {section._key(name)!r} has the entry {key!r} with no value; "
                f"write '{k}: {v}' (YAML needs a space after ':')"
            )


def _non_empty(section: _Section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and not value.strip():
            _fail(section._key(name), value, "a non-empty string")


# ---------------------------------------------------------------------------------------- sections


@dataclass
class _Section:
    """Base of every config section: checks types and values whenever one is built."""

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def _key(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def validate(self) -> None:
        """Check (and normalise: ints to floats, tuples to lists) every field; raise `ConfigError`."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise ConfigError(
                        f"config key {self._key(f.name)!r} must be a {tp.__name__}, got {_short(value)}"
                    )
                value.validate()
                continue
            try:
                setattr(self, f.name, _coerce(value, tp, self._key(f.name)))
            except _Mismatch:
                raise ConfigError(
                    f"config key {self._key(f.name)!r} expects {_type_name(tp)}, "
                    f"got {_short(value)} ({type(value).__name__})"
                ) from None
        self._check_values()

    def _check_values(self) -> None:
        """Section-specific checks of impossible values."""


@dataclass
class ModelConfig(_Section):
    """The backbone (a timm ViT) and the MoEfied LoRA adapters added for every task.

    Attributes:
        name: timm model name for `timm.create_model`.
        pretrained: Load timm's pre-trained weights (needs the weights cached or internet).
        checkpoint: Local weights (.safetensors, .pth or .npz) loaded after building; None for none.
        kwargs: Extra `timm.create_model` keyword arguments (img_size, patch_size, depth, ...).
        num_experts: Experts each MLP is split into (must divide the MLP hidden width).
        rank: LoRA rank of every expert (and of the attention LoRA).
        alpha: LoRA scaling numerator (scaling = alpha / rank); None means `rank` (scaling 1).
        tau: Router softmax temperature.
        attn_lora: Also add plain LoRA on attention `qkv` and `proj`.
        lora_dropout: Dropout on the LoRA input.
        moefy_seed: Seed of the balanced k-means that splits the MLP neurons into experts.
        mean: Input normalisation mean; None takes it from the timm pre-trained config.
        std: Input normalisation std; None takes it from the timm pre-trained config.
    """

    _section: ClassVar[str] = "model"

    name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(
        default_factory=lambda: {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}
    )
    num_experts: int = 8
    rank: int = 4
    alpha: float | None = None
    tau: float = 5.0
    attn_lora: bool = True
    lora_dropout: float = 0.0
    moefy_seed: int = 0
    mean: list[float] | None = None
    std: list[float] | None = None

    def _check_values(self) -> None:
        _non_empty(self, "name", "checkpoint")
        _no_glued_keys(self, "kwargs")
        _positive(self, "num_experts", "rank", "alpha", "tau")
        if not 0.0 <= self.lora_dropout < 1.0:
            _fail(self._key("lora_dropout"), self.lora_dropout, "in [0, 1)")
        _seed(self, "moefy_seed")
        for name in ("mean", "std"):
            if getattr(self, name) == []:
                _fail(self._key(name), [], "a non-empty list or null")
        if self.std is not None and any(s <= 0 for s in self.std):
            _fail(self._key("std"), self.std, "all > 0")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ConfigError(
                f"config keys 'model.mean' and 'model.std' must have the same length, "
                f"got {len(self.mean)} and {len(self.std)}"
            )


@dataclass
class ScenarioConfig(_Section):
    """The task stream.

    Attributes:
        name: Scenario builder (digits, npz, image_folder, torchvision, multi_dataset, ...).
        mode: "til" (task-incremental: task ids pick a head) or "cil" (class-incremental).
        n_tasks: Number of tasks; None lets the builder decide (e.g. one task per dataset).
        classes_per_task: Classes in every task (int) or in each task (list); None splits evenly.
        class_order_seed: Seed shuffling the class order; None keeps the natural order.
        max_per_class: Training images kept per class; None keeps all.
        max_test_per_class: Test images kept per class; None keeps all.
        validation_per_class: Hold out this many training images per class and evaluate on them
            instead of the test split, to choose settings without looking at test data; None
            evaluates on the test split. Results record which (`evaluated_on`).
        image_size: Input resolution; None takes the model's.
        augment: Random-resized-crop style augmentation while training.
        flip: Random horizontal flips while training; None uses the dataset's own default
            (off for digits, MNIST and SVHN, on elsewhere).
        options: Builder-specific options (path, root, download, datasets, test_fraction, ...).
    """

    _section: ClassVar[str] = "scenario"

    name: str = "digits"
    mode: str = "til"
    n_tasks: int | None = 5
    classes_per_task: int | list[int] | None = None
    class_order_seed: int | None = None
    max_per_class: int | None = None
    max_test_per_class: int | None = None
    validation_per_class: int | None = None
    image_size: int | None = None
    augment: bool = True
    flip: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def _check_values(self) -> None:
        _non_empty(self, "name")
        _no_glued_keys(self, "options")
        _one_of(self, "mode", MODES)
        _positive(
            self, "n_tasks", "max_per_class", "max_test_per_class", "validation_per_class", "image_size"
        )
        _seed(self, "class_order_seed")
        cpt = self.classes_per_task
        if isinstance(cpt, int) and cpt <= 0:
            _fail(self._key("classes_per_task"), cpt, "> 0")
        if isinstance(cpt, list):
            if not cpt or any(c <= 0 for c in cpt):
                _fail(self._key("classes_per_task"), cpt, "a non-empty list of counts > 0")
            if self.n_tasks is not None and len(cpt) != self.n_tasks:
                raise ConfigError(
                    f"config key 'scenario.classes_per_task' lists {len(cpt)} tasks but "
                    f"'scenario.n_tasks' is {self.n_tasks}"
                )


@dataclass
class StrategyConfig(_Section):
    """Training: the continual-learning strategy, optimisation, fading, buffer and distillation.

    Attributes:
        name: Strategy (one of `STRATEGY_NAMES`).
        epochs: Epochs per task.
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size.
        optimizer: "adamw", "adam" or "sgd".
        lr: Peak learning rate.
        backbone_lr: Peak learning rate of the pre-trained weights wherever they are trained: all of
            them in the full fine-tuning strategies (naive, der, replay, lwf, ewc, joint), the
            `tune_base` groups in the others; None uses `lr`.
        tune_base: Groups of pre-trained weights the adapter strategies (and `frozen`) train
            directly at `backbone_lr`, next to the adapters: "embed" (patch and position
            embeddings, class token), "norms" (every LayerNorm), "attn" (every block's attention
            `qkv` and `proj`), "mlp" (every block's MLP `fc1` and `fc2`, which the experts are cut
            from); all four train every pre-trained weight. Consolidated models keep plain timm's
            modules and cost. Empty (the default): only adapters and heads are trained.
        head_lr: Peak learning rate of the classifier heads, for every strategy; None: the same as
            the rest of the strategy's parameters (`lr`, or `backbone_lr` for full fine-tuning).
        weight_decay: Weight decay.
        momentum: SGD momentum (ignored by Adam/AdamW).
        scheduler: "cosine" (per task, after warm-up) or "none".
        warmup_epochs: Linear warm-up epochs at the start of every task.
        consolidate_every: Fade and merge the open adapters every this many tasks (and at the end).
        fading_start: Fraction of a task's steps at which the router weight `a` starts falling from 1.
        fading_end: Fraction of a task's steps at which `a` reaches 0.
        buffer_size: Samples kept in the QR / replay buffer over all tasks.
        buffer_per_class: Cap per class of the QR buffer (emtal, der); None divides `buffer_size`
            over the classes seen. `replay`'s memory balances over tasks and refuses a cap.
        buffer_selection: "balanced" (class-balanced, highest-quality samples first), "random"
            (class-balanced, random within each class) or "reservoir" (random over the stream).
        replay_batch_size: Buffer samples replayed per training step (QR buffer of EMTAL and der,
            Avalanche's replay); None: as many as the training batch.
        buffer_storage: "float32" or "uint8": QR buffer images quantised per sample (4x smaller, in
            memory and in checkpoints), for the strategies with cmtl's buffer (EMTAL, der).
        qr_loss: Distance to the stored logits: "kl" (with temperature) or "mse".
        qr_temperature: KL temperature.
        qr_lambda: Weight of the QR term on buffer batches.
        qr_ce_weight: Weight of cross-entropy on buffer batches (0: distillation only).
        qr_feature_lambda: Weight of a term that holds buffer samples' features (pre-logits) where
            they were as the task started (mean squared difference); 0: off.
        qr_weighting: "fixed" (qr_lambda and qr_ce_weight as given) or "classes" (both multiplied by
            classes in the buffer / classes of the current task, so every class seen weighs the same).
        qr_in_task: Also apply EMTAL's in-task QR (pull toward the class's high-quality logits).
            Its weight is 1 / the task's running cross-entropy, so with `head_init: probe` (low
            cross-entropy from the first step) it starts near `qr_in_task_max_weight` and can outweigh
            the task's own loss: the class-incremental dev configs turn it off (benchmarks/RESULTS.md).
        qr_in_task_max_weight: Cap of the in-task QR weight, which is 1 / the task's running
            cross-entropy (so it grows as the task is learned).
        qr_bank_update: How the in-task target of a class follows training: "ema" (moving average
            of its correctly classified logits) or "best" (the highest-margin batch mean so far).
        qr_refresh: After every task, re-evaluate the QR buffer and keep each sample's logits where
            the model's are now of higher quality (best logits over the stream, not only over the
            sample's own task). EMTAL and its ablations only; DER keeps its logits as stored.
        qr_refresh_keep: What `qr_refresh` keeps: "best" (a record is replaced only by logits of higher
            quality) or "latest" (every record by the model's logits after the task, classifier
            alignment included; class-incremental records then cover every class seen).
        qr_distill_weight: Per-sample weight of the distillation on buffer batches: "uniform",
            "correct" (only samples whose stored logits are right) or "confidence" (their stored
            probability of the true class).
        qr_augment: What replayed QR buffer images go through (emtal, its ablations, der): "none"
            (as stored: un-augmented), "crop" (a random resized crop per sample, 80-100% of the
            area, as the scenarios' train transform) or "crop_flip" (and a random horizontal flip;
            not for digits). Avalanche's `replay` memory goes through the data set's transforms.
        weight_aligning: Class-incremental: after every task rescale the newest classes' head rows to
            the mean norm of the older ones (WA, Zhao et al. 2020), for every strategy but joint.
        head_init: "random", "prototype" (each new task's head starts as the nearest-class-mean
            classifier of its training images' features) or "probe" (as a logistic regression
            fitted to them: linear probing, then fine-tuning), for every strategy. Joint fits its
            heads before training: each task's own (task-incremental) or one classifier over all
            classes (class-incremental). A class-incremental probe is fitted against the replay
            memory's old classes too, where the strategy has one (emtal, der, replay).
        classifier_alignment: Class-incremental: keep every class's feature mean and covariance from
            the end of its task and, after every task, re-fit the whole head on samples of all
            classes' Gaussians, as many per class (SLCA's classifier alignment, Zhang et al. 2023),
            for every strategy but joint.
        alignment_samples: Features sampled per class for that re-fit (memory: samples x classes
            seen x features x 4 bytes while it runs; 4096 x 200 classes x 768 features is 2.5 GB).
        alignment_shrinkage: How far each class covariance is pulled toward its mean variance,
            in (0, 1]: a class's covariance from fewer images than features is singular without it,
            and too much of it blurs the classes into each other.
        alignment_covariance: What the statistics keep of a class's spread: "full" (its own
            covariance, features^2 numbers per class) or "shared" (one covariance pooled over all
            classes, stored once).
        alignment_drift: Before that re-fit, move the old classes' statistics by how their
            replay-memory samples' features moved over the task (drift compensation on the memory).
        alignment_drift_map: How: "linear" fits one linear map to all memory samples' features
            before and after the task, which moves every class's covariance as well as its mean
            (each mean by its own samples' change plus the map of its offset from them); "shift"
            moves each class's mean by its own memory samples' mean change alone.
        alignment_drift_ridge: The linear map's pull toward the identity (> 0), in units of the
            memory features' mean variance.
        alignment_drift_task_samples: Fit that linear map on up to this many of the new task's
            training images per class too (their features at the task's start and end; one more
            pass over them at the start); 0: on the memory alone.
        lwf_alpha: LwF distillation weight.
        lwf_temperature: LwF temperature.
        ewc_lambda: EWC penalty weight.
        num_workers: DataLoader workers.
        checkpoint_every_epochs: Also checkpoint inside a task every this many epochs (None: only after
            every task, and on SIGINT/SIGTERM).
        per_strategy: Settings of this section that only one strategy uses, by strategy name, e.g.
            `{der: {buffer_selection: balanced, qr_ce_weight: 0}}`: when `der` runs (as `name`, or
            in `cmtl compare`) those keys replace the section's own. One config can so hold every
            strategy at its tuned settings while they share the stream, model and budget.
    """

    _section: ClassVar[str] = "strategy"

    name: str = "emtal"
    epochs: int = 4
    batch_size: int = 32
    eval_batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr: float | None = None
    tune_base: list[str] = field(default_factory=list)
    head_lr: float | None = None
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    consolidate_every: int = 1
    fading_start: float = 0.0
    fading_end: float = 0.55
    buffer_size: int = 200
    buffer_per_class: int | None = None
    buffer_selection: str = "balanced"
    replay_batch_size: int | None = None
    buffer_storage: str = "float32"
    qr_loss: str = "kl"
    qr_temperature: float = 2.0
    qr_lambda: float = 1.0
    qr_ce_weight: float = 0.0
    qr_feature_lambda: float = 0.0
    qr_weighting: str = "fixed"
    qr_in_task: bool = True
    qr_in_task_max_weight: float = 10.0
    qr_bank_update: str = "ema"
    qr_refresh: bool = False
    qr_refresh_keep: str = "best"
    qr_distill_weight: str = "uniform"
    qr_augment: str = "none"
    weight_aligning: bool = False
    head_init: str = "random"
    classifier_alignment: bool = False
    alignment_samples: int = 256
    alignment_shrinkage: float = SHRINKAGE
    alignment_covariance: str = "full"
    alignment_drift: bool = False
    alignment_drift_map: str = "linear"
    alignment_drift_ridge: float = DRIFT_RIDGE
    alignment_drift_task_samples: int = 0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    ewc_lambda: float = 100.0
    num_workers: int = 0
    checkpoint_every_epochs: int | None = None
    per_strategy: dict[str, Any] = field(default_factory=dict)

    def resolved(self, name: str | None = None) -> StrategyConfig:
        """This section as strategy `name` (default: `self.name`) runs: its `per_strategy` entry applied.

        Raises:
            ConfigError: On an unknown strategy name (the entries are checked when the section is built).
        """
        name = self.name if name is None else name
        if name not in STRATEGY_NAMES:
            hint = did_you_mean(str(name), list(STRATEGY_NAMES))
            raise ConfigError(f"unknown strategy {_short(name)}{hint}; valid: {', '.join(STRATEGY_NAMES)}")
        changes = self.per_strategy.get(name) or {}
        if name == self.name and not changes:
            return self
        return dataclasses.replace(self, name=name, **changes)

    def _check_per_strategy(self) -> None:
        fields = [f.name for f in dataclasses.fields(self) if f.name not in ("name", "per_strategy")]
        for name, changes in self.per_strategy.items():
            key = f"{self._key('per_strategy')}.{name}"
            if name not in STRATEGY_NAMES:
                hint = did_you_mean(str(name), list(STRATEGY_NAMES))
                raise ConfigError(
                    f"config key {key!r} names no strategy{hint}; valid: {', '.join(STRATEGY_NAMES)}"
                )
            if changes is None:
                continue
            if not isinstance(changes, dict):
                _fail(key, changes, "a mapping of strategy keys to values")
            for k in changes:
                if k not in fields:
                    hint = did_you_mean(str(k), fields)
                    raise ConfigError(
                        f"unknown config key {_short(f'{key}.{k}', 80)}{hint}; valid: the keys of "
                        "'strategy' but name and per_strategy"
                    )
            try:
                dataclasses.replace(self, name=name, per_strategy={}, **changes)
            except ConfigError as err:
                raise ConfigError(f"in {key!r}: {err}") from None

    def _check_values(self) -> None:
        _one_of(self, "name", STRATEGY_NAMES)
        self._check_per_strategy()
        _one_of(self, "optimizer", OPTIMIZERS)
        _one_of(self, "scheduler", SCHEDULERS)
        _one_of(self, "buffer_selection", BUFFER_SELECTIONS)
        _one_of(self, "buffer_storage", STORAGES)
        _one_of(self, "qr_loss", QR_LOSSES)
        _one_of(self, "qr_weighting", WEIGHTINGS)
        _one_of(self, "qr_bank_update", BANK_UPDATES)
        _one_of(self, "qr_distill_weight", DISTILL_WEIGHTS)
        _one_of(self, "qr_refresh_keep", REFRESH_KEEPS)
        _one_of(self, "qr_augment", AUGMENTS)
        _one_of(self, "head_init", HEAD_INITS)
        _one_of(self, "alignment_covariance", COVARIANCES)
        _one_of(self, "alignment_drift_map", DRIFT_MAPS)
        for i, group in enumerate(self.tune_base):
            if group not in BASE_GROUPS:
                raise ConfigError(
                    f"config key {self._key('tune_base') + f'[{i}]'!r} is {_short(group)}"
                    f"{did_you_mean(group, list(BASE_GROUPS))}; valid: {', '.join(BASE_GROUPS)}"
                )
        _positive(self, "epochs", "batch_size", "eval_batch_size", "lr", "backbone_lr", "head_lr")
        _positive(self, "qr_temperature")
        _positive(self, "lwf_temperature", "buffer_per_class", "checkpoint_every_epochs", "replay_batch_size")
        _positive(self, "qr_in_task_max_weight", "alignment_samples", "alignment_drift_ridge")
        _non_negative(self, "weight_decay", "warmup_epochs", "buffer_size", "num_workers")
        _non_negative(self, "qr_lambda", "qr_ce_weight", "qr_feature_lambda", "lwf_alpha", "ewc_lambda")
        _non_negative(self, "alignment_drift_task_samples")
        if self.alignment_drift_task_samples and self.alignment_drift_map != "linear":
            raise ConfigError(
                f"config key {self._key('alignment_drift_task_samples')!r} is "
                f"{self.alignment_drift_task_samples}, which needs 'strategy.alignment_drift_map' "
                f"linear (it is {self.alignment_drift_map!r}); valid: 0, or a linear drift map"
            )
        if self.name == "replay" and self.buffer_per_class is not None:
            # Avalanche's memory keeps buffer_size samples balanced over experiences, not classes:
            # a cap it would ignore must not look like one it keeps
            raise ConfigError(
                f"config key {self._key('buffer_per_class')!r} is {self.buffer_per_class}, which replay "
                "does not honour (its memory balances buffer_size over tasks); valid for replay: null"
            )
        if not 0.0 <= self.momentum < 1.0:
            _fail(self._key("momentum"), self.momentum, "in [0, 1)")
        if self.warmup_epochs > self.epochs:
            _fail(self._key("warmup_epochs"), self.warmup_epochs, f"<= strategy.epochs ({self.epochs})")
        if self.consolidate_every < 1:
            _fail(self._key("consolidate_every"), self.consolidate_every, ">= 1")
        for name in ("fading_start", "fading_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(self._key(name), getattr(self, name), "in [0, 1]")
        if not 0.0 < self.alignment_shrinkage <= 1.0:
            _fail(self._key("alignment_shrinkage"), self.alignment_shrinkage, "in (0, 1]")
        if self.fading_start > self.fading_end:
            raise ConfigError(
                f"config key 'strategy.fading_start' ({self.fading_start}) must be <= "
                f"'strategy.fading_end' ({self.fading_end})"
            )


@dataclass
class LoggingConfig(_Section):
    """What a run reports.

    Attributes:
        progress: Progress bars on the terminal.
        csv: Write `metrics.csv`.
        tensorboard: Write TensorBoard event files.
        plots: Write `accuracy_matrix.png` and other plots.
    """

    _section: ClassVar[str] = "logging"

    progress: bool = True
    csv: bool = True
    tensorboard: bool = False
    plots: bool = True


@dataclass
class ExperimentConfig(_Section):
    """A whole experiment; the run directory is `out/name`.

    Attributes:
        name: Run name (a single directory name).
        seed: Global random seed.
        out: Parent directory of run directories.
        device: "auto", "cpu", "cuda" or "cuda:N".
        model: Backbone and adapters.
        scenario: Task stream.
        strategy: Training.
        logging: Reporting.
    """

    name: str = "default"
    seed: int = 0
    out: str = "runs"
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def _check_values(self) -> None:
        _non_empty(self, "name", "out")
        if self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            _fail("name", self.name, "a single directory name (no '/', '\\', '.' or '..')")
        if "\0" in self.out:
            _fail("out", self.out, "a path without NUL characters")
        _seed(self, "seed")
        if not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"config key 'device' is {_short(self.device)}; valid: auto, cpu, cuda, cuda:N")


_SECTIONS: dict[str, type[_Section]] = {
    name: tp for name, tp in typing.get_type_hints(ExperimentConfig).items() if dataclasses.is_dataclass(tp)
}
_FREE_FORM = {
    (section, f.name)
    for section, cls in _SECTIONS.items()
    for f in dataclasses.fields(cls)
    if typing.get_origin(typing.get_type_hints(cls)[f.name]) is dict
}


# ------------------------------------------------------------------------------------- conversion


def _all_keys() -> list[str]:
    """Every valid dotted key, e.g. `strategy.lr`."""
    keys = []
    for f in dataclasses.fields(ExperimentConfig):
        if f.name in _SECTIONS:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(_SECTIONS[f.name])]
        else:
            keys.append(f.name)
    return keys


def _unknown_key(key: Any, prefix: str, valid: list[str]) -> ConfigError:
    """The error for an unknown `key` inside section `prefix`, suggesting the nearest valid key."""
    if not isinstance(key, str):
        where = f"in {prefix!r}" if prefix else "at top level"
        return ConfigError(f"config key {_short(key)} {where} must be a string")
    full = f"{prefix}.{key}" if prefix else key
    near = closest(key, valid)
    if near is not None:
        near = f"{prefix}.{near}" if prefix else near
    else:  # a key put in the wrong section, e.g. top-level `lr` for `strategy.lr`
        every = _all_keys()
        near = next((k for k in every if k.rsplit(".", 1)[-1] == key), None) or closest(full, every)
        if near is None:
            leaf = closest(key, [k.rsplit(".", 1)[-1] for k in every])
            near = next((k for k in every if leaf and k.rsplit(".", 1)[-1] == leaf), None)
    hint = f" (did you mean {near!r}?)" if near else ""
    return ConfigError(f"unknown config key {_short(full, 80)}{hint}")


def _build(cls: type[_Section], data: dict[Any, Any], prefix: str) -> Any:
    """Build section `cls` from a mapping, rejecting unknown keys."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(key, prefix, names)
    return cls(**data)


def _merge(base: dict[str, Any], update: Any, source: str) -> dict[str, Any]:
    """`base` ⊕ `update`: sections merge field by field, everything else is replaced."""
    if update is None:  # an empty file: nothing to change
        return base
    if not isinstance(update, dict):
        raise ConfigError(f"{source} must be a mapping at top level, got {_short(update)}")
    merged = dict(base)
    for key, value in update.items():
        if key in _SECTIONS and isinstance(value, dict):
            merged[key] = {**base[key], **value}
        elif key in _SECTIONS and value is None:  # `model:` with nothing below
            continue
        else:
            merged[key] = value
    return merged


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as plain nested dicts and lists (a deep copy)."""
    return copy.deepcopy(dataclasses.asdict(cfg))


def config_from_dict(data: dict[str, Any] | None) -> ExperimentConfig:
    """Defaults ⊕ `data` (a possibly partial nested mapping), checked strictly.

    Raises:
        ConfigError: On an unknown key, a wrong type or an impossible value.
    """
    merged = _merge(config_to_dict(ExperimentConfig()), data, "the config")
    return _from_full_dict(merged)


def _from_full_dict(data: dict[Any, Any]) -> ExperimentConfig:
    top = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for key in data:
        if key not in top:
            raise _unknown_key(key, "", top)
    kwargs = dict(data)
    for name, cls in _SECTIONS.items():
        value = kwargs.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} must be a mapping, got {_short(value)}")
        kwargs[name] = _build(cls, value, name)
    return ExperimentConfig(**kwargs)


def _parse_override(text: Any) -> tuple[list[str], Any]:
    """Split `a.b=c` into (["a", "b"], parsed c)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {_short(text)} must look like key=value (e.g. strategy.lr=3e-4)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {_short(text)} has an empty key part; expected e.g. strategy.lr=3e-4")
    try:
        value = _parse_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"override {_short(text)}: cannot parse value: {_yaml_error_line(err)}") from None
    return parts, value


def _set_path(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set `data[parts[0]][parts[1]]... = value`, creating mappings inside free-form fields."""
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            where = ".".join(parts[:depth])
            raise ConfigError(f"override {_short(text)}: {where!r} is not a mapping")
        if part not in node:
            inside_free_form = depth >= 1 and (parts[0], parts[1]) in _FREE_FORM
            if not inside_free_form:
                valid = list(node) if depth else [f.name for f in dataclasses.fields(ExperimentConfig)]
                raise _unknown_key(part, ".".join(parts[:depth]), valid)
            node[part] = {}
        elif node[part] is None and depth >= 1 and (parts[0], parts[1]) in _FREE_FORM:
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        where = ".".join(parts[:-1])
        raise ConfigError(f"override {_short(text)}: {where!r} is not a mapping")
    if len(parts) == 1 and parts[0] in _SECTIONS and isinstance(value, dict):
        node[parts[0]] = {**node[parts[0]], **value}
    else:
        node[parts[-1]] = value


def _apply_overrides_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] | str) -> None:
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        parts, value = _parse_override(text)
        _set_path(data, parts, value, text)


def apply_overrides(cfg: ExperimentConfig, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """A new config: `cfg` with `key=value` overrides applied (values parsed as YAML).

    Raises:
        ConfigError: On a malformed override or an invalid result.
    """
    data = config_to_dict(cfg)
    _apply_overrides_dict(data, overrides)
    return _from_full_dict(data)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Defaults ⊕ the YAML file at `path` (if any) ⊕ `overrides` such as `strategy.lr=3e-4`.

    Args:
        path: A YAML file; None for the defaults alone. An empty file means the defaults.
        overrides: `dotted.key=value` strings applied last; values are parsed as YAML, and keys may
            reach into free-form mappings (`model.kwargs.depth=2`, `scenario.options.root=data`).

    Raises:
        ConfigError: On an unreadable file, invalid YAML, an unknown key, a wrong type or an
            impossible value; the message is one line.
    """
    data = config_to_dict(ExperimentConfig())
    if path is not None:
        source = f"config file {str(path)!r}"
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source} not found") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{source} is not UTF-8 text (byte {err.start})") from None
        except (OSError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise ConfigError(f"cannot read {source}: {reason}") from None
        try:
            loaded = _parse_yaml(text)
        except (yaml.YAMLError, RecursionError) as err:
            raise ConfigError(f"cannot parse {source}: {_yaml_error_line(err)}") from None
        data = _merge(data, loaded, source)
    _apply_overrides_dict(data, overrides)
    return _from_full_dict(data)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML; `load_config(path) == cfg` afterwards."""
    text = yaml.dump(
        config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )
    Path(path).write_text("# resolved cmtl config\n" + text, encoding="utf-8")
