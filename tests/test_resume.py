"""Checkpoints and `--resume`: a run stopped anywhere ends like an uninterrupted one; bad files refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_runner import TINY

from cmtl.cli import main
from cmtl.config import load_config

SETS = sum((["--set", s] for s in TINY), [])


class _Stop(Exception):
    pass


def _stop_at(label):
    def echo(msg):
        if msg.startswith(label):
            raise _Stop(msg)

    return echo


def _snapshot_tensors(run_dir):
    return load_file(run_dir / "snapshot" / "model.safetensors") | {
        f"head.{k}": v for k, v in load_file(run_dir / "snapshot" / "heads.safetensors").items()
    }


def _assert_same_run(a_dir, b_dir):
    a = json.loads((a_dir / "results.json").read_text())
    b = json.loads((b_dir / "results.json").read_text())
    assert len(a["accuracy_matrix"]) == len(b["accuracy_matrix"])
    for ra, rb in zip(a["accuracy_matrix"], b["accuracy_matrix"]):
        assert ra == pytest.approx(rb, abs=1e-6)
    assert a["buffer_samples"] == b["buffer_samples"]
    ta, tb = _snapshot_tensors(a_dir), _snapshot_tensors(b_dir)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize(
    "extra",
    [
        ["strategy.consolidate_every=2"],  # the checkpoint holds an open adapter
        ["strategy.name=replay"],
        ["strategy.name=ewc"],
        ["strategy.name=lwf"],
        ["strategy.name=der", "scenario.mode=cil"],
        ["strategy.head_init=probe", "scenario.mode=cil"],  # probe starts from the prototype head
        ["strategy.classifier_alignment=true", "scenario.mode=cil"],  # class statistics in the checkpoint
        ["strategy.buffer_storage=uint8"],
    ],
    ids=lambda e: "-".join(x.split("=")[1] for x in e),
)
def test_stopped_run_resumes_to_identical_results(tmp_path, extra):
    from cmtl.runner import run_experiment

    cfg = load_config(None, [*TINY, *extra])
    run_experiment(cfg, out=tmp_path / "a", echo=lambda m: None)
    with pytest.raises(_Stop):  # stops while task 2 starts: the checkpoint after task 1 is on disk
        run_experiment(cfg, out=tmp_path / "b", echo=_stop_at("task 2:"))
    assert not (tmp_path / "b" / "results.json").exists()
    with pytest.raises(ValueError, match="unfinished run"):
        run_experiment(cfg, out=tmp_path / "b", echo=lambda m: None)
    run_experiment(cfg, out=tmp_path / "b", echo=lambda m: None, resume=True)
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def _signal_inside_task(monkeypatch, task, epoch, step):
    """SIGTERM this process right after the given step (0-based) of the given task and epoch."""
    import cmtl.runner as runner

    real = runner._progress_plugin

    def progress(enabled, state):
        plugin = real(enabled, state)
        after = plugin.after_training_iteration

        def after_iteration(strategy, **kwargs):
            after(strategy, **kwargs)
            c = strategy.clock  # its own after_training_iteration (it runs last) has not counted this step
            if (strategy.experience.current_experience, c.train_exp_epochs, c.train_epoch_iterations) == (
                task,
                epoch,
                step,
            ):
                os.kill(os.getpid(), signal.SIGTERM)

        plugin.after_training_iteration = after_iteration
        return plugin

    monkeypatch.setattr(runner, "_progress_plugin", progress)


@pytest.mark.parametrize(
    ("extra", "epoch", "step"),
    [
        (["strategy.consolidate_every=2"], 0, 1),  # open adapter, mid-epoch
        (["strategy.consolidate_every=2"], 0, 3),  # last step of the epoch: resumes at the next one
        (["strategy.name=replay"], 1, 2),
        (["strategy.name=ewc"], 1, 0),
        (["strategy.name=lwf"], 0, 2),
        (["strategy.name=der", "scenario.mode=cil"], 1, 1),
        (["strategy.head_init=prototype"], 0, 2),
        # augmentation drawn in worker processes, whose seeds come from the epoch's RNG state
        (["strategy.num_workers=2", "scenario.augment=true"], 1, 1),
        (["strategy.qr_refresh=true", "strategy.qr_distill_weight=confidence"], 0, 2),
        # buffer images cropped with the buffer's own generator, which the checkpoint holds
        (["strategy.qr_augment=crop_flip"], 1, 1),
        # class statistics and the memory's features at the task's start are in the checkpoint
        (["scenario.mode=cil", "strategy.classifier_alignment=true", "strategy.alignment_drift=true"], 1, 1),
        # the pooled scatter and its degrees of freedom too
        (
            [
                "scenario.mode=cil",
                "strategy.classifier_alignment=true",
                "strategy.alignment_covariance=shared",
            ],
            1,
            0,
        ),
        # three parameter groups (adapters, heads, tuned pre-trained weights) in the optimiser state
        (
            ["strategy.tune_base=[embed,norms]", "strategy.backbone_lr=1e-4", "strategy.head_lr=3e-3"],
            1,
            1,
        ),
    ],
    ids=[
        "emtal-k2-mid",
        "emtal-k2-epoch-end",
        "replay",
        "ewc",
        "lwf",
        "der-cil",
        "emtal-prototype-heads",
        "emtal-2-workers",
        "emtal-refresh",
        "emtal-buffer-augment",
        "emtal-cil-aligned-drift",
        "emtal-cil-aligned-shared",
        "emtal-tune-base-groups",
    ],
)
def test_interrupted_inside_a_task_resumes_to_identical_results(tmp_path, monkeypatch, extra, epoch, step):
    from cmtl.checkpoint import load_checkpoint
    from cmtl.runner import RunInterrupted, run_experiment

    cfg = load_config(None, [*TINY, "strategy.epochs=2", *extra])  # 4 steps per epoch
    run_experiment(cfg, out=tmp_path / "a", echo=lambda m: None)
    with monkeypatch.context() as m:
        _signal_inside_task(m, task=1, epoch=epoch, step=step)
        with pytest.raises(RunInterrupted, match="last checkpoint: inside task 1"):
            run_experiment(cfg, out=tmp_path / "b", echo=lambda m: None)
    _, meta = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    at = (epoch, step + 1) if step < 3 else (epoch + 1, 0)
    assert (meta["position"]["task"], meta["position"]["epoch"], meta["position"]["iteration"]) == (1, *at)
    assert meta["done"] == 1 and len(meta["matrix"]) == 1
    run_experiment(cfg, out=tmp_path / "b", echo=lambda m: None, resume=True)
    _assert_same_run(tmp_path / "a", tmp_path / "b")
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(b["trainable_parameters_per_task"]) == 3 and len(b["wall_time_per_task"]) == 3


def test_checkpoint_every_epochs_writes_inside_tasks_and_resumes(tmp_path):
    from cmtl.checkpoint import load_checkpoint
    from cmtl.runner import run_experiment

    cfg = load_config(None, [*TINY, "strategy.epochs=3"])
    every = load_config(None, [*TINY, "strategy.epochs=3", "strategy.checkpoint_every_epochs=2"])
    run_experiment(cfg, out=tmp_path / "a", echo=lambda m: None)
    seen = []

    import cmtl.runner as runner

    real = runner._write_checkpoint

    def spy(run_dir, model, strategy, state, extra, extra_tensors=None):
        real(run_dir, model, strategy, state, extra, extra_tensors)
        pos = extra.get("position")
        seen.append(None if pos is None else (pos["task"], pos["epoch"], pos["iteration"]))
        if pos is not None and pos["task"] == 1:
            raise _Stop("killed right after the mid-task checkpoint of task 1")

    runner._write_checkpoint = spy
    try:
        with pytest.raises(_Stop):
            run_experiment(every, out=tmp_path / "b", echo=lambda m: None)
    finally:
        runner._write_checkpoint = real
    assert seen == [(0, 2, 0), None, (1, 2, 0)]
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")[1]["position"]["task"] == 1
    run_experiment(every, out=tmp_path / "b", echo=lambda m: None, resume=True)
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", *SETS, "--out", str(a)]) == 0
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    every = ["--set", "strategy.epochs=3", "--set", "strategy.checkpoint_every_epochs=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmtl", "run", *SETS, *every, "--out", str(b)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (b / "checkpoint.safetensors").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.3)  # a few steps after a checkpoint inside task 0 (or after it)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (b / "results.json").exists()
    assert main(["run", "--resume", "--out", str(b)]) == 0  # takes the run's own config.yaml
    a3 = tmp_path / "a3"
    assert main(["run", *SETS, *every, "--out", str(a3)]) == 0
    _assert_same_run(a3, b)


def test_truncated_or_missing_checkpoint_is_refused(tmp_path, capsys):
    from cmtl.runner import run_experiment

    cfg = load_config(None, TINY)
    with pytest.raises(_Stop):
        run_experiment(cfg, out=tmp_path / "r", echo=_stop_at("task 1:"))
    ckpt = tmp_path / "r" / "checkpoint.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert main(["run", "--resume", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint" in err[0] and "truncated or corrupted" in err[0]
    assert ckpt.read_bytes() == data[: len(data) // 2]  # left as it was for inspection
    assert main(["run", "--resume", "--out", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    from cmtl.runner import run_experiment

    with pytest.raises(_Stop):
        run_experiment(load_config(None, TINY), out=tmp_path / "r", echo=_stop_at("task 1:"))
    assert main(["run", *SETS, "--set", "strategy.lr=0.5", "--resume", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "differs" in err and "strategy.lr" in err


def test_nan_loss_stops_with_task_and_step(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(
        ["run", *SETS, "--set", "strategy.name=naive", "--set", "strategy.lr=1e12", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "training loss is" in err[0] and "at task" in err[0] and "step" in err[0]
    assert not (out / "results.json").exists()


def test_crafted_pickle_checkpoint_is_refused_without_running_code(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(pickle.dumps(Evil()))
    assert main(["run", *SETS, "--resume", "--out", str(run)]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_without_out_finds_the_named_run(tmp_path, capsys, monkeypatch):
    from cmtl.runner import run_experiment

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*TINY, "name=mine"])
    with pytest.raises(_Stop):
        run_experiment(cfg, echo=_stop_at("task 1:"))  # writes runs/mine
    assert main(["run", "--resume", "--set", "name=mine"]) == 0
    assert (tmp_path / "runs" / "mine" / "results.json").exists()
