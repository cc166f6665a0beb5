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


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively, from /proc (torchrun puts workers in their own groups)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.slow
def test_torchrun_run_killed_then_resumed_matches_uninterrupted(tmp_path):
    import signal
    import time

    sets = sum((["--set", s] for s in [*TINY, *EXTRA]), [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

    def torchrun(*args, **kw):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        return cmd + ["-m", "cmtl", "run", *args]

    full, killed = tmp_path / "full", tmp_path / "killed"
    assert subprocess.run(torchrun(*sets, "--out", str(full)), env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(
        torchrun(*sets, "--out", str(killed)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (killed / "checkpoint.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    for pid in [*_descendants(proc.pid), proc.pid]:  # both ranks and torchrun, at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(0.5)
    assert not (killed / "results.json").exists()
    resumed = subprocess.run(
        torchrun("--resume", "--out", str(killed)), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert b["distributed"]["ranks_identical"]
    for ra, rb in zip(a["accuracy_matrix"], b["accuracy_matrix"], strict=True):
        assert ra == pytest.approx(rb, abs=1e-6)
    assert a["distributed"]["model_checksums"] == b["distributed"]["model_checksums"]


def test_torchrun_bad_config_is_reported_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "cmtl", "run", "--set", "model.rank=0", "--out", str(tmp_path / "bad")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cmtl: error:")]
    assert lines == ["cmtl: error: config key 'model.rank' must be > 0, got 0"], proc.stderr[-2000:]
