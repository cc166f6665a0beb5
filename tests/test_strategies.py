"""The registered strategies, the EMTAL template, plugin state round trip and end-of-stream merging."""

import copy
import dataclasses

import pytest
import torch

from cmtl.config import STRATEGY_NAMES, ExperimentConfig
from cmtl.continual import EMTALConfig
from cmtl.model import AdapterConfig, CMTLModel
from cmtl.qr import QRConfig
from cmtl.recipes import list_strategies, qr_config, strategy_spec


def _vit(size=16):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=size, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def _stream(mode, n_tasks=3, max_per_class=30):
    from cmtl.scenarios import create_scenario

    return create_scenario(
        "digits", mode=mode, n_tasks=n_tasks, classes_per_task=2, image_size=16, max_per_class=max_per_class
    )


def _evaluator():
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])


def _small_cfg():
    cfg = ExperimentConfig()
    cfg.model.num_experts, cfg.model.rank = 4, 2
    cfg.strategy.epochs, cfg.strategy.batch_size, cfg.strategy.buffer_size = 1, 16, 24
    return cfg


def test_registry_matches_config_names():
    assert sorted(STRATEGY_NAMES) == list_strategies()
    with pytest.raises(ValueError, match="did you mean 'emtal'"):
        strategy_spec("emtall", ExperimentConfig().model, ExperimentConfig().strategy)


def test_specs_differ_where_the_baselines_should():
    cfg = ExperimentConfig()
    specs = {n: strategy_spec(n, cfg.model, cfg.strategy) for n in list_strategies()}
    assert specs["emtal"].adapter.moe and specs["emtal"].emtal.qr is not None
    assert not specs["emtal"].backbone_trainable and specs["emtal"].emtal.fading
    assert specs["emtal_no_qr"].emtal.qr is None
    assert not specs["emtal_no_moe"].adapter.moe and specs["emtal_no_moe"].emtal.qr is not None
    assert not specs["emtal_no_fading"].emtal.fading
    assert not specs["lora"].adapter.moe and specs["lora"].emtal.qr is None
    assert specs["der"].emtal.qr.loss == "mse" and specs["der"].emtal.qr.in_task_weight == 0
    for name in ("naive", "der", "replay", "lwf", "ewc", "joint"):
        assert specs[name].adapter is None and specs[name].backbone_trainable, name
    assert specs["frozen"].adapter is None and not specs["frozen"].backbone_trainable
    assert specs["frozen"].emtal.qr is None
    assert {specs[n].avalanche for n in ("replay", "lwf", "ewc", "joint")} == {
        "replay",
        "lwf",
        "ewc",
        "joint",
    }
    # the buffer budget is the same wherever a buffer is used
    assert specs["emtal"].emtal.qr.budget == specs["der"].emtal.qr.budget == cfg.strategy.buffer_size


def test_qr_config_follows_strategy_section():
    st = dataclasses.replace(
        ExperimentConfig().strategy, buffer_size=50, qr_loss="mse", qr_in_task=False, qr_lambda=0.5
    )
    qr = qr_config(st, seed=3)
    assert (qr.budget, qr.loss, qr.in_task_weight, qr.lambda_replay, qr.seed) == (50, "mse", 0.0, 0.5, 3)
    st = dataclasses.replace(st, qr_in_task_max_weight=2.5, qr_bank_update="best")
    assert (qr_config(st).max_weight, qr_config(st).bank_update) == (2.5, "best")
    st = dataclasses.replace(st, qr_refresh=True)
    assert (
        qr_config(st).refresh
        and strategy_spec("emtal_no_fading", ExperimentConfig().model, st).emtal.qr.refresh
    )
    # DER keeps its logits as they were stored, whatever the EMTAL setting
    assert not strategy_spec("der", ExperimentConfig().model, st).emtal.qr.refresh


def test_replay_batch_size_reaches_avalanche_replay_and_the_qr_buffer():
    from avalanche.training.plugins import ReplayPlugin
    from cmtl.strategies import build_strategy

    cfg = _small_cfg()
    cfg.strategy.replay_batch_size = 5
    assert qr_config(cfg.strategy).batch_size == 5
    spec = strategy_spec("replay", cfg.model, cfg.strategy)
    strategy = build_strategy(spec, CMTLModel(_vit(), spec.adapter), cfg.strategy, evaluator=_evaluator())
    replay = [p for p in strategy.plugins if isinstance(p, ReplayPlugin)]
    assert len(replay) == 1 and replay[0].batch_size_mem == 5


@pytest.mark.parametrize("mode", ["til", "cil"])
@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_trains_and_evaluates(name, mode):
    from cmtl.strategies import build_strategy

    cfg = _small_cfg()
    stream = _stream(mode, n_tasks=2, max_per_class=20)
    spec = strategy_spec(name, cfg.model, cfg.strategy)
    model = CMTLModel(_vit(), spec.adapter, mode=mode)
    base = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    strategy = build_strategy(
        spec, model, cfg.strategy, classes_per_task=stream.classes_per_task, evaluator=_evaluator()
    )
    if name == "joint":
        strategy.train(stream.benchmark.train_stream)
    else:
        for exp in stream.benchmark.train_stream:
            strategy.train(exp)
    results = strategy.eval(stream.benchmark.test_stream)
    accs = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp")]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    # every strategy but frozen changed the backbone (full fine-tuning or merged adapters); all left it
    # plain timm
    changed = max((v - base[k]).abs().max().item() for k, v in model.backbone.state_dict().items())
    assert (changed == 0) if name == "frozen" else (changed > 0), (name, changed)
    assert not model.open_adapters
    assert model.heads.classes_per_task == [2, 2]


def test_frozen_trains_only_heads_so_task_incremental_accuracy_never_drops():
    from cmtl.strategies import build_strategy

    cfg = _small_cfg()
    cfg.strategy.head_init = "probe"
    stream = _stream("til", n_tasks=2, max_per_class=20)
    spec = strategy_spec("frozen", cfg.model, cfg.strategy)
    model = CMTLModel(_vit(), spec.adapter, mode="til")
    strategy = build_strategy(spec, model, cfg.strategy, evaluator=_evaluator())
    train, test = stream.benchmark.train_stream, stream.benchmark.test_stream
    task0 = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"
    strategy.train(train[0])
    head0 = model.heads.heads[0].weight.detach().clone()
    first = strategy.eval([test[0]])[task0]
    strategy.train(train[1])
    after = strategy.eval([test[0]])[task0]
    assert first > 0.5  # the head learned task 0 on the frozen features
    assert torch.equal(model.heads.heads[0].weight, head0)
    assert after == first


@pytest.mark.parametrize("mode", ["til", "cil"])
def test_joint_starts_every_head_as_head_init_says(mode):
    """The upper bound starts from probe heads too: each task its own (TIL) or one over all classes (CIL).

    A converged probe is where the gradient of its regularised cross-entropy vanishes: on each task's
    images for a task head, on every image over all classes for the class-incremental head (fitting
    each task's rows alone would leave that gradient large).
    """
    from cmtl.strategies import CMTLJoint, build_strategy
    from cmtl.strategies.emtal import eval_batches

    stream = _stream(mode, n_tasks=2, max_per_class=20)
    train = stream.benchmark.train_stream

    def probe_gradients(model):
        groups = [[exp] for exp in train] if mode == "til" else [list(train)]
        norms = []
        for t, exps in enumerate(groups):
            x, y = (torch.cat(z) for z in zip(*(b for exp in exps for b in eval_batches(exp.dataset))))
            heads = [model.heads.heads[t]] if mode == "til" else list(model.heads.heads)
            w = torch.cat([h.weight.detach() for h in heads]).requires_grad_(True)
            b = torch.cat([h.bias.detach() for h in heads]).requires_grad_(True)
            with torch.no_grad():
                feats = model.forward_features(x)
            loss = torch.nn.functional.cross_entropy(feats @ w.T + b, y) + w.pow(2).sum() / (2 * len(y))
            norms.append(float(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [w, b])]).norm()))
        return norms

    grads = {}
    for head_init in ("random", "probe"):
        cfg = _small_cfg()
        cfg.strategy.head_init, cfg.strategy.backbone_lr = head_init, 1e-12  # training moves nothing
        spec = strategy_spec("joint", cfg.model, cfg.strategy)
        torch.manual_seed(0)
        model = CMTLModel(_vit(), spec.adapter, mode=mode)
        strategy = build_strategy(
            spec, model, cfg.strategy, classes_per_task=stream.classes_per_task, evaluator=_evaluator()
        )
        strategy.train(train)
        model.eval()
        grads[head_init] = probe_gradients(model)
    assert all(g > 1e-2 for g in grads["random"]), grads
    assert all(g < 1e-3 for g in grads["probe"]), grads
    with pytest.raises(ValueError, match="head_init 'linear' is unknown; valid: random, prototype, probe"):
        CMTLJoint(
            model=model,
            optimizer=strategy.optimizer,
            criterion=torch.nn.CrossEntropyLoss(),
            head_init="linear",
        )


@pytest.mark.parametrize("name", ["replay", "der", "emtal"])
def test_class_incremental_probe_heads_are_fitted_against_the_replay_memory(name, new_rows_gradient):
    """A new task's probe rows are fitted in one softmax with the old classes' rows, on the memory
    the strategy replays (Avalanche's for replay, the QR buffer for der and emtal) plus the new
    images: the regularised cross-entropy over those has a vanishing gradient in the new rows."""
    from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
    from cmtl.strategies import build_strategy, find_emtal_plugin
    from cmtl.strategies.emtal import eval_batches

    stream = _stream("cil", n_tasks=2, max_per_class=20)
    train = stream.benchmark.train_stream

    class Capture(SupervisedPlugin):  # the memory as the second task starts (runs before EMTALPlugin)
        memory = None

        def before_train_dataset_adaptation(self, strategy, **kwargs):
            if strategy.experience.current_experience != 1:
                return
            replay = [p for p in strategy.plugins if isinstance(p, ReplayPlugin)]
            if replay:
                self.memory = tuple(torch.cat(z) for z in zip(*eval_batches(replay[0].storage_policy.buffer)))
            else:
                qr = find_emtal_plugin(strategy).controller.qr
                self.memory = (qr.buffer_images(), qr.buffer["y"].long())

    cfg = _small_cfg()
    cfg.strategy.head_init, cfg.strategy.lr, cfg.strategy.backbone_lr = "probe", 1e-12, 1e-12  # nothing moves
    spec = strategy_spec(name, cfg.model, cfg.strategy)
    torch.manual_seed(0)
    model = CMTLModel(_vit(), spec.adapter, mode="cil")
    capture = Capture()
    strategy = build_strategy(spec, model, cfg.strategy, evaluator=_evaluator(), plugins=[capture])
    for exp in train:
        strategy.train(exp)
    mem_x, mem_y = capture.memory
    assert len(mem_y) > 0 and set(mem_y.tolist()) == {0, 1}
    new_x, new_y = (torch.cat(z) for z in zip(*eval_batches(train[1].dataset)))
    x, y = torch.cat([mem_x, new_x]), torch.cat([mem_y, new_y])
    model.eval()
    if spec.adapter is not None:
        model.set_fading(1.0)  # as the task started: its adapter's router on, at the identity
    with torch.no_grad():
        feats = model.forward_features(x)
    grad = new_rows_gradient(model.heads, feats, y)
    assert grad < 1e-3, grad


def test_emtal_template_installs_plugin_and_merges_at_end_of_stream():
    from cmtl.strategies import EMTAL

    stream = _stream("til")
    model = CMTLModel(_vit(), AdapterConfig(num_experts=4, rank=2))
    merged_after = []
    strategy = EMTAL(
        model,
        config=EMTALConfig(consolidate_every=2, qr=QRConfig(budget=12)),
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=64,
        evaluator=_evaluator(),
    )
    assert strategy.emtal_plugin in strategy.plugins
    for exp in stream.benchmark.train_stream:
        strategy.train(exp)
        merged_after.append(list(model.open_adapters))
    # k=2: task0 stays open after exp 0, both merge after exp 1; the last task merges at stream end
    assert merged_after == [["task0"], [], []]
    assert len(strategy.emtal_plugin.controller.qr) <= 12


def test_plugin_state_round_trip_keeps_buffer_and_continues(tmp_path):
    import json

    from cmtl.strategies import EMTAL, find_emtal_plugin
    from safetensors.torch import load_file, save_file

    stream = _stream("til", max_per_class=20)
    config = EMTALConfig(qr=QRConfig(budget=12))
    model = CMTLModel(_vit(), AdapterConfig(num_experts=4, rank=2))
    strategy = EMTAL(model, config=config, train_mb_size=16, train_epochs=1, evaluator=_evaluator())
    for exp in stream.benchmark.train_stream[:2]:
        strategy.train(exp)
    state = find_emtal_plugin(strategy).state_dict()
    assert len(strategy.emtal_plugin.controller.qr) == 12  # 4 classes seen, 3 each
    save_file(state["tensors"], tmp_path / "buffer.safetensors")
    (tmp_path / "buffer.json").write_text(json.dumps(state["meta"]))

    # a fresh strategy on a copy of the model restores the buffer before it has trained
    resumed = EMTAL(
        copy.deepcopy(model), config=config, train_mb_size=16, train_epochs=1, evaluator=_evaluator()
    )
    loaded = {
        "tensors": load_file(tmp_path / "buffer.safetensors"),
        "meta": json.loads((tmp_path / "buffer.json").read_text()),
    }
    resumed.emtal_plugin.load_state_dict(loaded)
    again = resumed.emtal_plugin.state_dict()
    assert again["meta"] == state["meta"]
    assert again["tensors"].keys() == state["tensors"].keys()
    assert all(torch.equal(again["tensors"][k], state["tensors"][k]) for k in state["tensors"])
    # and it goes on: the third task replays the restored buffer, which then covers all 6 classes
    resumed.train(stream.benchmark.train_stream[2])
    qr = resumed.emtal_plugin.controller.qr
    assert "qr" in resumed.emtal_plugin.last_losses
    assert resumed.emtal_plugin.controller.task == 2
    assert len(qr) == 12 and len(qr.class_counts()) == 6


@pytest.mark.parametrize("name", ["emtal", "replay", "joint"])
def test_head_lr_puts_every_head_in_a_group_of_its_own_at_that_rate(name):
    """`strategy.head_lr`: while each experience trains, the optimiser holds two groups, the heads
    (every task's, the new one included) at head_lr's share of the schedule and the rest (adapters,
    or the whole backbone) at the strategy's own rate."""
    from avalanche.core import SupervisedPlugin
    from cmtl.strategies import build_strategy

    from cmtl.model import CMTLModel
    from cmtl.recipes import strategy_spec

    cfg = _small_cfg()
    cfg.scenario.mode = "cil"
    cfg.strategy.backbone_lr, cfg.strategy.head_lr = 1e-4, 4e-3
    spec = strategy_spec(name, cfg.model, cfg.strategy)
    torch.manual_seed(0)
    model = CMTLModel(_vit(), spec.adapter, mode="cil")
    seen = []

    class Look(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):  # the schedule has set this step's rates
            if strategy.clock.train_exp_iterations == 0:
                groups = strategy.optimizer.param_groups
                head_ids = {id(p) for p in model.heads.parameters()}
                seen.append(
                    (
                        len(groups),
                        {id(p) for p in groups[1]["params"]} == head_ids,
                        head_ids.isdisjoint(id(p) for p in groups[0]["params"]),
                        groups[1]["lr"] / groups[0]["lr"],
                    )
                )

    stream = _stream("cil", n_tasks=2, max_per_class=8)
    strategy = build_strategy(
        spec, model, cfg.strategy, classes_per_task=[2, 2], evaluator=_evaluator(), plugins=[Look()]
    )
    expected = 4e-3 / (1e-4 if spec.backbone_trainable else cfg.strategy.lr)
    if name == "joint":
        strategy.train(stream.benchmark.train_stream)
    else:
        for exp in stream.benchmark.train_stream:
            strategy.train(exp)
    assert len(seen) == (1 if name == "joint" else 2)
    for n_groups, heads_apart, rest_apart, ratio in seen:
        assert n_groups == 2 and heads_apart and rest_apart
        assert ratio == pytest.approx(expected)


def test_tune_base_trains_those_weights_in_every_task_at_backbone_lr():
    """`strategy.tune_base`: the chosen pre-trained weights sit in a group of their own at
    backbone_lr's share of the schedule and keep training after each task's consolidation."""
    from avalanche.core import SupervisedPlugin
    from cmtl.strategies import build_strategy

    cfg = _small_cfg()
    cfg.scenario.mode = "cil"
    cfg.strategy.lr, cfg.strategy.backbone_lr, cfg.strategy.head_lr = 1e-3, 1e-4, 4e-3
    cfg.strategy.tune_base = ["embed", "norms"]
    spec = strategy_spec("emtal", cfg.model, cfg.strategy)
    model = CMTLModel(_vit(), spec.adapter, mode="cil")
    seen = []

    class Look(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            if strategy.clock.train_exp_iterations == 0:
                base_ids = {id(p) for p in model.tuned_base_parameters()}
                lrs = {
                    frozenset(id(p) for p in g["params"]) == base_ids: g["lr"]
                    for g in strategy.optimizer.param_groups
                }
                seen.append((len(strategy.optimizer.param_groups), lrs.get(True), max(lrs.values())))

    stream = _stream("cil", n_tasks=2, max_per_class=8)
    strategy = build_strategy(
        spec, model, cfg.strategy, classes_per_task=[2, 2], evaluator=_evaluator(), plugins=[Look()]
    )
    vit = model.backbone
    for exp in stream.benchmark.train_stream:
        before = [
            t.detach().clone()
            for t in (vit.patch_embed.proj.weight, vit.pos_embed, vit.blocks[0].norm1.weight, vit.norm.bias)
        ]
        strategy.train(exp)
        after = (vit.patch_embed.proj.weight, vit.pos_embed, vit.blocks[0].norm1.weight, vit.norm.bias)
        assert all(not torch.equal(a, b) for a, b in zip(after, before)), "a tuned weight did not move"
        assert all(p.requires_grad for p in model.tuned_base_parameters())
    assert len(seen) == 2
    for n_groups, base_lr, head_lr in seen:
        assert n_groups == 3  # adapters, heads, tuned base weights
        assert base_lr / head_lr == pytest.approx(1e-4 / 4e-3)
    assert not model.open_adapters


def test_frozen_with_tuned_norms_changes_only_the_norms():
    from cmtl.strategies import build_strategy

    cfg = _small_cfg()
    cfg.strategy.tune_base = ["norms"]
    spec = strategy_spec("frozen", cfg.model, cfg.strategy)
    model = CMTLModel(_vit(), spec.adapter, mode="til")
    base = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    strategy = build_strategy(spec, model, cfg.strategy, evaluator=_evaluator())
    for exp in _stream("til", n_tasks=2, max_per_class=8).benchmark.train_stream:
        strategy.train(exp)
    changed = {k for k, v in model.backbone.state_dict().items() if not torch.equal(v, base[k])}
    norms = {k for k in base if ".norm" in k or k.startswith("norm.")}
    assert changed and changed <= norms
    assert {k for k in norms if k.endswith("weight")} <= changed
