"""Typed configuration: defaults ⊕ file ⊕ overrides, strict errors, round trips, every shipped config."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import yaml

from cmtl.config import (
    STRATEGY_NAMES,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    StrategyConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_defaults():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert (cfg.name, cfg.seed, cfg.out, cfg.device) == ("default", 0, "runs", "auto")
    assert cfg.model.name == "vit_tiny_patch16_224" and cfg.model.kwargs["img_size"] == 32
    assert cfg.model.num_experts == 8 and cfg.model.rank == 4 and cfg.model.alpha is None
    assert cfg.scenario.name == "digits" and cfg.scenario.mode == "til" and cfg.scenario.n_tasks == 5
    assert cfg.strategy.name == "emtal" and cfg.strategy.optimizer == "adamw"
    assert (cfg.strategy.fading_start, cfg.strategy.fading_end) == (0.0, 0.55)
    assert cfg.strategy.name in STRATEGY_NAMES


def test_default_instances_do_not_share_mutable_fields():
    a, b = ExperimentConfig(), ExperimentConfig()
    a.model.kwargs["depth"] = 1
    assert b.model.kwargs["depth"] == 4


def test_default_yaml_equals_dataclass_defaults():
    assert load_config(ROOT / "configs" / "default.yaml") == load_config(None)


def test_default_yaml_lists_every_field():
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert set(data) == set(config_to_dict(ExperimentConfig()))
    for section, values in config_to_dict(ExperimentConfig()).items():
        if isinstance(values, dict) and section != "name":
            assert set(data[section]) == set(values), section


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    if path.name != "default.yaml":
        assert cfg.name == path.stem


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_keep_frozen_on_the_pretrained_backbone(path):
    # `frozen` is the reference for what feature learning adds: a config whose adapter strategies
    # train pre-trained weights (`tune_base`) must exempt it through `per_strategy`
    assert load_config(path).strategy.resolved("frozen").tune_base == []


def test_dev_configs_use_shared_backbone():
    for stem in ("dev_fashion_mnist_til", "dev_fashion_mnist_cil", "dev_mnist_fashion"):
        cfg = load_config(ROOT / "configs" / f"{stem}.yaml")
        assert cfg.model.checkpoint == "../shared/data/vit_tiny_c10.safetensors"
        assert cfg.model.kwargs["embed_dim"] == 192 and cfg.model.kwargs["depth"] == 6
        assert cfg.model.mean == [0.4914, 0.4822, 0.4465]
        assert cfg.scenario.max_per_class == 500
    assert load_config(ROOT / "configs" / "dev_fashion_mnist_cil.yaml").scenario.mode == "cil"


def test_file_then_overrides_precedence(tmp_path):
    path = _write(
        tmp_path,
        "name: exp\nstrategy: {lr: 0.01, epochs: 2}\nmodel:\n  kwargs: {img_size: 64, patch_size: 8}\n",
    )
    cfg = load_config(path)
    assert cfg.name == "exp" and cfg.strategy.lr == 0.01 and cfg.strategy.epochs == 2
    assert cfg.strategy.batch_size == 32  # untouched fields keep the default
    assert cfg.model.kwargs == {"img_size": 64, "patch_size": 8}  # free-form mappings are replaced

    cfg = load_config(
        path,
        [
            "strategy.lr=3e-4",
            "model.kwargs.depth=2",
            "scenario.classes_per_task=[2,3]",
            "scenario.n_tasks=2",
            "scenario.options.root=data/x",
            "scenario.options.sub.key=1",
            "logging={csv: false}",
            "name=later",
            "name=last",
        ],
    )
    assert cfg.strategy.lr == 3e-4 and isinstance(cfg.strategy.lr, float)
    assert cfg.strategy.epochs == 2
    assert cfg.model.kwargs == {"img_size": 64, "patch_size": 8, "depth": 2}
    assert cfg.scenario.classes_per_task == [2, 3]
    assert cfg.scenario.options == {"root": "data/x", "sub": {"key": 1}}
    assert cfg.logging.csv is False and cfg.logging.plots is True
    assert cfg.name == "last"


def test_yaml_floats_without_dot_and_ints_for_floats(tmp_path):
    cfg = load_config(_write(tmp_path, "strategy: {lr: 5e-4, weight_decay: 0, qr_lambda: 2}\n"))
    assert cfg.strategy.lr == 5e-4
    assert cfg.strategy.weight_decay == 0.0 and isinstance(cfg.strategy.weight_decay, float)
    assert cfg.strategy.qr_lambda == 2.0 and isinstance(cfg.strategy.qr_lambda, float)


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing\n")) == ExperimentConfig()
    assert load_config(_write(tmp_path, "model:\n", "d.yaml")) == ExperimentConfig()


_ALIAS_BOMB = "scenario:\n  options:\n    a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"    {n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)

BAD_FILES = [
    # unknown keys, with the nearest valid key
    ("nmae: x\n", "unknown config key 'nmae' (did you mean 'name'?)"),
    ("strategy: {lrr: 0.1}\n", "unknown config key 'strategy.lrr' (did you mean 'strategy.lr'?)"),
    ("model: {num_expert: 4}\n", "unknown config key 'model.num_experts"[:-1]),
    ("model: {num_expert: 4}\n", "did you mean 'model.num_experts'?"),
    ("lr: 0.1\n", "unknown config key 'lr' (did you mean 'strategy.lr'?)"),
    ("model: {epochs: 3}\n", "unknown config key 'model.epochs' (did you mean 'strategy.epochs'?)"),
    ("modle: {rank: 3}\n", "did you mean 'model'?"),
    ("zzzzzz: 1\n", "unknown config key 'zzzzzz'"),
    ("1: 2\n", "config key 1 at top level must be a string"),
    # wrong types
    ("strategy: {epochs: three}\n", "config key 'strategy.epochs' expects int, got 'three' (str)"),
    ("strategy: {epochs: [3]}\n", "config key 'strategy.epochs' expects int, got [3] (list)"),
    ("strategy: {epochs: true}\n", "'strategy.epochs' expects int, got True (bool)"),
    ("strategy: {epochs: 3.0}\n", "'strategy.epochs' expects int, got 3.0 (float)"),
    ("strategy: {lr: fast}\n", "'strategy.lr' expects float, got 'fast'"),
    ("strategy: {lr: .inf}\n", "'strategy.lr' expects float"),
    ("strategy: {lr: 1.0e+999}\n", "'strategy.lr' expects float"),
    ("strategy: {lr: 1" + "0" * 400 + "}\n", "'strategy.lr' expects float"),
    ("logging: {csv: 1}\n", "'logging.csv' expects bool, got 1 (int)"),
    ("name: 3\n", "'name' expects str, got 3 (int)"),
    ("model: {alpha: x}\n", "'model.alpha' expects float | None"),
    ("model: {mean: [0.5, a, 0.5]}\n", "'model.mean' expects list[float] | None"),
    ("model: {kwargs: [1, 2]}\n", "'model.kwargs' expects mapping"),
    ("model: {kwargs: {1: 2}}\n", "'model.kwargs' has a non-string key 1"),
    ("scenario: {options: {when: 2024-01-01}}\n", "'scenario.options.when' must hold plain YAML data"),
    ("scenario: {classes_per_task: [2, true]}\n", "'scenario.classes_per_task' expects int | list[int]"),
    ("model: 3\n", "config key 'model' must be a mapping, got 3"),
    ("strategy: [lr]\n", "config key 'strategy' must be a mapping"),
    # impossible values
    ("model: {rank: 0}\n", "'model.rank' must be > 0, got 0"),
    ("model: {num_experts: -1}\n", "'model.num_experts' must be > 0, got -1"),
    ("model: {tau: 0}\n", "'model.tau' must be > 0"),
    ("model: {alpha: -2}\n", "'model.alpha' must be > 0"),
    ("model: {lora_dropout: 1.0}\n", "'model.lora_dropout' must be in [0, 1)"),
    ("model: {std: [0.2, 0.0, 0.2]}\n", "'model.std' must be all > 0"),
    ("model: {mean: [0.5], std: [0.2, 0.2]}\n", "must have the same length"),
    ("model: {mean: []}\n", "'model.mean' must be a non-empty list or null"),
    ("model: {name: ''}\n", "'model.name' must be a non-empty string"),
    ("strategy: {epochs: 0}\n", "'strategy.epochs' must be > 0, got 0"),
    ("strategy: {batch_size: 0}\n", "'strategy.batch_size' must be > 0"),
    ("strategy: {eval_batch_size: -4}\n", "'strategy.eval_batch_size' must be > 0"),
    ("strategy: {lr: 0}\n", "'strategy.lr' must be > 0, got 0.0"),
    ("strategy: {lr: -1e-3}\n", "'strategy.lr' must be > 0, got -0.001"),
    ("strategy: {alignment_samples: 0}\n", "'strategy.alignment_samples' must be > 0, got 0"),
    ("strategy: {alignment_shrinkage: 0}\n", "'strategy.alignment_shrinkage' must be in (0, 1], got 0"),
    ("strategy: {alignment_shrinkage: 1.5}\n", "'strategy.alignment_shrinkage' must be in (0, 1], got 1.5"),
    ("strategy: {alignment_drift_ridge: 0}\n", "'strategy.alignment_drift_ridge' must be > 0, got 0"),
    (
        "strategy: {alignment_drift_map: affine}\n",
        "'strategy.alignment_drift_map' is 'affine' (did you mean 'linear'?); valid: linear, shift",
    ),
    ("strategy: {head_lr: 0}\n", "'strategy.head_lr' must be > 0, got 0"),
    ("strategy: {name: emtall}\n", "'strategy.name' is 'emtall' (did you mean 'emtal'?); valid: emtal, "),
    ("strategy: {name: foo}\n", "valid: emtal, emtal_no_qr, emtal_no_moe, emtal_no_fading, naive"),
    ("strategy: {optimizer: adamx}\n", "'strategy.optimizer' is 'adamx' (did you mean 'adam"),
    ("strategy: {optimizer: rmsprop}\n", "valid: adamw, adam, sgd"),
    ("strategy: {scheduler: step}\n", "'strategy.scheduler' is 'step'; valid: cosine, none"),
    ("strategy: {buffer_selection: fifo}\n", "valid: balanced, random, reservoir"),
    ("strategy: {qr_loss: huber}\n", "'strategy.qr_loss' is 'huber'; valid: kl, mse"),
    ("strategy: {qr_weighting: even}\n", "'strategy.qr_weighting' is 'even'; valid: fixed, classes"),
    ("strategy: {qr_augment: flip}\n", "'flip' (did you mean 'crop_flip'?); valid: none, crop, crop_flip"),
    ("strategy: {head_init: zeros}\n", "'strategy.head_init' is 'zeros'; valid: random, prototype, probe"),
    (
        "strategy: {alignment_covariance: lowrank}\n",
        "'strategy.alignment_covariance' is 'lowrank'; valid: full, ",
    ),
    ("strategy: {buffer_storage: int8}\n", "is 'int8' (did you mean 'uint8'?); valid: float32, uint8"),
    ("strategy: {fading_start: -0.1}\n", "'strategy.fading_start' must be in [0, 1]"),
    ("strategy: {fading_end: 1.5}\n", "'strategy.fading_end' must be in [0, 1]"),
    ("strategy: {fading_start: 0.6, fading_end: 0.5}\n", "'strategy.fading_start' (0.6) must be <="),
    ("strategy: {consolidate_every: 0}\n", "'strategy.consolidate_every' must be >= 1, got 0"),
    ("strategy: {buffer_size: -1}\n", "'strategy.buffer_size' must be >= 0, got -1"),
    ("strategy: {buffer_per_class: 0}\n", "'strategy.buffer_per_class' must be > 0"),
    ("strategy: {momentum: 1.0}\n", "'strategy.momentum' must be in [0, 1)"),
    ("strategy: {warmup_epochs: 9, epochs: 3}\n", "'strategy.warmup_epochs' must be <= strategy.epochs (3)"),
    ("strategy: {checkpoint_every_epochs: 0}\n", "'strategy.checkpoint_every_epochs' must be > 0"),
    ("strategy: {replay_batch_size: 0}\n", "'strategy.replay_batch_size' must be > 0"),
    ("strategy: {qr_in_task_max_weight: 0}\n", "'strategy.qr_in_task_max_weight' must be > 0"),
    ("strategy: {qr_bank_update: max}\n", "'strategy.qr_bank_update' is 'max'"),
    ("scenario: {mode: tli}\n", "'scenario.mode' is 'tli' (did you mean 'til'?); valid: til, cil"),
    ("scenario: {n_tasks: 0}\n", "'scenario.n_tasks' must be > 0"),
    ("scenario: {classes_per_task: 0}\n", "'scenario.classes_per_task' must be > 0"),
    ("scenario: {classes_per_task: [2, 0]}\n", "a non-empty list of counts > 0"),
    ("scenario: {n_tasks: 3, classes_per_task: [2, 2]}\n", "lists 2 tasks but 'scenario.n_tasks' is 3"),
    ("scenario: {max_per_class: 0}\n", "'scenario.max_per_class' must be > 0"),
    ("seed: -1\n", "'seed' must be in [0, 2**32)"),
    ("device: gpu\n", "'device' is 'gpu'; valid: auto, cpu, cuda, cuda:N"),
    ("name: a/b\n", "'name' must be a single directory name"),
    # files that are not a config
    ("- a\n- b\n", "must be a mapping at top level"),
    ("just a string\n", "must be a mapping at top level"),
    ("a: [1, 2\n", "cannot parse config file"),
    ("a: 1\na: 2\n", "found duplicate key 'a'"),
    ("strategy:\n  lr: 1\n  lr: 2\n", "found duplicate key 'lr'"),
    ("\t- x: :\n", "cannot parse config file"),
    ("[" * 3000, "cannot parse config file"),
    ("name: !!python/object:os.system x\n", "cannot parse config file"),
    ("scenario:\n  options: &a {x: *a}\n", "'scenario.options.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x.x' is nes"),
    (_ALIAS_BOMB, "holds too many values"),
]


@pytest.mark.parametrize("text,fragment", BAD_FILES)
def test_bad_file_raises_config_error(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


BAD_OVERRIDES = [
    (["strategy.lr"], "override 'strategy.lr' must look like key=value"),
    (["=3"], "has an empty key part"),
    (["strategy..lr=3"], "has an empty key part"),
    (["strategy.lrr=1"], "unknown config key 'strategy.lrr' (did you mean 'strategy.lr'?)"),
    (["stratgy.lr=1"], "unknown config key 'stratgy' (did you mean 'strategy'?)"),
    (["model.kwrgs.depth=2"], "unknown config key 'model.kwrgs' (did you mean 'model.kwargs'?)"),
    (["seed.x=1"], "'seed' is not a mapping"),
    (["strategy.lr.x=1"], "'strategy.lr' is not a mapping"),
    (["strategy.epochs=three"], "'strategy.epochs' expects int, got 'three'"),
    (["strategy.lr=[1"], "cannot parse value"),
    (["model.rank=0"], "'model.rank' must be > 0"),
    (["model=3"], "config key 'model' must be a mapping"),
    (
        ["strategy.name=replay", "strategy.buffer_per_class=20"],
        "'strategy.buffer_per_class' is 20, which replay does not honour",
    ),
    (  # the same cap through a per-strategy entry
        ["strategy.per_strategy.replay={buffer_per_class: 5}"],
        "in 'strategy.per_strategy.replay': config key 'strategy.buffer_per_class' is 5",
    ),
]


@pytest.mark.parametrize("overrides,fragment", BAD_OVERRIDES)
def test_bad_override_raises_config_error(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_unreadable_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)  # a directory
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(_write(tmp_path, b"name: \xff\xfe\n"))


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_direct_construction_is_checked():
    with pytest.raises(ConfigError, match="'model.rank' must be > 0"):
        ModelConfig(rank=0)
    with pytest.raises(ConfigError, match="'strategy.epochs' expects int"):
        StrategyConfig(epochs="3")
    assert StrategyConfig(lr=1).lr == 1.0 and isinstance(StrategyConfig(lr=1).lr, float)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "fgvc_multitask.yaml",
        ["strategy.lr=3e-4", "name='1e-3'", "out='yes'", "scenario.options.extra=[1, null, 'x']", "seed=7"],
    )
    assert cfg.name == "1e-3" and cfg.out == "yes"  # strings that look like other YAML types
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_round_trips(tmp_path, path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_config_from_dict_partial_and_apply_overrides():
    cfg = config_from_dict({"strategy": {"epochs": 1}})
    assert cfg.strategy.epochs == 1 and cfg.model == ModelConfig()
    cfg2 = apply_overrides(cfg, ["strategy.epochs=2"])
    assert cfg2.strategy.epochs == 2 and cfg.strategy.epochs == 1
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        config_from_dict({"bogus": 1})


def test_config_to_dict_is_a_copy():
    cfg = ExperimentConfig()
    d = config_to_dict(cfg)
    d["model"]["kwargs"]["depth"] = 99
    assert cfg.model.kwargs["depth"] == 4
    assert [f.name for f in dataclasses.fields(cfg)] == list(d)


# ------------------------------------------------------------------------------------- fuzzing

_KEYS = "name seed model scenario strategy logging rank lr epochs kwargs options mode".split()
_KEYS += ["x", "ü", "名前", "1", "null", "<<", ""]
_WEIRD_STRINGS = ["", "🙂", "\u202e", "\x00", "\ud7ff", "a\nb", "- x", "{", "'", '"', "&a", "*a"]
_WEIRD_STRINGS += ["!!python/object:os.system", "!!binary aGk=", "!!set {a}", "2024-01-01"]
_WEIRD_STRINGS += ["1e-3", "yes", "~", "0x1F", "1_000", ".nan", "12:30", "%TAG", "\t", "\ufeff"]
_HUGE = [10**400, -(10**400), 2**63, 2**32, 1e308, -1e308, 5e-324, float("inf"), float("nan")]


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 3, 7, 32, 200, *_HUGE[:4]])
    if kind == 3:
        return rng.choice([0.0, 0.5, 1.0, 1e-3, 2.5, -0.3, *_HUGE[4:]])
    if kind in (4, 5):
        return rng.choice(_WEIRD_STRINGS + ["emtal", "til", "cil", "adamw", "digits", "cpu"])
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = _KEYS + _SECTION_FIELDS
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


_SECTION_FIELDS = [
    k for section in config_to_dict(ExperimentConfig()).values() if isinstance(section, dict) for k in section
]


def _mutated_valid(rng: random.Random) -> dict:
    """A valid config with one or two fields replaced by random values: reaches the deep checks."""
    data = config_to_dict(ExperimentConfig())
    for _ in range(rng.randrange(1, 3)):
        section = rng.choice([k for k, v in data.items() if isinstance(v, dict)])
        data[section][rng.choice(list(data[section]))] = _random_value(rng)
    return data


def _fuzz_texts(rng: random.Random) -> list[str | bytes]:
    real = [p.read_text() for p in CONFIGS]
    texts: list[str | bytes] = []
    for _ in range(80):
        texts.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    for _ in range(80):
        text = rng.choice(real)
        texts.append(text[: rng.randrange(len(text) + 1)])
    for _ in range(60):
        chars = list(rng.choice(real))
        for _ in range(rng.randrange(1, 8)):
            chars[rng.randrange(len(chars))] = rng.choice(":-[]{}#&*!|>'\"\t\n ,?%@`\u00e9\U0001f600")
        texts.append("".join(chars))
    for _ in range(100):
        value = _random_value(rng) if rng.random() < 0.3 else _mutated_valid(rng)
        try:
            texts.append(yaml.safe_dump(value, allow_unicode=rng.random() < 0.5))
        except yaml.YAMLError:
            continue
    for _ in range(40):
        value = _random_value(rng)
        noise = "".join(rng.choice("a: \n-[]{}1é") for _ in range(rng.randrange(60)))
        texts.append(noise + str(value))
    return texts


def test_fuzz_loader_returns_config_or_raises_config_error(tmp_path):
    rng = random.Random(1234)
    loaded = failed = 0
    for i, text in enumerate(_fuzz_texts(rng)):
        path = _write(tmp_path, text, f"f{i}.yaml")
        overrides = []
        if rng.random() < 0.3:
            overrides = [f"{rng.choice(_KEYS)}.{rng.choice(_SECTION_FIELDS)}={rng.choice(_WEIRD_STRINGS)}"]
        try:
            cfg = load_config(path, overrides)
        except ConfigError as err:
            assert "\n" not in str(err), repr(str(err))
            failed += 1
            continue
        assert isinstance(cfg, ExperimentConfig)
        cfg.validate()
        save_config(cfg, tmp_path / "saved.yaml")
        assert load_config(tmp_path / "saved.yaml") == cfg
        loaded += 1
    assert loaded > 20 and failed > 100  # both outcomes were exercised


def test_per_strategy_settings_apply_only_to_their_strategy(tmp_path):
    path = _write(
        tmp_path,
        "strategy:\n  buffer_selection: reservoir\n  qr_ce_weight: 1\n"
        "  per_strategy:\n    der: {buffer_selection: balanced, qr_ce_weight: 0, epochs: 7}\n",
    )
    cfg = load_config(path)
    assert cfg.strategy.resolved() is cfg.strategy  # emtal has no entry: the section as written
    der = cfg.strategy.resolved("der")
    assert (der.name, der.buffer_selection, der.qr_ce_weight, der.epochs) == ("der", "balanced", 0.0, 7)
    assert isinstance(der.qr_ce_weight, float)  # checked and normalised like the section's own keys
    assert (cfg.strategy.buffer_selection, cfg.strategy.epochs) == ("reservoir", StrategyConfig().epochs)
    # named on the command line, or reached into with --set
    assert load_config(path, ["strategy.name=der"]).strategy.resolved().buffer_selection == "balanced"
    over = load_config(path, ["strategy.per_strategy.der.qr_ce_weight=0.5"]).strategy.resolved("der")
    assert (over.qr_ce_weight, over.buffer_selection) == (0.5, "balanced")
    round_trip = tmp_path / "saved.yaml"
    save_config(cfg, round_trip)
    assert load_config(round_trip) == cfg


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ("dre: {epochs: 2}", "'strategy.per_strategy.dre' names no strategy (did you mean 'der'?); valid:"),
        ("der: {epoch: 2}", "'strategy.per_strategy.der.epoch' (did you mean 'epochs'?)"),
        ("der: {name: replay}", "'strategy.per_strategy.der.name'"),
        ("der: {epochs: 0}", "in 'strategy.per_strategy.der': config key 'strategy.epochs' must be > 0"),
        ("der: {buffer_selection: best}", "valid: balanced, random, reservoir"),
        ("der: 3", "'strategy.per_strategy.der' must be a mapping of strategy keys to values, got 3"),
    ],
)
def test_bad_per_strategy_entries_name_the_key(tmp_path, entry, fragment):
    path = _write(tmp_path, f"strategy:\n  per_strategy:\n    {entry}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_resolving_an_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown strategy 'dre' \(did you mean 'der'\?\); valid: emtal"):
        StrategyConfig().resolved("dre")
