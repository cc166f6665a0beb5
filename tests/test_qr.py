"""QR buffer and distillation losses: tiny random tensors, no model, no framework."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cmtl.losses import (
    create_distill_loss,
    kl_distill,
    list_distill_losses,
    masked_cross_entropy,
    mse_distill,
    register_distill_loss,
)
from cmtl.qr import (
    QRBuffer,
    QRConfig,
    balanced_quota,
    class_balanced_indices,
    dequantize_uint8,
    logit_quality,
    quantize_uint8,
)

PAD = -1e4


def _kl_by_hand(student: list[float], teacher: list[float], t: float) -> float:
    zs = sum(math.exp(s / t) for s in student)
    zt = sum(math.exp(v / t) for v in teacher)
    return (
        t
        * t
        * sum(
            math.exp(v / t) / zt * ((v / t - math.log(zt)) - (s / t - math.log(zs)))
            for s, v in zip(student, teacher)
        )
    )


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize(
    "student, teacher, t",
    [
        ([0.0, 0.0], [math.log(3.0), 0.0], 1.0),
        ([1.0, -2.0, 0.5], [0.0, 3.0, 1.0], 2.0),
        ([2.0, 1.0], [1.0, 2.0], 4.0),
    ],
)
def test_kl_matches_hand_computation(student, teacher, t):
    got = kl_distill(torch.tensor([student]), torch.tensor([teacher]), temperature=t)
    assert got.item() == pytest.approx(_kl_by_hand(student, teacher, t), rel=1e-5)


def test_kl_first_case_closed_form():
    # teacher (3/4, 1/4), student uniform: KL = 3/4 log(3/2) + 1/4 log(1/2) at T = 1
    got = kl_distill(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), temperature=1.0)
    assert got.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)


@pytest.mark.parametrize("name", ["kl", "mse"])
def test_distill_zero_when_student_equals_teacher(name):
    x = torch.randn(5, 7)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    assert create_distill_loss(name)(x, x.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_is_never_negative_for_equal_distributions():
    # a logit shift leaves the distribution unchanged but changes the rounding: the KL of the
    # rounded values came out below zero (down to -8e-7), which loggers printed as a negative loss
    s = torch.randn(64, 10) * 5
    per_row = torch.stack([kl_distill(s[i : i + 1], s[i : i + 1] + 3.7) for i in range(64)])
    assert per_row.min().item() >= 0.0 and per_row.max().item() < 1e-5
    # ... and the gradient is still that of the expression, not a clamp's zero: on the rows whose
    # rounded value was negative it is the (tiny, non-zero) rounding of p_s - p_t
    negative = [i for i in range(64) if kl_distill(s[i : i + 1], s[i : i + 1] + 3.7).item() == 0.0]
    z = s[negative].clone().requires_grad_(True)
    kl_distill(z, s[negative] + 3.7).backward()
    assert negative and bool((z.grad != 0).any()) and z.grad.abs().max().item() < 1e-6
    student = s.clone().requires_grad_(True)
    teacher = s.detach() + 0.5 * torch.randn_like(s)
    kl_distill(student, teacher).backward()
    p_s, p_t = (student.detach() / 2).softmax(1), (teacher / 2).softmax(1)
    # d/dz of T^2 * mean_b KL(p_t || softmax(z/T)) is T * (p_s - p_t) / B
    assert torch.allclose(student.grad, 2.0 * (p_s - p_t) / s.shape[0], atol=1e-6)


@pytest.mark.parametrize("name", ["kl", "mse"])
def test_distill_ignores_masked_columns(name):
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = create_distill_loss(name)
    ref = loss(student, teacher, mask)
    s2, t2 = student.clone(), teacher.clone()
    s2[~mask] = PAD
    t2[~mask] = 123.0
    assert loss(s2, t2, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    # gradients reach only the valid columns and are finite
    s = student.clone().requires_grad_()
    loss(s, t2, mask).backward()
    assert torch.isfinite(s.grad).all() and (s.grad[~mask] == 0).all() and (s.grad[mask] != 0).any()


def test_kl_mask_equals_truncated_distribution():
    student, teacher = torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[0.5, -1.0, -9.0]])
    mask = torch.tensor([[True, True, False]])
    assert kl_distill(student, teacher, mask).item() == pytest.approx(
        _kl_by_hand([1.0, 2.0], [0.5, -1.0], 2.0), rel=1e-5
    )


def test_mse_hand_computed_with_mask_and_weight():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 100.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # valid squared errors: 1, 4 | 1, 1, 1 -> 8 over 5 entries
    assert mse_distill(student, teacher, mask).item() == pytest.approx(8 / 5)
    assert mse_distill(student, teacher, mask, torch.tensor([2.0, 0.0])).item() == pytest.approx(10 / 5)


def test_kl_weight_scales_per_sample():
    s, t = torch.randn(2, 4), torch.randn(2, 4)
    per = [kl_distill(s[i : i + 1], t[i : i + 1]).item() for i in range(2)]
    got = kl_distill(s, t, weight=torch.tensor([3.0, 0.5])).item()
    assert got == pytest.approx((3.0 * per[0] + 0.5 * per[1]) / 2, rel=1e-5)


def test_masked_cross_entropy_matches_truncated():
    logits, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 3])
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :4] = True
    assert masked_cross_entropy(logits, y, mask).item() == pytest.approx(
        F.cross_entropy(logits[:, :4], y).item()
    )


def test_loss_registry_and_errors():
    assert {"kl", "mse"} <= set(list_distill_losses())
    with pytest.raises(ValueError, match="valid: .*kl"):
        create_distill_loss("kll")
    with pytest.raises(ValueError, match="already registered"):
        register_distill_loss("kl")(lambda: None)
    with pytest.raises(ValueError, match="at least one valid"):
        kl_distill(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match="must both be"):
        mse_distill(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"selection": "fifo"}, "balanced, random, reservoir"),
        ({"loss": "l1"}, "kl, mse"),
        ({"budget": -1}, "budget"),
        ({"budget": None, "per_class": None}, "neither"),
        ({"per_class": 0}, "per_class"),
        ({"temperature": 0.0}, "temperature"),
        ({"bank_momentum": 1.0}, "bank_momentum"),
        ({"lambda_replay": -1.0}, "lambda_replay"),
        ({"max_weight": 0.0}, "max_weight"),
        ({"pool_factor": 0.5}, "pool_factor"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QRConfig(**kwargs)


# -------------------------------------------------------------------------------------- in-task QR bank


def test_bank_updates_only_from_correct_samples():
    qr = QRBuffer(QRConfig(bank_momentum=0.5))
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [4.0, 1.0, 0.0]])
    targets = torch.tensor([0, 0, 0])  # row 1 is wrong
    qr.update_bank(logits, targets, task=0)
    bank, filled = qr._bank[0], qr._bank_filled[0]
    assert filled.tolist() == [True, False, False]
    assert torch.allclose(bank[0], (logits[0] + logits[2]) / 2)
    # EMA with momentum 0.5; a batch with only wrong samples of class 0 changes nothing
    qr.update_bank(torch.tensor([[5.0, 1.0, 1.0]]), torch.tensor([0]), task=0)
    assert torch.allclose(
        qr._bank[0][0], 0.5 * (logits[0] + logits[2]) / 2 + 0.5 * torch.tensor([5.0, 1.0, 1.0])
    )
    before = qr._bank[0].clone()
    qr.update_bank(torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([0]), task=0)
    assert torch.equal(qr._bank[0][0], before[0])


def test_best_bank_keeps_the_highest_margin_batch_mean():
    qr = QRBuffer(QRConfig(bank_update="best"))
    qr.update_bank(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 1]), task=0)
    first = qr._bank[0].clone()
    # class 0: margin 1 -> 4 replaces it; class 1: margin 2 -> 0.5 keeps the old entry
    qr.update_bank(torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.5, 1.0]]), torch.tensor([0, 1]), task=0)
    assert qr._bank[0][0].tolist() == [5.0, 1.0, 0.0]
    assert torch.equal(qr._bank[0][1], first[1])
    assert qr._bank_filled[0].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="bank_update 'max' is unknown; valid: ema, best"):
        QRConfig(bank_update="max")


def test_in_task_loss_zero_without_bank_and_grad_safe():
    qr = QRBuffer()
    logits = torch.randn(4, 3, requires_grad=True)
    loss = qr.in_task_loss(logits, torch.tensor([0, 1, 2, 0]), task=0)
    assert loss.item() == 0.0
    (loss + logits.sum()).backward()  # adds to other losses and backpropagates
    qr.update_bank(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0]), task=0)
    zero = qr.in_task_loss(logits, torch.tensor([1, 2, 1, 2]), task=0)  # classes with no entry
    assert zero.item() == 0.0
    zero.backward()


def test_in_task_loss_weighted_by_inverse_running_ce():
    cfg = QRConfig(ce_floor=1e-3, max_weight=None, temperature=2.0)
    qr = QRBuffer(cfg)
    entry = torch.tensor([[4.0, 1.0, 0.0]])
    qr.update_bank(entry, torch.tensor([0]), task=0, track_ce=False)
    qr.update_ce(0, 0.5)
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    got = qr.in_task_loss(logits, torch.tensor([0]), task=0)
    assert got.item() == pytest.approx(_kl_by_hand([1.0, 1.0, 1.0], [4.0, 1.0, 0.0], 2.0) / 0.5, rel=1e-5)

    low = QRBuffer(cfg)
    low.update_bank(entry, torch.tensor([0]), task=0, track_ce=False)
    low.update_ce(0, 0.1)
    assert low.task_weight(0) > qr.task_weight(0)
    assert low.in_task_loss(logits, torch.tensor([0]), 0).item() > got.item()


@pytest.mark.parametrize(
    "ce, floor, cap, expected",
    [(0.5, 0.05, 10.0, 2.0), (0.01, 0.05, None, 20.0), (0.01, 0.05, 10.0, 10.0), (0.0, 0.05, 100.0, 20.0)],
)
def test_task_weight_is_bounded(ce, floor, cap, expected):
    qr = QRBuffer(QRConfig(ce_floor=floor, max_weight=cap))
    assert qr.task_weight(0) == 0.0  # no running CE yet
    qr.update_ce(0, ce)
    assert qr.task_weight(0) == pytest.approx(expected)


def test_update_bank_tracks_running_ce():
    qr = QRBuffer(QRConfig(ce_momentum=0.5))
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    qr.update_bank(logits, y, task=2)
    first = F.cross_entropy(logits, y).item()
    assert qr.running_ce(2) == pytest.approx(first)
    qr.update_ce(2, 1.0)
    assert qr.running_ce(2) == pytest.approx(0.5 * first + 0.5)


# ---------------------------------------------------------------------------------- records and quality


def test_logit_quality():
    q = logit_quality(
        torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 0.0], [2.0, 2.0, 0.0]]), torch.tensor([0, 0, 0])
    )
    assert q.tolist() == [1.0, float("-inf"), float("-inf")]  # a tie is not a correct prediction


# (first logits of the sample [true class 0], second logits, stored after the second record)
RECORD_CASES = [
    ("first incorrect is kept", [0.0, 2.0], None, [0.0, 2.0]),
    ("correct replaces incorrect", [0.0, 2.0], [2.0, 1.0], [2.0, 1.0]),
    ("incorrect never replaces correct", [2.0, 1.0], [0.0, 5.0], [2.0, 1.0]),
    ("larger margin replaces", [2.0, 1.0], [3.0, 0.0], [3.0, 0.0]),
    ("smaller margin does not", [3.0, 0.0], [2.0, 1.0], [3.0, 0.0]),
    ("equal margin does not", [3.0, 0.0], [4.0, 1.0], [3.0, 0.0]),
    ("incorrect does not replace incorrect", [0.0, 2.0], [0.0, 1.0], [0.0, 2.0]),
]


@pytest.mark.parametrize("case, first, second, stored", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_record_replaces_only_on_quality_improvement(case, first, second, stored):
    qr = QRBuffer()
    qr.begin_task(0, torch.zeros(1, 2), torch.tensor([0]), num_valid_classes=2)
    assert qr.record(torch.tensor([first])) == 1
    if second is not None:
        qr.record(torch.tensor([second]))
    assert qr.pool["logits"][0].tolist() == stored
    assert qr.pool["quality"][0].item() == logit_quality(torch.tensor([stored]), torch.tensor([0])).item()


def test_record_chunks_and_extra_columns():
    qr = QRBuffer()
    qr.begin_task(0, torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), num_valid_classes=2)
    qr.record(torch.tensor([[2.0, 0.0, PAD], [0.0, 1.0, PAD]]), indices=torch.tensor([0, 3]))
    assert qr.pool["recorded"].tolist() == [True, False, False, True]
    assert qr.pool["logits"][3].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="expects logits"):
        qr.record(torch.zeros(4, 1))


# ------------------------------------------------------------------------------------- selection/budget


@pytest.mark.parametrize(
    "available, budget, per_class, expected",
    [
        ([10, 10, 10], 9, None, [3, 3, 3]),
        ([10, 10, 10], 10, None, [4, 3, 3]),
        ([1, 10, 10], 9, None, [1, 4, 4]),
        ([10, 10], None, 3, [3, 3]),
        ([10, 2, 10], 20, 5, [5, 2, 5]),
        ([5, 5], 0, None, [0, 0]),
        ([1, 1, 1], 2, None, [1, 1, 0]),
    ],
)
def test_balanced_quota(available, budget, per_class, expected):
    assert balanced_quota(available, budget, per_class) == expected


def test_class_balanced_indices_deterministic():
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 0, 1])
    a = class_balanced_indices(labels, 2, seed=3)
    assert torch.equal(a, class_balanced_indices(labels, 2, seed=3))
    assert torch.bincount(labels[a]).tolist() == [2, 2, 1]
    assert torch.equal(a, torch.sort(a).values)


def _run_task(qr: QRBuffer, task: int, n_classes: int, per_class: int, cil_offset: int = 0, feat: int = 3):
    """Open a pool, record two epochs of logits with known margins, close the task."""
    n_valid = cil_offset + n_classes
    y = torch.arange(cil_offset, n_valid).repeat_interleave(per_class)
    x = torch.arange(len(y)).float()[:, None].repeat(1, feat) + 100 * task
    qr.begin_task(task, x, y, num_valid_classes=n_valid)
    for epoch in range(2):
        logits = torch.zeros(len(y), n_valid)
        # margin grows with the pool position and the epoch: the last samples of each class are best
        logits[torch.arange(len(y)), y] = 1.0 + torch.arange(len(y)).float() % per_class + epoch
        qr.record(logits)
    return qr.end_task()


def test_end_task_budget_balance_and_shrinking():
    qr = QRBuffer(QRConfig(budget=12))
    counts = _run_task(qr, 0, n_classes=2, per_class=10)
    assert counts == {(0, 0): 6, (0, 1): 6}
    counts = _run_task(qr, 1, n_classes=2, per_class=10)
    assert counts == {(0, 0): 3, (0, 1): 3, (1, 0): 3, (1, 1): 3}
    counts = _run_task(qr, 2, n_classes=3, per_class=10)
    assert len(qr) == 12 and sorted(counts.values()) == [1, 1, 2, 2, 2, 2, 2]
    # highest quality kept: margins are 1 + position-in-class + 1 (second epoch): the best are 11, 10, ...
    b = qr.buffer
    for (t, y), n in counts.items():
        sel = (b["task"] == t) & (b["y"] == y)
        assert sorted(b["quality"][sel].tolist(), reverse=True) == [11.0, 10.0][:n]
    assert set(b["num_valid"].tolist()) == {2, 3}


def test_end_task_cil_logits_width_and_per_class_only():
    qr = QRBuffer(QRConfig(budget=None, per_class=2))
    _run_task(qr, 0, n_classes=2, per_class=5)
    counts = _run_task(qr, 1, n_classes=2, per_class=5, cil_offset=2)
    assert counts == {(0, 0): 2, (0, 1): 2, (1, 2): 2, (1, 3): 2}
    b = qr.buffer
    assert b["logits"].shape == (8, 4)
    old = b["task"] == 0
    assert (b["logits"][old, 2:] == 0).all() and b["num_valid"][old].eq(2).all()
    assert b["num_valid"][~old].eq(4).all()


def test_end_task_prefers_correct_samples():
    qr = QRBuffer(QRConfig(budget=2))
    qr.begin_task(0, torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), num_valid_classes=2)
    qr.record(torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]]))
    qr.end_task()
    assert qr.buffer["quality"].tolist() == [2.0, 3.0]


def test_reservoir_selection_budget_and_seed():
    def run(seed):
        qr = QRBuffer(QRConfig(budget=7, selection="reservoir", seed=seed))
        for t in range(3):
            _run_task(qr, t, n_classes=2, per_class=6)
            assert len(qr) == min(7, 12 * (t + 1))
        return qr.buffer["x"]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_random_selection_is_class_balanced_but_not_best_first():
    def run(seed):
        qr = QRBuffer(QRConfig(budget=12, selection="random", seed=seed))
        counts = [_run_task(qr, t, n_classes=2, per_class=10) for t in range(2)]
        return qr, counts

    qr, counts = run(0)
    # the same quotas as "balanced": 6 per class, then 3 per class of both tasks
    assert counts[0] == {(0, 0): 6, (0, 1): 6}
    assert counts[1] == {(0, 0): 3, (0, 1): 3, (1, 0): 3, (1, 1): 3}
    # within a class the kept samples are a random draw, not the highest-quality ones
    # (balanced keeps qualities 11, 10, 9 of each class; see the test above)
    kept = [
        sorted(qr.buffer["quality"][(qr.buffer["task"] == t) & (qr.buffer["y"] == y)].tolist())
        for t, y in counts[1]
    ]
    assert any(q != [9.0, 10.0, 11.0] for q in kept)
    # a class's quota shrinking keeps a subset of what it held: each sample keeps its random key
    first = QRBuffer(QRConfig(budget=12, selection="random", seed=0))
    _run_task(first, 0, n_classes=2, per_class=10)
    before = {tuple(x) for x in first.buffer["x"].tolist()}
    assert {tuple(x) for x in qr.buffer["x"][qr.buffer["task"] == 0].tolist()} <= before
    assert torch.equal(run(0)[0].buffer["x"], qr.buffer["x"])
    assert not torch.equal(run(1)[0].buffer["x"], qr.buffer["x"])


def test_end_task_requires_records_and_pool():
    qr = QRBuffer()
    with pytest.raises(RuntimeError, match="begin_task"):
        qr.end_task()
    qr.begin_task(0, torch.zeros(2, 3), torch.tensor([0, 1]), 2)
    with pytest.raises(RuntimeError, match="record"):
        qr.end_task()
    with pytest.raises(ValueError, match="labels"):
        qr.begin_task(1, torch.zeros(2, 3), torch.tensor([0, 5]), 2)


def test_pool_per_class():
    qr = QRBuffer(QRConfig(budget=20, pool_factor=2.0))
    assert qr.pool_per_class(4) == 10
    assert QRBuffer(QRConfig(budget=100, per_class=3, pool_factor=1.5)).pool_per_class(2) == 5


# ------------------------------------------------------------------------------------------------ replay


def _filled_buffer(**cfg) -> QRBuffer:
    qr = QRBuffer(QRConfig(budget=16, **cfg))
    _run_task(qr, 0, n_classes=2, per_class=6)
    _run_task(qr, 1, n_classes=3, per_class=6)
    return qr


def test_sample_is_deterministic_for_a_seed():
    qr = _filled_buffer()
    a = qr.sample(5, torch.Generator().manual_seed(7))
    b = qr.sample(5, torch.Generator().manual_seed(7))
    c = qr.sample(5, torch.Generator().manual_seed(8))
    assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x) and torch.equal(a.logits, b.logits)
    assert not torch.equal(a.index, c.index)
    assert len(set(a.index.tolist())) == 5  # without replacement
    assert qr.sample(40, torch.Generator().manual_seed(0)).x.shape[0] == 40  # with replacement
    assert torch.equal(a.mask, torch.arange(a.logits.shape[1])[None] < a.num_valid[:, None])


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_replay_loss_wider_cil_student(loss):
    qr = _filled_buffer(loss=loss, ce_weight=0.5, lambda_replay=2.0)
    batch = qr.sample(8, torch.Generator().manual_seed(0))
    width = batch.logits.shape[1]
    student = torch.randn(8, width)
    ref = qr.replay_loss(student, batch)
    wider = torch.cat([student, torch.randn(8, 4) * 50], dim=1)  # new classes the stored logits never saw
    got = qr.replay_loss(wider, batch)
    assert set(got) == {"qr", "qr_ce"}
    assert got["qr"].item() == pytest.approx(ref["qr"].item(), rel=1e-6)  # distillation: old classes only
    # cross-entropy spans every current class: large new-class logits on old samples are penalised
    assert got["qr_ce"].item() == pytest.approx(0.5 * F.cross_entropy(wider, batch.y).item(), rel=1e-6)
    assert got["qr_ce"].item() > ref["qr_ce"].item()
    distill = create_distill_loss(loss, **({"temperature": 2.0} if loss == "kl" else {}))
    assert ref["qr"].item() == pytest.approx(
        2.0 * distill(student, batch.logits, batch.mask).item(), rel=1e-6
    )


@pytest.mark.parametrize("new_classes", [1, 2, 5])
def test_classes_weighting_scales_both_terms_by_buffer_over_new_classes(new_classes):
    fixed = _filled_buffer(ce_weight=0.5, lambda_replay=2.0)
    scaled = _filled_buffer(ce_weight=0.5, lambda_replay=2.0, weighting="classes")
    assert len(scaled.class_counts()) == 5  # (task 0: 2 classes) + (task 1: 3 classes)
    batch = fixed.sample(8, torch.Generator().manual_seed(0))
    student = torch.randn(8, batch.logits.shape[1] + 2)
    ref, got = fixed.replay_loss(student, batch, new_classes), scaled.replay_loss(student, batch, new_classes)
    assert fixed.replay_weight(new_classes) == 1.0 and scaled.replay_weight(new_classes) == 5 / new_classes
    for k in ("qr", "qr_ce"):
        assert got[k].item() == pytest.approx(5 / new_classes * ref[k].item(), rel=1e-6)
    # without the new task's class count the weights stay as configured
    assert scaled.replay_loss(student, batch)["qr"].item() == pytest.approx(ref["qr"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="weighting 'balanced' is unknown; valid: fixed, classes"):
        QRConfig(weighting="balanced")


def test_replay_loss_padded_til_student_matches_per_task():
    qr = _filled_buffer()
    batch = qr.sample(10, torch.Generator().manual_seed(1))
    assert set(batch.task.tolist()) == {0, 1}
    student = torch.full((10, 3), PAD)
    for i, nv in enumerate(batch.num_valid.tolist()):
        student[i, :nv] = torch.randn(nv)
    got = qr.replay_loss(student, batch)["qr"]
    per = [
        kl_distill(student[i : i + 1, :nv], batch.logits[i : i + 1, :nv]).item()
        for i, nv in enumerate(batch.num_valid.tolist())
    ]
    assert got.item() == pytest.approx(sum(per) / len(per), rel=1e-5)
    assert "qr_ce" not in qr.replay_loss(student, batch)
    with pytest.raises(ValueError, match="columns"):
        qr.replay_loss(student[:, :2], batch)


def test_gradients_flow_to_student_only():
    qr = _filled_buffer(ce_weight=1.0)
    batch = qr.sample(6, torch.Generator().manual_seed(0))
    student = torch.randn(6, 5, requires_grad=True)
    qr.replay_loss(student, batch)["qr"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    width = batch.logits.shape[1]
    assert width < 5 and (student.grad[:, width:] == 0).all()  # distillation: columns no sample knows
    assert (student.grad[:, :width][~batch.mask] == 0).all()
    student.grad = None
    qr.replay_loss(student, batch)["qr_ce"].backward()
    assert (student.grad[:, width:] != 0).all()  # cross-entropy pushes new classes down on old samples
    assert all(not t.requires_grad for t in qr.buffer.values())
    assert not qr._bank or all(not b.requires_grad for b in qr._bank.values())
    # the in-task term: the bank entry is a constant
    logits = torch.randn(4, 3, requires_grad=True)
    qr.update_bank(logits, torch.tensor([0, 1, 2, 0]), task=2)
    qr.update_bank(torch.eye(3) * 5, torch.arange(3), task=2)
    qr.in_task_loss(logits, torch.tensor([0, 1, 2, 0]), task=2).backward()
    assert logits.grad is not None and not qr._bank[2].requires_grad


# ---------------------------------------------------------------------------------------- checkpointing


def test_state_dict_round_trip_through_safetensors_and_json(tmp_path):
    qr = _filled_buffer(ce_weight=0.3)
    qr.update_bank(torch.eye(3) * 4, torch.arange(3), task=1)
    # an open pool with records is part of the state too
    qr.begin_task(2, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), num_valid_classes=7)
    qr.record(torch.randn(4, 7))
    state = qr.state_dict()
    save_file(state["tensors"], tmp_path / "qr.safetensors")
    (tmp_path / "qr.json").write_text(json.dumps(state["meta"]))

    restored = QRBuffer(QRConfig(budget=16, ce_weight=0.3))
    restored.load_state_dict(
        {
            "tensors": load_file(tmp_path / "qr.safetensors"),
            "meta": json.loads((tmp_path / "qr.json").read_text()),
        }
    )
    assert len(restored) == len(qr) and restored.class_counts() == qr.class_counts()
    for k, v in qr.buffer.items():
        assert torch.equal(restored.buffer[k], v), k
    for k, v in qr.pool.items():
        assert torch.equal(restored.pool[k], v), k
    assert torch.equal(restored._bank[1], qr._bank[1]) and restored.running_ce(1) == qr.running_ce(1)
    # the internal generator is restored: the next default sample is the same
    a, b = qr.sample(6), restored.sample(6)
    assert torch.equal(a.index, b.index)
    student = torch.randn(6, 5)
    la, lb = qr.replay_loss(student, a), restored.replay_loss(student, b)
    assert all(torch.equal(la[k], lb[k]) for k in la)
    logits = torch.randn(3, 3)
    assert torch.equal(
        qr.in_task_loss(logits, torch.arange(3), 1), restored.in_task_loss(logits, torch.arange(3), 1)
    )
    # both finish the task identically
    assert qr.end_task() == restored.end_task()


def test_load_state_rejects_unknown_tensors():
    qr = _filled_buffer()
    state = qr.state_dict()
    state["tensors"]["buffer.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        QRBuffer(QRConfig(budget=16)).load_state_dict(state)


def test_empty_state_round_trip(tmp_path):
    state = QRBuffer().state_dict()
    save_file(state["tensors"], tmp_path / "s.safetensors")
    fresh = QRBuffer()
    fresh.load_state_dict(
        {"tensors": load_file(tmp_path / "s.safetensors"), "meta": json.loads(json.dumps(state["meta"]))}
    )
    assert len(fresh) == 0 and fresh.nbytes() == 0


def test_nbytes_matches_stored_tensors():
    qr = _filled_buffer()
    b = qr.buffer
    n = len(qr)
    w = b["logits"].shape[1]
    # x float32 (3 features), y/task/num_valid int64, logits float32, quality/key float32
    assert qr.nbytes() == n * (3 * 4 + 3 * 8 + w * 4 + 2 * 4)
    assert qr.nbytes() == sum(t.numel() * t.element_size() for t in b.values())


# -------------------------------------------------------------------------------------- uint8 storage


def test_uint8_codes_restore_each_sample_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8) * torch.tensor([0.5, 1, 2, 4, 8, 16]).reshape(6, 1, 1, 1)
    x[5] = 1.25  # a constant sample restores exactly
    codes, low_step = quantize_uint8(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and low_step.shape == (6, 2)
    back = dequantize_uint8(codes, low_step)
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).reshape(6, 1, 1, 1)
    assert ((back - x).abs() <= span / 510 + 1e-6).all()
    assert torch.equal(back[5], x[5])
    assert (
        codes[:5].reshape(5, -1).amin(dim=1).eq(0).all()
        and codes[:5].reshape(5, -1).amax(dim=1).eq(255).all()
    )


def _images_buffer(storage: str) -> QRBuffer:
    qr = QRBuffer(QRConfig(budget=8, storage=storage))
    torch.manual_seed(1)
    for task in range(2):
        y = torch.tensor([0, 0, 1, 1, 0, 1])
        qr.begin_task(task, torch.randn(6, 3, 8, 8), y, num_valid_classes=2)
        qr.record(F.one_hot(y, 2).float() * 3)
        qr.end_task()
    return qr


def test_uint8_storage_is_four_times_smaller_and_samples_close_images(tmp_path):
    full, small = _images_buffer("float32"), _images_buffer("uint8")
    assert small.buffer["x"].dtype == torch.uint8 and "x_range" not in full.buffer
    assert small.nbytes() < full.nbytes() - 0.7 * full.buffer["x"].numel() * 4
    a = full.sample(5, torch.Generator().manual_seed(3))
    b = small.sample(5, torch.Generator().manual_seed(3))
    assert torch.equal(a.index, b.index) and torch.equal(a.logits, b.logits) and b.x.dtype == torch.float32
    span = (a.x.amax(dim=(1, 2, 3)) - a.x.amin(dim=(1, 2, 3))).reshape(5, 1, 1, 1)
    assert ((a.x - b.x).abs() <= span / 510 + 1e-6).all() and not torch.equal(a.x, b.x)
    # a checkpoint of either storage loads into the other, converted to the loading config's
    for src, dst in ((small, "float32"), (full, "uint8"), (small, "uint8")):
        state = src.state_dict()
        save_file(state["tensors"], tmp_path / "qr.safetensors")
        restored = QRBuffer(QRConfig(budget=8, storage=dst))
        restored.load_state_dict({"tensors": load_file(tmp_path / "qr.safetensors"), "meta": state["meta"]})
        assert restored.buffer["x"].dtype == (torch.uint8 if dst == "uint8" else torch.float32)
        x = restored.sample(4, torch.Generator().manual_seed(0)).x
        assert torch.allclose(x, full.sample(4, torch.Generator().manual_seed(0)).x, atol=0.05)
    broken = small.state_dict()
    del broken["tensors"]["buffer.x_range"]
    with pytest.raises(ValueError, match="incomplete buffer"):
        QRBuffer(QRConfig(budget=8, storage="uint8")).load_state_dict(broken)


def test_sample_augments_the_replayed_images_not_the_stored_ones():
    plain = _images_buffer("float32")
    stored = plain.buffer["x"].clone()
    aug = QRBuffer(QRConfig(budget=8, augment="crop"))
    aug.load_state_dict(plain.state_dict())
    a = plain.sample(5, torch.Generator().manual_seed(3))
    b = aug.sample(5, torch.Generator().manual_seed(3))
    # the same samples and records, only their images differ: each a crop of the stored one
    assert torch.equal(a.index, b.index) and torch.equal(a.logits, b.logits)
    assert b.x.shape == a.x.shape and not torch.allclose(b.x, a.x)
    assert torch.equal(aug.buffer["x"], stored)
    assert torch.equal(b.x, aug.sample(5, torch.Generator().manual_seed(3)).x)
    with pytest.raises(ValueError, match="augment 'flip' is unknown; valid: none, crop, crop_flip"):
        QRConfig(budget=8, augment="flip")


def test_refresh_keeps_the_better_record_on_each_sample_s_own_columns():
    qr = QRBuffer(QRConfig(budget=8, selection="reservoir"))
    _run_task(qr, 0, n_classes=2, per_class=4)  # 2 valid columns
    _run_task(qr, 1, n_classes=3, per_class=4, cil_offset=2)  # 5 valid columns
    b = qr.buffer
    before_logits, before_quality = b["logits"].clone(), b["quality"].clone()
    n, width = len(qr), b["logits"].shape[1]
    assert width == 5 and sorted(set(b["num_valid"].tolist())) == [2, 5]
    old_task = b["num_valid"] == 2
    wrong = int(old_task.nonzero()[0])
    new = torch.zeros(n, width + 1)  # one extra column: ignored
    new[torch.arange(n), b["y"]] = before_quality + 1.0  # every margin grows by 1 ...
    new[old_task, width - 1] = 50.0  # ... and a task-0 sample is judged without this later column
    new[wrong] = 0.0
    new[wrong, 1 - b["y"][wrong]] = 1.0  # now wrong: never replaces a correct record
    replaced = qr.refresh(new)
    b = qr.buffer
    improved = torch.ones(n, dtype=torch.bool)
    improved[wrong] = False
    assert replaced == n - 1
    assert torch.equal(b["quality"][improved], before_quality[improved] + 1.0)
    assert torch.equal(b["logits"][old_task & improved, 2:], torch.zeros(int(old_task.sum()) - 1, 3))
    assert torch.equal(b["logits"][wrong], before_logits[wrong])
    assert b["quality"][wrong] == before_quality[wrong]
    # chunked by indices, and shapes checked
    assert qr.refresh(new[:2], indices=torch.tensor([0, 1])) == 0
    with pytest.raises(ValueError, match=r"refresh\(\) expects logits of shape \(8, >= 5\); got \(8, 4\)"):
        qr.refresh(torch.zeros(n, 4))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 8\)"):
        qr.refresh(torch.zeros(1, 5), indices=torch.tensor([8]))


def test_refresh_latest_replaces_every_record_and_widens_class_incremental_ones():
    qr = QRBuffer(QRConfig(budget=8, selection="reservoir", refresh_keep="latest"))
    _run_task(qr, 0, n_classes=2, per_class=4)
    _run_task(qr, 1, n_classes=3, per_class=4, cil_offset=2)
    b = qr.buffer
    n, y = len(qr), b["y"].clone()
    assert sorted(set(b["num_valid"].tolist())) == [2, 5]
    new = torch.zeros(n, 5)
    new[torch.arange(n), (y + 1) % 5] = 1.0  # every sample now wrong: "best" would keep them all
    assert qr.refresh(new.clone()) == n
    b = qr.buffer
    assert torch.equal(b["quality"], torch.full((n,), float("-inf")))
    # without widen a record keeps its own columns; the rest are zeroed as stored
    old_task = b["num_valid"] == 2
    assert torch.equal(b["logits"][~old_task], new[~old_task])
    assert torch.equal(b["logits"][old_task, 2:], torch.zeros(int(old_task.sum()), 3))
    # widen: a head grown to 7 classes since; every record takes all 7 columns
    wide = torch.randn(n, 7)
    assert qr.refresh(wide, widen=True) == n
    b = qr.buffer
    assert b["logits"].shape == (n, 7) and torch.equal(b["logits"], wide)
    assert b["num_valid"].tolist() == [7] * n
    batch = qr.sample(4, generator=torch.Generator().manual_seed(0))
    assert batch.logits.shape == (4, 7) and bool(batch.mask.all())
    with pytest.raises(ValueError, match=r"refresh_keep 'last' is unknown; valid: best, latest"):
        QRConfig(refresh_keep="last")


@pytest.mark.parametrize("mode", ["correct", "confidence"])
def test_distill_weight_counts_each_sample_by_its_stored_record(mode):
    uniform = _filled_buffer(selection="reservoir")
    weighted = _filled_buffer(selection="reservoir", distill_weight=mode)
    batch = uniform.sample(8, torch.Generator().manual_seed(2))
    # make two stored records wrong on their own columns (the padding column stays out of it)
    wrong = torch.tensor([0, 3])
    batch.logits[wrong] = -batch.logits[wrong]
    batch.logits[~batch.mask] = 0.0
    student = torch.randn(8, batch.logits.shape[1])
    got = weighted.replay_loss(student, batch)["qr"]
    per = torch.stack(
        [
            kl_distill(student[i : i + 1, :nv], batch.logits[i : i + 1, :nv])
            for i, nv in enumerate(batch.num_valid.tolist())
        ]
    )
    if mode == "correct":
        w = torch.ones(8)
        w[wrong] = 0.0
    else:
        w = torch.stack(
            [batch.logits[i, :nv].softmax(0)[batch.y[i]] for i, nv in enumerate(batch.num_valid.tolist())]
        )
        assert bool((w[wrong] < 0.5).all()) and bool((w[1:3] > 0.5).all())
    assert got.item() == pytest.approx((w * per).mean().item(), rel=1e-5)
    assert got.item() < uniform.replay_loss(student, batch)["qr"].item() + 1e-6
    with pytest.raises(
        ValueError, match="distill_weight 'best' is unknown; valid: uniform, correct, confidence"
    ):
        QRConfig(distill_weight="best")


def test_record_quality_counts_wrong_records_on_each_sample_s_own_columns():
    qr = QRBuffer(QRConfig(budget=8, selection="reservoir"))
    assert qr.record_quality() is None
    _run_task(qr, 0, n_classes=2, per_class=4)  # 2 valid columns
    _run_task(qr, 1, n_classes=3, per_class=4, cil_offset=2)  # 5 valid columns
    b = qr.buffer
    # every stored record is right: true logit = margin, the other valid columns 0
    q, nv = b["quality"], b["num_valid"].float()
    expected_prob = torch.exp(q) / (torch.exp(q) + nv - 1)
    rec = qr.record_quality()
    assert rec["records"] == len(qr) == 8 and rec["wrong"] == 0.0
    assert rec["true_class_probability"] == pytest.approx(float(expected_prob.mean()), rel=1e-5)
    assert {t: r["records"] for t, r in rec["per_task"].items()} == {
        str(t): int((b["task"] == t).sum()) for t in (0, 1)
    }
    # make one task-0 record wrong, and give it a large logit on a column it does not own
    state = qr.state_dict()
    logits = state["tensors"]["buffer.logits"]
    i = int((b["task"] == 0).nonzero()[0])
    y = int(b["y"][i])
    logits[i, :2] = 0.0
    logits[i, 1 - y] = 3.0
    logits[i, 4] = 100.0  # a later task's column: ignored
    qr.load_state_dict(state)
    rec = qr.record_quality()
    n0 = rec["per_task"]["0"]["records"]
    assert rec["wrong"] == pytest.approx(1 / 8) and rec["per_task"]["0"]["wrong"] == pytest.approx(1 / n0)
    assert rec["per_task"]["1"]["wrong"] == 0.0
    new_prob = expected_prob.clone()
    new_prob[i] = 1 / (1 + math.exp(3.0))
    assert rec["true_class_probability"] == pytest.approx(float(new_prob.mean()), rel=1e-5)
