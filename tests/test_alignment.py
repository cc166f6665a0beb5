"""Classifier alignment: class Gaussians, the re-fit of a class-incremental head, and the controller's use."""

import pytest
import torch

from cmtl.alignment import ClassStatistics, align_classifier
from cmtl.heads import TaskHeads


def _blobs(n_classes=4, per_class=200, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(n_classes, dim, generator=g)
    x = centres.repeat_interleave(per_class, 0) + torch.randn(n_classes * per_class, dim, generator=g)
    return x, torch.arange(n_classes).repeat_interleave(per_class)


def test_statistics_are_the_class_mean_and_shrunk_covariance_and_replace_on_update():
    x, y = _blobs()
    stats = ClassStatistics(shrinkage=0.0)
    assert stats.update(x, y) == [0, 1, 2, 3]
    assert torch.allclose(stats.means[2], x[y == 2].mean(0), atol=1e-5)
    assert torch.allclose(stats.covs[2], torch.cov(x[y == 2].T), atol=1e-4)
    shrunk = ClassStatistics(shrinkage=0.5)
    shrunk.update(x, y)
    cov = torch.cov(x[y == 1].T)
    iso = torch.diagonal(cov).mean() * torch.eye(8)
    assert torch.allclose(shrunk.covs[1], 0.5 * cov + 0.5 * iso, atol=1e-4)
    # a class seen again (its task trained again, or a resumed run) is replaced, not duplicated
    stats.update(x[y == 2] + 10.0, y[y == 2])
    assert stats.classes.tolist() == [0, 1, 2, 3]
    assert torch.allclose(stats.means[2], x[y == 2].mean(0) + 10.0, atol=1e-5)
    assert stats.update(x[:1], y[:1]) == []  # one sample gives no covariance: skipped


def test_samples_follow_each_class_gaussian_and_state_round_trips():
    x, y = _blobs(n_classes=3, per_class=500)
    stats = ClassStatistics()
    stats.update(x, y)
    sx, sy = stats.sample(4000, torch.Generator().manual_seed(1))
    assert sx.shape == (12000, 8) and sx.dtype == torch.float32
    assert sy.tolist() == [0] * 4000 + [1] * 4000 + [2] * 4000
    for c in range(3):
        assert torch.allclose(sx[sy == c].mean(0), stats.means[c], atol=0.1)
        assert torch.allclose(torch.cov(sx[sy == c].T), stats.covs[c], atol=0.15)
    again = ClassStatistics()
    again.load_state_dict(stats.state_dict())
    assert torch.equal(
        again.sample(5, torch.Generator().manual_seed(2))[0],
        stats.sample(5, torch.Generator().manual_seed(2))[0],
    )


def test_shared_statistics_pool_every_class_scatter_into_one_covariance():
    x, y = _blobs(n_classes=3, per_class=300)
    mix = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    x = x @ mix  # correlated dimensions
    stats = ClassStatistics(shrinkage=0.0, covariance="shared")
    stats.update(x[y < 2], y[y < 2])  # two tasks: the scatter accumulates over updates
    stats.update(x[y == 2], y[y == 2])
    centred = torch.cat([x[y == c] - x[y == c].mean(0) for c in range(3)])
    pooled = centred.T.double() @ centred.double() / (len(x) - 3)
    assert stats.covs.shape == (8, 8) and float(stats.scatter_dof) == len(x) - 3
    assert torch.allclose(stats.shared_covariance(), pooled, rtol=1e-4, atol=1e-4)
    sx, sy = stats.sample(6000, torch.Generator().manual_seed(1))
    for c in range(3):
        assert torch.allclose(sx[sy == c].mean(0), x[y == c].mean(0), atol=0.2)
    assert torch.allclose(
        torch.cov(sx[sy == 0].T).double(), pooled, rtol=0.1, atol=0.1 * float(pooled.diag().mean())
    )
    again = ClassStatistics(shrinkage=0.0, covariance="shared")
    again.load_state_dict(stats.state_dict())
    assert torch.equal(again.shared_covariance(), stats.shared_covariance())
    with pytest.raises(ValueError, match="do not fit 'full' statistics"):
        ClassStatistics().load_state_dict(stats.state_dict())
    with pytest.raises(ValueError, match="no shared covariance in 'full'"):
        ClassStatistics().shared_covariance()


def test_bad_statistics_inputs_name_the_value():
    with pytest.raises(ValueError, match="shrinkage=2"):
        ClassStatistics(shrinkage=2)
    with pytest.raises(ValueError, match="covariance 'lowrank' is unknown; valid: full, shared"):
        ClassStatistics(covariance="lowrank")
    stats = ClassStatistics()
    with pytest.raises(ValueError, match="need N x D"):
        stats.update(torch.zeros(4, 3), torch.zeros(5))
    stats.update(*_blobs(n_classes=2, per_class=5, dim=3))
    with pytest.raises(ValueError, match="4 dimensions, the statistics 3"):
        stats.update(torch.zeros(4, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="per_class=0"):
        stats.sample(0)


@pytest.mark.parametrize("covariance", ["full", "shared"])
def test_alignment_removes_a_recency_bias_of_the_head(covariance):
    """Old rows fitted, new rows pushed up by a large bias (the lean toward the classes trained
    last): accuracy on the old classes collapses. Re-fitted on the class Gaussians, every class is
    recognised again, and the balanced accuracy is back near a probe fitted on all the data."""
    x, y = _blobs(n_classes=4, per_class=300, dim=8)
    heads = TaskHeads(8, mode="cil")
    heads.add_task(2)
    heads.add_task(2)
    assert heads.fit(x, y, tasks=range(0, 2))
    with torch.no_grad():
        heads.heads[1].bias.add_(25.0)
    per_class = lambda: [float((heads(x[y == c]).argmax(1) == c).float().mean()) for c in range(4)]  # noqa: E731
    biased = per_class()
    assert max(biased[:2]) < 0.2 and min(biased[2:]) > 0.9
    stats = ClassStatistics(covariance=covariance)
    stats.update(x, y)
    assert align_classifier(heads, stats, per_class=256, generator=torch.Generator().manual_seed(0))
    aligned = per_class()
    assert min(aligned) > 0.9, aligned


def test_alignment_leaves_task_incremental_heads_and_single_classes_alone():
    x, y = _blobs(n_classes=2, per_class=50)
    til = TaskHeads(8, mode="til")
    til.add_task(2)
    w = til.heads[0].weight.clone()
    stats = ClassStatistics()
    stats.update(x, y)
    assert not align_classifier(til, stats) and torch.equal(til.heads[0].weight, w)
    cil = TaskHeads(8, mode="cil")
    cil.add_task(2)
    one = ClassStatistics()
    one.update(x[y == 0], y[y == 0])
    assert not align_classifier(cil, one)
    too_many = ClassStatistics()
    too_many.update(x, y + 5)
    with pytest.raises(ValueError, match="class 6, but the head has 2 classes"):
        align_classifier(cil, too_many)


def test_controller_keeps_statistics_per_task_and_checkpoints_them():
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALConfig, EMTALController
    from cmtl.model import AdapterConfig, CMTLModel

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    model = CMTLModel(vit, AdapterConfig(num_experts=4, rank=2), mode="cil")
    ctl = EMTALController(model, EMTALConfig(qr=None, classifier_alignment=True, alignment_samples=32))
    images = torch.randn(24, 3, 16, 16)
    for task in range(2):
        ctl.start_task(2)
        labels = torch.arange(2 * task, 2 * task + 2).repeat(12)
        before = torch.cat([h.weight.detach().clone() for h in model.heads.heads])
        ctl.end_task([(images[:12] + task, labels[:12]), (images[12:] + task, labels[12:])])
        after = torch.cat([h.weight.detach() for h in model.heads.heads])
        assert ctl.stats.classes.tolist() == list(range(2 * task + 2))
        assert not torch.equal(before, after)  # the head was re-fitted
    state = ctl.state_dict()
    fresh = EMTALController(model, EMTALConfig(qr=None, classifier_alignment=True))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.stats.means, ctl.stats.means) and torch.equal(fresh.stats.covs, ctl.stats.covs)


def test_configured_shrinkage_reaches_the_class_statistics():
    """`strategy.alignment_shrinkage` goes through the recipe to the controller's statistics: the
    same features give covariances whose off-diagonal entries shrink by exactly (1 - shrinkage)."""
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.config import StrategyConfig
    from cmtl.continual import EMTALController
    from cmtl.model import CMTLModel
    from cmtl.recipes import emtal_config

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    images, labels = torch.randn(40, 3, 16, 16), torch.arange(2).repeat(20)
    covs = {}
    for shrinkage in (0.1, 0.5):
        st = StrategyConfig(classifier_alignment=True, alignment_shrinkage=shrinkage)
        cfg = emtal_config(st, None)
        assert cfg.alignment_shrinkage == shrinkage
        ctl = EMTALController(CMTLModel(vit, None, mode="cil"), cfg)
        ctl.start_task(2)
        ctl.end_task([(images, labels)])
        assert ctl.stats.shrinkage == shrinkage
        covs[shrinkage] = ctl.stats.covs
    off = ~torch.eye(32, dtype=torch.bool)
    ratio = covs[0.5][:, off] / covs[0.1][:, off]
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5 / 0.9), rtol=1e-3)


@pytest.mark.parametrize("name", ["emtal", "replay"])
def test_plugin_aligns_every_strategy_with_a_class_incremental_head(name):
    """The Avalanche path: statistics of each experience's classes, taken on its un-augmented
    training images; EMTAL and a full fine-tuning baseline (replay) alike."""
    from cmtl.strategies import build_strategy, find_emtal_plugin
    from test_strategies import _evaluator, _small_cfg, _stream, _vit

    from cmtl.model import CMTLModel
    from cmtl.recipes import strategy_spec

    cfg = _small_cfg()
    cfg.strategy.classifier_alignment, cfg.strategy.alignment_samples = True, 16
    spec = strategy_spec(name, cfg.model, cfg.strategy)
    torch.manual_seed(0)
    model = CMTLModel(_vit(), spec.adapter, mode="cil")
    strategy = build_strategy(spec, model, cfg.strategy, evaluator=_evaluator())
    stream = _stream("cil", n_tasks=2, max_per_class=12)
    seen: set[int] = set()
    for exp in stream.benchmark.train_stream:
        strategy.train(exp)
        seen |= set(exp.classes_in_this_experience)
        assert find_emtal_plugin(strategy).controller.stats.classes.tolist() == sorted(seen)


def test_shift_drift_compensation_moves_old_means_by_their_memory_samples_drift():
    """`alignment_drift_map: shift`: features that moved by +1 in every dimension over a task (the
    final norm's bias changed) move the stored means of the classes in the memory by exactly that;
    a class without memory samples keeps its mean."""
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALConfig, EMTALController
    from cmtl.model import CMTLModel

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    model = CMTLModel(vit, None, mode="cil")
    cfg = EMTALConfig(qr=None, classifier_alignment=True, alignment_drift=True, alignment_drift_map="shift")
    ctl = EMTALController(model, cfg)
    ctl.start_task(3)
    images, labels = torch.randn(30, 3, 16, 16), torch.arange(3).repeat(10)
    ctl.end_task([(images, labels)])
    before = ctl.stats.means.clone()
    memory = [(images[labels < 2], labels[labels < 2])]  # class 2 has no memory samples
    ctl.start_task(2)
    ctl.note_memory(memory)
    with torch.no_grad():
        model.backbone.norm.bias.add_(1.0)
    assert ctl.compensate_drift(memory) == 2
    assert torch.allclose(ctl.stats.means[:2], before[:2] + 1.0, atol=1e-4)
    assert torch.equal(ctl.stats.means[2], before[2])
    assert ctl.compensate_drift(memory) == 0  # measured once per task


def test_drift_map_recovers_a_linear_change_and_tends_to_a_shift_under_a_large_ridge():
    from cmtl.alignment import fit_drift_map

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g) * torch.linspace(0.5, 3.0, 6)
    w0 = torch.eye(6) + 0.3 * torch.randn(6, 6, generator=g)
    b0 = torch.randn(6, generator=g)
    y = x @ w0 + b0
    w, b = fit_drift_map(x, y, ridge=1e-8)
    assert torch.allclose(w.float(), w0, atol=1e-4) and torch.allclose(b.float(), b0, atol=1e-4)
    w, b = fit_drift_map(x, y, ridge=1e8)  # nothing learnt: the identity and the mean change
    assert torch.allclose(w, torch.eye(6, dtype=w.dtype), atol=1e-6)
    assert torch.allclose(b.float(), (y - x).mean(0), atol=1e-4)
    with pytest.raises(ValueError, match="ridge=0 must be > 0"):
        fit_drift_map(x, y, ridge=0)
    with pytest.raises(ValueError, match=r"before \(400, 6\) / after \(400, 5\)"):
        fit_drift_map(x, y[:, :5])


@pytest.mark.parametrize("covariance", ["full", "shared"])
def test_linear_drift_compensation_moves_means_and_covariances_with_the_features(covariance):
    """Features that became 2 f - beta + 1 over a task (the final norm's scale doubled, its bias
    moved): the map fitted on the memory moves every class's covariance by 4 and every mean to
    where its features went, including a class with no memory samples; "shift" moves means only."""
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALConfig, EMTALController, class_features
    from cmtl.model import CMTLModel

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0)
    images, labels = torch.randn(90, 3, 16, 16), torch.arange(3).repeat(30)
    memory = [(images[labels < 2], labels[labels < 2])]  # class 2 has no memory samples
    results = {}
    for drift_map in ("shift", "linear"):
        model = CMTLModel(vit, None, mode="cil")
        cfg = EMTALConfig(
            qr=None,
            classifier_alignment=True,
            alignment_drift=True,
            alignment_covariance=covariance,
            alignment_drift_map=drift_map,
            alignment_drift_ridge=1e-6,
            alignment_shrinkage=1e-6,  # the norm leaves one direction without variance and the map
        )  # keeps the identity there; shrinkage would put variance into it
        ctl = EMTALController(model, cfg)
        ctl.start_task(3)
        ctl.end_task([(images, labels)])
        means, covs = ctl.stats.means.clone(), ctl.stats.covs.clone()
        ctl.start_task(2)
        ctl.note_memory(memory)
        beta = model.backbone.norm.bias.detach().clone()
        with torch.no_grad():
            model.backbone.norm.weight.mul_(2.0)
            model.backbone.norm.bias.add_(1.0)
        assert ctl.compensate_drift(memory) == (3 if drift_map == "linear" else 2)
        results[drift_map] = (means, covs, ctl.stats.means.clone(), ctl.stats.covs.clone())
        with torch.no_grad():  # undo, for the next map
            model.backbone.norm.weight.div_(2.0)
            model.backbone.norm.bias.sub_(1.0)
    means, covs, moved, moved_covs = results["linear"]
    assert torch.allclose(moved, 2 * means - beta + 1, atol=1e-3)
    assert torch.allclose(moved_covs.double(), 4 * covs.double(), rtol=1e-3, atol=1e-4)
    feats, _ = class_features(model, [(images, labels)])
    assert not torch.allclose(feats, feats.mean(0))  # the features do vary, so the covariances say something
    means, covs, moved, moved_covs = results["shift"]
    assert torch.equal(moved_covs, covs) and torch.equal(moved[2], means[2])
    assert not torch.allclose(moved[:2], means[:2])


def test_drift_compensation_leaves_statistics_alone_when_no_feature_moved():
    """A frozen backbone: the map would be the identity up to rounding, which a re-fit by L-BFGS
    can amplify; the statistics stay bit for bit instead."""
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALConfig, EMTALController
    from cmtl.model import CMTLModel

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0)
    images, labels = torch.randn(40, 3, 16, 16), torch.arange(2).repeat(20)
    ctl = EMTALController(
        CMTLModel(vit, None, mode="cil"),
        EMTALConfig(qr=None, classifier_alignment=True, alignment_drift=True),
    )
    ctl.start_task(2)
    ctl.end_task([(images, labels)])
    means, covs = ctl.stats.means.clone(), ctl.stats.covs.clone()
    ctl.start_task(2)
    ctl.note_memory([(images, labels)])
    assert ctl.compensate_drift([(images, labels)]) == 0
    assert torch.equal(ctl.stats.means, means) and torch.equal(ctl.stats.covs, covs)


def test_drift_map_fitted_on_the_new_tasks_images_too_follows_a_drift_the_memory_cannot_pin_down():
    """Two memory samples in 16 dimensions pin down one direction of the map: a class without
    memory samples keeps most of its stale mean. With `alignment_drift_task_samples` the map is
    fitted on the new task's first images per class too (their features at the start and the end
    of the task) and moves that class to where its features went; the new classes' statistics come
    from the same single pass over the task's images."""
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALConfig, EMTALController, class_features
    from cmtl.model import CMTLModel

    torch.manual_seed(0)
    vit = VisionTransformer(  # averaged tokens: features that follow the images at a random init
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0, global_pool="avg"
    )
    images, labels = torch.randn(90, 3, 16, 16), torch.arange(3).repeat(30)
    pattern = 3.0 * torch.randn(3, 16, 16)  # class 2: one image and a little noise, so its features
    images[labels == 2] = pattern + 0.1 * images[labels == 2]  # lie together, away from the memory's
    memory = [(images[:2], labels[:2])]  # one sample each of classes 0 and 1; none of class 2
    new_images, new_labels = torch.randn(80, 3, 16, 16), torch.tensor([3, 4]).repeat(40)
    task = [(new_images[:50], new_labels[:50]), (new_images[50:], new_labels[50:])]
    errors = {}
    for per_class in (0, 30):
        model = CMTLModel(vit, None, mode="cil")
        cfg = EMTALConfig(
            qr=None,
            classifier_alignment=True,
            alignment_drift=True,
            alignment_drift_ridge=0.01,
            alignment_drift_task_samples=per_class,
        )
        ctl = EMTALController(model, cfg)
        ctl.start_task(3)
        ctl.end_task([(images, labels)])
        stale = ctl.stats.means[2].clone()
        ctl.start_task(2)
        ctl.note_memory(memory, iter(task))  # one pass, as the Avalanche plugin gives it
        if per_class:
            feats, positions = ctl.task_start
            # the first 30 of each class: 25 of each in the first batch, 5 in the second
            assert positions.tolist() == list(range(50)) + list(range(50, 60))
            again = EMTALController(model, cfg)
            again.load_state_dict(ctl.state_dict())  # a checkpoint inside the task keeps them
            assert torch.equal(again.task_start[0], feats) and torch.equal(again.task_start[1], positions)
        else:
            assert ctl.task_start is None
        with torch.no_grad():
            model.backbone.fc_norm.weight.mul_(2.0)
            model.backbone.fc_norm.bias.add_(1.0)
        ctl.end_task(iter(task), memory)
        truth = class_features(model, [(images[labels == 2], labels[labels == 2])])[0].mean(0)
        errors[per_class] = (float((stale - truth).norm()), float((ctl.stats.means[2] - truth).norm()))
        new_feats, new_y = class_features(model, task)
        assert torch.allclose(ctl.stats.means[3], new_feats[new_y == 3].mean(0), atol=1e-5)
        with torch.no_grad():
            model.backbone.fc_norm.weight.div_(2.0)
            model.backbone.fc_norm.bias.sub_(1.0)
    stale_error, memory_only = errors[0]
    assert memory_only > 0.3 * stale_error  # the memory alone leaves much of the drift
    assert errors[30][1] < 0.05 * stale_error  # the task's images pin the map down


def test_drift_task_samples_need_a_linear_map():
    from cmtl.continual import EMTALConfig

    with pytest.raises(ValueError, match="alignment_drift_task_samples=5 needs alignment_drift_map 'linear'"):
        EMTALConfig(alignment_drift_map="shift", alignment_drift_task_samples=5)
    with pytest.raises(ValueError, match="alignment_drift_task_samples=-1 must be >= 0"):
        EMTALConfig(alignment_drift_task_samples=-1)
