"""The diagnostic scripts in benchmarks/ (not timed, not the benchmarks themselves)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_runner import _run

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("strategy", ["frozen", "emtal"])
def test_classifier_gap_rebuilds_the_runs_own_evaluation(tmp_path, strategy):
    """`classifier_gap` rebuilds a run's data and model from its directory: its `run` accuracy is the
    run's final accuracy. With a frozen backbone the statistics it takes now are the ones the run
    took, so re-aligning on them lands where the run's last re-fit did."""
    gap = _script("classifier_gap")
    sets = ["scenario.mode=cil", f"strategy.name={strategy}", "strategy.classifier_alignment=true"]
    _, run_dir, _ = _run(tmp_path, *sets, "strategy.alignment_samples=32", "strategy.head_init=probe")
    final = json.loads((run_dir / "results.json").read_text())["final_average_accuracy"]
    row = gap.gap(run_dir)
    assert row["train_per_class"] == 30
    assert row["run_accuracy"] == pytest.approx(100 * final, abs=1e-6)
    if strategy == "frozen":
        assert row["realigned_accuracy"] == pytest.approx(row["run_accuracy"], abs=100 / 120 + 1e-6)
    assert 0 <= row["probe_accuracy"] <= 100


def test_classifier_gap_refuses_a_task_incremental_run(tmp_path):
    gap = _script("classifier_gap")
    _, run_dir, _ = _run(tmp_path)
    with pytest.raises(SystemExit, match="scenario.mode is 'til'; valid: cil"):
        gap.gap(run_dir)


def test_pixel_probe_maps_predictions_back_to_the_tasks_labels():
    """Two separable blobs labelled 7 and 9: the fitted classifier gets all right, in those labels."""
    probe = _script("pixel_probe")
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 5, generator=gen) - 3, torch.randn(40, 5, generator=gen) + 3])
    y = torch.tensor([7] * 40 + [9] * 40)
    model = probe.fit_logistic(x, y)
    assert model[2].tolist() == [7, 9]
    assert probe.accuracy(model, x, y) == 100.0
    assert probe.accuracy(model, x, 16 - y) == 0.0


@pytest.mark.parametrize("mode", ["til", "cil"])
def test_pixel_probe_on_the_embedded_digits_stream(mode):
    """On the same stream `cmtl run` builds (3 tasks, 30 training images per class) a linear model on
    8x8 digits upsampled to 16 px classifies each task's test images far above chance."""
    from test_runner import TINY

    from cmtl.config import load_config

    probe = _script("pixel_probe")
    row = probe.probe(load_config(None, [*TINY, f"scenario.mode={mode}"]))
    assert row["mode"] == mode and row["evaluated_on"] == "test"
    assert row["train_per_class"] == 30
    assert len(row["task_accuracy"]) == 3
    assert row["final_average_accuracy"] == pytest.approx(sum(row["task_accuracy"]) / 3)
    assert min(row["task_accuracy"]) > (80 if mode == "til" else 60)


def test_pixel_probe_cli_bad_key_exits_2_with_one_line(tmp_path, capsys):
    probe = _script("pixel_probe")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 0\n")
    out = tmp_path / "rows.json"
    assert probe.main([str(cfg), "--set", "scenario.mode=both", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "both" in err and "til" in err
    assert not out.exists()


def test_pixel_probe_sizes_images_as_the_run_does_without_building_the_model():
    """`scenario.image_size: null` means the model's size: its `img_size` keyword, else timm's
    pretrained config (whose normalisation it takes too); a model with neither is a bad input."""
    from test_runner import TINY

    from cmtl.config import ConfigError, load_config

    probe = _script("pixel_probe")
    assert probe.input_format(load_config(None, TINY))[0] == 16
    size, mean, std = probe.input_format(
        load_config(None, ["model.name=vit_base_patch16_224", "model.kwargs={}"])
    )
    assert (size, mean, std) == (224, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="'not_a_timm_model' has no known input size"):
        probe.input_format(load_config(None, ["model.name=not_a_timm_model", "model.kwargs={}"]))
