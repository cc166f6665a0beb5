"""The diagnostic scripts in benchmarks/ that read finished runs (not timed, not the benchmarks)."""

import importlib.util
import json
from pathlib import Path

import pytest
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
