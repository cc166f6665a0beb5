"""Task streams: registry, label conventions (TIL local / CIL global), options, every builder, and an
Avalanche `Naive` smoke run. Tiny data only, no network, nothing from /work/shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cmtl.scenarios import IMAGENET_MEAN, IMAGENET_STD, TaskStream, create_scenario, list_scenarios
from PIL import Image
from torch.utils.data import DataLoader

SIZE = 16  # small images keep the tests fast


def _batch(dataset, n=64):
    return next(iter(DataLoader(dataset, batch_size=n, shuffle=False)))


def _all_targets(exp) -> list[int]:
    return [int(t) for t in exp.dataset.targets]


def _write_npz(path, n_classes=4, per_class=6, channels=None, size=10, classes=True, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels is None else (size, size, channels)

    def split(n):
        y = np.repeat(np.arange(n_classes), n)
        x = rng.integers(0, 256, size=(len(y), *shape), dtype=np.uint8)
        return x, y.astype(np.int64)

    x_train, y_train = split(per_class)
    x_test, y_test = split(2)
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    if classes:
        arrays["classes"] = np.array([f"{path.stem}_{c}" for c in range(n_classes)])
    np.savez(path, **arrays)
    return path


def _write_pngs(folder, classes=("cat", "dog", "fox"), per_class=5, size=12, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size + 3, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i}.png")
    return folder


# --- registry -------------------------------------------------------------------------------------


def test_registry_lists_builders_and_rejects_unknown():
    names = list_scenarios()
    for name in ("digits", "npz", "image_folder", "torchvision", "multi_dataset"):
        assert name in names
    with pytest.raises(ValueError, match="digits.*image_folder.*multi_dataset.*npz.*torchvision"):
        create_scenario("digitz")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"mode": "xil"}, "mode 'xil'.*til, cil"),
        ({"n_task": 5}, "unknown scenario option 'n_task'.*did you mean 'n_tasks'"),
        ({"n_tasks": 3}, "10 classes cannot be split evenly into n_tasks=3"),
        ({"classes_per_task": [4, 4, 4]}, "need 12 classes but the data set has 10"),
        ({"image_size": 0}, "image_size must be a positive int"),
        ({"mean": (0.5, 0.5)}, "mean must be 3 numbers"),
        ({"max_per_class": -1}, "max_per_class"),
        ({"test_fraction": 1.5}, "test_fraction"),
    ],
)
def test_bad_options_name_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        create_scenario("digits", **options)


# --- digits: label conventions ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_til() -> TaskStream:
    return create_scenario("digits", mode="til", image_size=SIZE, max_test_per_class=8)


def test_digits_til_local_labels_and_task_ids(digits_til):
    s = digits_til
    bm = s.benchmark
    assert s.mode == "til" and s.num_tasks == 5 and s.classes_per_task == [2] * 5
    assert s.task_classes == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"], ["8", "9"]]
    assert len(bm.train_stream) == 5 and len(bm.test_stream) == 5
    for i, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream)):
        assert tr.task_label == i and te.task_label == i
        assert sorted(tr.classes_in_this_experience) == [0, 1]
        assert set(_all_targets(tr)) == {0, 1} and set(_all_targets(te)) == {0, 1}
        x, y, t = _batch(te.dataset)
        assert set(t.tolist()) == {i}
        assert set(y.tolist()) <= {0, 1}
    # 1797 images, 30% held out per class; the test set is capped at 8 per class
    assert sum(len(e.dataset) for e in bm.train_stream) == pytest.approx(1797 * 0.7, abs=10)
    assert all(len(e.dataset) == 16 for e in bm.test_stream)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of a batch and return channel 0 as uint8 N x H x W."""
    raw = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return (raw[:, 0] * 255).round().to(torch.uint8)


@pytest.mark.parametrize("mode, seed", [("til", None), ("cil", 5)])
def test_digits_targets_name_the_right_images(mode, seed):
    """Label k of experience i holds images of digit task_classes[i][k] (checked pixel-exactly)."""
    from cmtl.scenarios.digits import digits_arrays

    images, digits = digits_arrays(SIZE)
    by_digit = {str(d): {img.tobytes() for img in images[digits == d]} for d in range(10)}
    s = create_scenario("digits", mode=mode, class_order_seed=seed, image_size=SIZE, max_test_per_class=4)
    offset = 0
    for i, exp in enumerate(s.benchmark.test_stream):
        x, y, _ = _batch(exp.dataset)
        for img, label in zip(_to_uint8(x), y.tolist()):
            local = label if mode == "til" else label - offset
            assert img.numpy().tobytes() in by_digit[s.task_classes[i][local]]
        offset += s.classes_per_task[i]


def test_digits_cil_global_labels():
    s = create_scenario("digits", mode="cil", image_size=SIZE, max_per_class=5, max_test_per_class=3)
    seen = []
    for i, (tr, te) in enumerate(zip(s.benchmark.train_stream, s.benchmark.test_stream)):
        assert tr.task_label == 0 and te.task_label == 0
        assert sorted(tr.classes_in_this_experience) == [2 * i, 2 * i + 1]
        assert sorted(set(_all_targets(te))) == [2 * i, 2 * i + 1]
        _, _, t = _batch(tr.dataset)
        assert set(t.tolist()) == {0}
        seen += sorted(tr.classes_in_this_experience)
    assert seen == list(range(10))


def test_digits_tensors_normalised_and_transform_groups(digits_til):
    exp = digits_til.benchmark.train_stream[0]
    x_eval, y_eval, _ = _batch(exp.dataset.eval())
    assert x_eval.dtype == torch.float32 and x_eval.shape[1:] == (3, SIZE, SIZE)
    raw = x_eval * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 0], raw[:, 2], atol=1e-5)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # grey repeated to RGB, in [0, 1] before normalising
    # background pixels are 0 -> (0 - mean) / std after normalisation
    expected_min = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(x_eval.amin(dim=(0, 2, 3)), expected_min, atol=1e-5)
    # the eval group is deterministic; the train group augments
    x_eval2, _, _ = _batch(exp.dataset.eval())
    assert torch.equal(x_eval, x_eval2)
    x_train, y_train, _ = _batch(exp.dataset.train())
    assert torch.equal(y_train, y_eval)
    assert not torch.allclose(x_train, x_eval)


def test_test_stream_never_augments(digits_til):
    exp = digits_til.benchmark.test_stream[0]
    a, _, _ = _batch(exp.dataset.train())
    b, _, _ = _batch(exp.dataset.eval())
    assert torch.equal(a, b)


def test_augment_off_gives_identical_groups():
    s = create_scenario("digits", image_size=SIZE, augment=False, max_per_class=4)
    exp = s.benchmark.train_stream[0]
    assert torch.equal(_batch(exp.dataset.train())[0], _batch(exp.dataset.eval())[0])


def test_custom_mean_std_and_size():
    s = create_scenario("digits", image_size=24, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], max_per_class=3)
    assert s.image_size == 24 and s.mean == (0.5, 0.5, 0.5)
    x, _, _ = _batch(s.benchmark.train_stream[0].dataset.eval())
    assert x.shape[1:] == (3, 24, 24) and x.min() >= -1.0 and x.max() <= 1.0


def test_class_order_seed_is_deterministic():
    kw = dict(image_size=8, max_per_class=2, max_test_per_class=1)
    natural = create_scenario("digits", **kw).task_classes
    a = create_scenario("digits", class_order_seed=3, **kw).task_classes
    b = create_scenario("digits", class_order_seed=3, **kw).task_classes
    c = create_scenario("digits", class_order_seed=4, **kw).task_classes
    assert a == b and a != natural and a != c
    assert sorted(sum(a, [])) == [str(d) for d in range(10)]


def test_class_order_seed_labels_follow_order():
    """In CIL with a permuted order, global label k is the k-th class of the concatenated order."""
    s = create_scenario("digits", mode="cil", class_order_seed=7, image_size=8, max_per_class=2)
    order = sum(s.task_classes, [])
    exp = s.benchmark.train_stream[0]
    assert sorted(exp.classes_in_this_experience) == [0, 1]
    assert s.task_classes[0] == order[:2]


def test_max_per_class_caps_counts():
    s = create_scenario("digits", mode="cil", image_size=8, max_per_class=7, max_test_per_class=2)
    for tr, te in zip(s.benchmark.train_stream, s.benchmark.test_stream):
        counts = np.bincount(_all_targets(tr))
        assert counts[counts > 0].tolist() == [7, 7]
        assert len(te.dataset) == 4
    again = create_scenario("digits", mode="cil", image_size=8, max_per_class=7, max_test_per_class=2)
    x1 = _batch(s.benchmark.train_stream[0].dataset.eval())[0]
    x2 = _batch(again.benchmark.train_stream[0].dataset.eval())[0]
    assert torch.equal(x1, x2)


@pytest.mark.parametrize(
    "options, sizes",
    [
        ({"n_tasks": 2}, [5, 5]),
        ({"classes_per_task": 3}, [3, 3, 3]),
        ({"classes_per_task": [4, 3, 3]}, [4, 3, 3]),
        ({"n_tasks": 2, "classes_per_task": 4}, [4, 4]),
    ],
)
def test_task_sizes(options, sizes):
    s = create_scenario("digits", image_size=8, max_per_class=2, max_test_per_class=1, **options)
    assert s.classes_per_task == sizes and len(s.benchmark.train_stream) == len(sizes)


# --- npz ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_shapes(tmp_path, channels):
    path = _write_npz(tmp_path / "toy.npz", channels=channels)
    s = create_scenario("npz", path=str(path), n_tasks=2, image_size=SIZE, mode="til")
    assert s.task_classes == [["toy_0", "toy_1"], ["toy_2", "toy_3"]]
    exp = s.benchmark.train_stream[1]
    assert exp.task_label == 1 and len(exp.dataset) == 12
    x, y, t = _batch(exp.dataset)
    assert x.shape == (12, 3, SIZE, SIZE) and set(y.tolist()) == {0, 1} and set(t.tolist()) == {1}


def _image_bytes(stream_split) -> list[bytes]:
    return [
        bytes(img.numpy().tobytes()) for exp in stream_split for img in _batch(exp.dataset.eval(), 1000)[0]
    ]


def test_validation_split_holds_out_training_images_and_never_reads_test(tmp_path):
    path = _write_npz(tmp_path / "toy.npz", per_class=10)
    kw = dict(path=str(path), n_tasks=2, image_size=SIZE, flip=False, augment=False)
    full = create_scenario("npz", **kw)  # every train and test image, as the model sees them
    train_all, test_all = (
        set(_image_bytes(full.benchmark.train_stream)),
        set(_image_bytes(full.benchmark.test_stream)),
    )
    s = create_scenario("npz", validation_per_class=3, max_per_class=5, **kw)
    assert full.evaluation == "test" and s.evaluation == "validation"
    for tr, va in zip(s.benchmark.train_stream, s.benchmark.test_stream):
        assert np.bincount(_all_targets(tr)).tolist() == [5, 5] and np.bincount(
            _all_targets(va)
        ).tolist() == [3, 3]
    train, held = _image_bytes(s.benchmark.train_stream), _image_bytes(s.benchmark.test_stream)
    assert set(held) <= train_all and not set(held) & test_all  # from the training split only
    assert not set(held) & set(train)  # and never trained on
    again = create_scenario("npz", validation_per_class=3, max_per_class=5, **kw)
    assert _image_bytes(again.benchmark.test_stream) == held  # seeded
    other = create_scenario("npz", validation_per_class=3, max_per_class=5, seed=1, **kw)
    assert _image_bytes(other.benchmark.test_stream) != held


def test_validation_indices_leave_streams_without_it_unchanged():
    from cmtl.scenarios.stream import subsample_per_class, train_validation_indices

    targets = np.repeat(np.arange(3), 20)
    train, held = train_validation_indices(targets, 1, 8, None, seed=4)
    assert held.size == 0 and np.array_equal(train, subsample_per_class(targets, 1, 8, 4, salt=0))
    train, held = train_validation_indices(targets, 1, None, 6, seed=4)
    assert len(held) == 6 and len(train) == 14 and set(train) | set(held) == set(range(20, 40))
    with pytest.raises(ValueError, match="validation_per_class=20 leaves no training images of class 1"):
        train_validation_indices(targets, 1, None, 20, seed=4)
    with pytest.raises(ValueError, match="validation_per_class must be None or a positive int, got 0"):
        create_scenario("digits", validation_per_class=0)


def test_validation_split_must_cover_every_task_of_a_multi_dataset_stream(tmp_path):
    a, b = _write_npz(tmp_path / "a.npz", per_class=8), _write_npz(tmp_path / "b.npz", per_class=8)
    entries = [{"name": "npz", "path": str(a), "validation_per_class": 2}, {"name": "npz", "path": str(b)}]
    with pytest.raises(ValueError, match="validation_per_class is set for some tasks only"):
        create_scenario("multi_dataset", datasets=entries, image_size=SIZE)
    s = create_scenario(
        "multi_dataset", datasets=[entries[1], entries[0]], image_size=SIZE, validation_per_class=3
    )
    assert s.evaluation == "validation"
    assert [len(e.dataset) for e in s.benchmark.test_stream] == [4 * 3, 4 * 2]  # an entry's own value wins


def test_npz_without_classes_names_labels(tmp_path):
    path = _write_npz(tmp_path / "plain.npz", classes=False)
    s = create_scenario("npz", path=str(path), classes_per_task=2, flip=False)
    assert s.task_classes == [["0", "1"], ["2", "3"]]


def test_npz_errors(tmp_path):
    with pytest.raises(ValueError, match="npz file .*missing.npz.* does not exist"):
        create_scenario("npz", path=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="needs the option 'path'"):
        create_scenario("npz")
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="lacks x_test, y_test"):
        create_scenario("npz", path=str(tmp_path / "bad.npz"))
    x = np.zeros((2, 4, 4), np.float32)
    y = np.zeros(2, np.int64)
    np.savez(tmp_path / "float.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(ValueError, match="must be uint8"):
        create_scenario("npz", path=str(tmp_path / "float.npz"), n_tasks=1)


# --- image_folder -----------------------------------------------------------------------------------


def test_image_folder_held_out_split(tmp_path):
    root = _write_pngs(tmp_path / "pets", classes=("dog", "cat", "fox", "owl"), per_class=5)
    s = create_scenario("image_folder", root=str(root), n_tasks=2, image_size=SIZE, mode="cil")
    assert s.task_classes == [["cat", "dog"], ["fox", "owl"]]  # sorted by name
    assert s.name == "pets"
    tr, te = s.benchmark.train_stream[1], s.benchmark.test_stream[1]
    assert len(tr.dataset) == 8 and len(te.dataset) == 2  # test_fraction 0.2 of 5 per class
    assert sorted(set(_all_targets(tr))) == [2, 3]
    x, _, _ = _batch(tr.dataset)
    assert x.shape == (8, 3, SIZE, SIZE)
    again = create_scenario("image_folder", root=str(root), n_tasks=2, image_size=SIZE, mode="cil")
    files = s.benchmark.test_stream[0].dataset
    assert torch.equal(_batch(files)[0], _batch(again.benchmark.test_stream[0].dataset)[0])


def test_image_folder_train_test_folders(tmp_path):
    _write_pngs(tmp_path / "ds" / "train", classes=("a", "b"), per_class=3)
    _write_pngs(tmp_path / "ds" / "test", classes=("a", "b"), per_class=2, seed=1)
    s = create_scenario("image_folder", root=str(tmp_path / "ds"), n_tasks=2, image_size=SIZE)
    assert s.task_classes == [["a"], ["b"]]
    assert [len(e.dataset) for e in s.benchmark.train_stream] == [3, 3]
    assert [len(e.dataset) for e in s.benchmark.test_stream] == [2, 2]
    assert s.benchmark.test_stream[1].task_label == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="root .*nowhere.* does not exist"):
        create_scenario("image_folder", root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        create_scenario("image_folder", root=str(tmp_path / "empty"))
    root = _write_pngs(tmp_path / "r1", classes=("a", "b"), per_class=5)
    (root / "c").mkdir()
    with pytest.raises(ValueError, match="class folder .*r1/c.* has no images"):
        create_scenario("image_folder", root=str(root), n_tasks=1)
    root = _write_pngs(tmp_path / "r2", classes=("a", "b"), per_class=5)
    (root / "b" / "9.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*9.png"):
        create_scenario("image_folder", root=str(root), n_tasks=1)
    root = _write_pngs(tmp_path / "r3", classes=("a", "b"), per_class=2)
    with pytest.raises(ValueError, match="too few .* test images"):
        create_scenario("image_folder", root=str(root), n_tasks=1)
    _write_pngs(tmp_path / "r4" / "train", classes=("a", "b"), per_class=2)
    _write_pngs(tmp_path / "r4" / "test", classes=("a",), per_class=2)
    with pytest.raises(ValueError, match="class 'b' has no test images"):
        create_scenario("image_folder", root=str(tmp_path / "r4"), n_tasks=1)


# --- torchvision -------------------------------------------------------------------------------------


def test_torchvision_absent_data_names_root_and_download(tmp_path):
    (tmp_path / "tv").mkdir()
    for root in (tmp_path / "tv", tmp_path / "absent"):
        with pytest.raises(ValueError, match=f"{root}.*download: true"):
            create_scenario("torchvision", dataset="cifar10", root=str(root))
    with pytest.raises(ValueError, match="unknown torchvision dataset 'cifar11'.*cifar10"):
        create_scenario("torchvision", dataset="cifar11", root=str(tmp_path))


def test_torchvision_reads_dataset_arrays(tmp_path, monkeypatch):
    """Happy path with a stand-in for torchvision's CIFAR10 class (no download)."""
    import torchvision.datasets

    class FakeCIFAR10:
        classes = ["plane", "car", "bird", "cat"]

        def __init__(self, root, train=True, download=False):
            n = 8 if train else 4
            self.data = np.full((n, 6, 6, 3), 128, np.uint8)
            self.targets = [i % 4 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    s = create_scenario("torchvision", dataset="cifar10", root=str(tmp_path), n_tasks=2, image_size=SIZE)
    assert s.task_classes == [["plane", "car"], ["bird", "cat"]]
    x, y, t = _batch(s.benchmark.train_stream[1].dataset)
    assert x.shape == (4, 3, SIZE, SIZE) and set(y.tolist()) == {0, 1} and set(t.tolist()) == {1}


# --- multi_dataset -----------------------------------------------------------------------------------


@pytest.fixture
def two_npz(tmp_path):
    a = _write_npz(tmp_path / "alpha.npz", n_classes=3, per_class=4, channels=None)
    b = _write_npz(tmp_path / "beta.npz", n_classes=2, per_class=5, channels=3, seed=1)
    return [{"name": "npz", "path": str(a), "flip": False}, {"name": "npz", "path": str(b)}]


def test_multi_dataset_til(two_npz):
    s = create_scenario("multi_dataset", datasets=two_npz, mode="til", image_size=SIZE)
    assert s.task_classes == [["alpha_0", "alpha_1", "alpha_2"], ["beta_0", "beta_1"]]
    assert s.name == "alpha+beta"
    for i, (tr, te) in enumerate(zip(s.benchmark.train_stream, s.benchmark.test_stream)):
        assert tr.task_label == i and te.task_label == i
        assert sorted(set(_all_targets(tr))) == list(range(s.classes_per_task[i]))
    x, y, t = _batch(s.benchmark.train_stream[1].dataset)
    assert x.shape == (10, 3, SIZE, SIZE) and set(t.tolist()) == {1}


def test_multi_dataset_cil_offsets_labels(two_npz):
    two_npz[0]["max_per_class"] = 2
    s = create_scenario("multi_dataset", datasets=two_npz, mode="cil", image_size=SIZE)
    tr0, tr1 = s.benchmark.train_stream
    assert tr0.task_label == 0 and tr1.task_label == 0
    assert sorted(tr0.classes_in_this_experience) == [0, 1, 2] and len(tr0.dataset) == 6
    assert sorted(tr1.classes_in_this_experience) == [3, 4]
    assert sorted(set(_all_targets(s.benchmark.test_stream[1]))) == [3, 4]


def test_multi_dataset_mixes_sources_and_disambiguates_names(tmp_path):
    path = _write_npz(tmp_path / "toy.npz", n_classes=2, classes=False)
    datasets = [{"name": "digits", "max_per_class": 2}, {"name": "npz", "path": str(path)}]
    s = create_scenario("multi_dataset", datasets=datasets, mode="cil", image_size=8)
    assert s.task_classes[0][:2] == ["digits/0", "digits/1"] and s.task_classes[1] == ["toy/0", "toy/1"]
    assert sorted(s.benchmark.train_stream[1].classes_in_this_experience) == [10, 11]


@pytest.mark.parametrize(
    "datasets, options, match",
    [
        ([], {}, "non-empty list"),
        ([{"path": "x"}], {}, r"datasets\[0\] must be a mapping with a `name`"),
        ([{"name": "nope"}], {}, "unknown source 'nope'.*digits"),
        ([{"name": "digits", "mode": "cil"}], {}, "'mode' applies to the whole stream"),
        ([{"name": "digits", "pth": "x"}], {}, "unknown datasets\\[0\\] \\(digits\\) option 'pth'"),
        ([{"name": "digits"}], {"classes_per_task": 2}, "one task per entry"),
    ],
)
def test_multi_dataset_errors(datasets, options, match):
    with pytest.raises(ValueError, match=match):
        create_scenario("multi_dataset", datasets=datasets, **options)


# --- Avalanche smoke -------------------------------------------------------------------------------


def _quiet_evaluator():
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])


@pytest.mark.parametrize("mode", ["cil", "til"])
def test_avalanche_naive_smoke(mode):
    from avalanche.models import MultiHeadClassifier, MultiTaskModule
    from avalanche.training import Naive

    s = create_scenario("digits", mode=mode, image_size=8, n_tasks=2, max_per_class=6, max_test_per_class=3)

    class TinyMultiHead(MultiTaskModule):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.ReLU()
            )
            self.head = MultiHeadClassifier(16, initial_out_features=5)

        def forward_single_task(self, x, task_label):
            return self.head(self.body(x), task_label)

    if mode == "til":
        model = TinyMultiHead()
    else:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, s.num_classes))
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=8,
        eval_mb_size=16,
        train_epochs=1,
        evaluator=_quiet_evaluator(),
    )
    for exp in s.benchmark.train_stream:
        strategy.train(exp, num_workers=0)
    results = strategy.eval(s.benchmark.test_stream, num_workers=0)
    accs = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp")]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)


def test_none_means_default_size_and_normalisation():
    s = create_scenario("digits", image_size=None, mean=None, std=None, max_per_class=2, max_test_per_class=1)
    assert (s.image_size, s.mean, s.std) == (32, IMAGENET_MEAN, IMAGENET_STD)
