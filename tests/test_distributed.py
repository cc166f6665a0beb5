"""torchrun with 2 CPU processes (gloo): same consolidated weights on every rank, accuracy close to 1."""

import json
import os
import subprocess
import sys

import pytest
from test_runner import TINY

from cmtl.config import load_config

EXTRA = ["strategy.epochs=3", "scenario.max_per_class=40", "scenario.max_test_per_class=30"]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_single_process(tmp_path):
    from cmtl.runner import run_experiment

    sets = sum((["--set", s] for s in [*TINY, *EXTRA]), [])
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "cmtl", "run", *sets, "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2
    assert res["distributed"]["ranks_identical"], res["distributed"]
    assert (out / "snapshot" / "model.safetensors").is_file()
    assert not list(out.glob("rank*")), "only rank 0 writes"

    single = run_experiment(load_config(None, [*TINY, *EXTRA]), out=tmp_path / "single", echo=lambda m: None)
    assert single["world_size"] == 1
    # each rank sees half the data per epoch (twice the effective batch): close, not equal
    assert abs(res["final_average_accuracy"] - single["final_average_accuracy"]) < 0.15, (
        res["accuracy_matrix"],
        single["accuracy_matrix"],
    )
