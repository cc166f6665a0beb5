"""Bad input of every kind: one `cmtl: error:` line naming the problem, exit code 2, nothing damaged."""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_runner import TINY

from cmtl.checkpoint import load_checkpoint
from cmtl.cli import main

SETS = sum((["--set", s] for s in TINY), [])


def _png(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "empty").mkdir()
    for c in ("c0", "c1"):  # files with an image suffix that are not images
        for i in range(4):
            _png(tmp_path / "broken" / c / f"{i}.png")
    (tmp_path / "broken" / "c1" / "x.png").write_bytes(b"not a png")
    for c in ("a", "b"):  # class b has train images but no test images
        for i in range(4):
            _png(tmp_path / "notest" / "train" / c / f"{i}.png")
    for i in range(2):
        _png(tmp_path / "notest" / "test" / "a" / f"{i}.png")
    return tmp_path


def _folder(root, name):
    return [
        "--set",
        "scenario.name=image_folder",
        "--set",
        f"scenario.options={{root: {root / name}}}",
        "--set",
        "scenario.n_tasks=1",
        "--set",
        "scenario.max_per_class=null",
        "--set",
        "scenario.max_test_per_class=null",
    ]


BAD = [
    (["--set", "model.rank=0"], "'model.rank' must be > 0"),
    (["--set", "model.num_experts=3"], "num_experts=3 does not divide the MLP width 128"),
    (
        ["--set", "model.kwargs={img_size: 18, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"],
        "img_size=18 is not a multiple of patch_size=4",
    ),
    (["--set", "model.kwargs={img_size:16}"], "'img_size:16'"),  # YAML needs a space after ':'
    (["--set", "scenario.image_size=32"], "'scenario.image_size' is 32 but the model takes 16x16"),
    (["--set", "strategy.lr=-1"], "'strategy.lr' must be > 0"),
    (["--set", "strategy.optimizer=rmsprop"], "valid: adamw, adam, sgd"),
    (["--set", "strategy.epochs=two"], "'strategy.epochs'"),
    (["--set", "scenario.n_tasks=3", "--set", "scenario.classes_per_task=4"], "classes"),
    (["--set", "model.checkpoint=/nonexistent/vit.safetensors"], "/nonexistent/vit.safetensors"),
    (
        ["--set", "scenario.name=npz", "--set", "scenario.options={path: /nonexistent/d.npz}"],
        "/nonexistent/d.npz",
    ),
    (["--set", "device=cuda:0"], "CUDA is not available"),
    (["--set", "scenario.validation_per_class=0"], "'scenario.validation_per_class' must be > 0"),
    (["--set", "scenario.validation_per_class=500"], "validation_per_class=500 leaves no training images"),
    (["--set", "name=../escape"], "a single directory name"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_config_exits_2_with_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["run", *SETS, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmtl: error:"), err
    assert message in err[0], err[0]
    assert not (out / "results.json").exists()


@pytest.mark.parametrize(
    "name,message",
    [
        ("missing", "does not exist"),
        ("empty", "no class folders"),
        ("broken", "x.png"),
        ("notest", "no test images"),
    ],
)
def test_bad_dataset_folder_exits_2(folders, name, message, capsys):
    assert main(["run", *SETS, *_folder(folders, name), "--out", str(folders / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_out_of_disk_space_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import cmtl.checkpoint as ckpt

    real = ckpt.atomic_write_bytes
    calls = []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint after task 1: the disk is full
            with open(path.with_name(".partial"), "wb") as f:
                f.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", flaky)
    out = tmp_path / "run"
    assert main(["run", *SETS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    monkeypatch.setattr(ckpt, "atomic_write_bytes", real)
    tensors, meta = ckpt.load_checkpoint(out / "checkpoint.safetensors")  # the one after task 0
    assert meta["done"] == 1
    assert main(["run", "--resume", "--out", str(out)]) == 0
    assert (out / "results.json").exists()


def test_sigterm_checkpoints_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmtl", "run", *SETS, "--set", "strategy.epochs=20", "--out", str(out)],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # signal once task 1 has finished its first epoch (19 of its 20 tiny epochs remain): a signal
    # landing while task 0's checkpoint is being finished rightly stops after task 0, and a fixed
    # pause after the checkpoint appeared was not always enough on a loaded machine
    log = out / "avalanche_csv" / "training_results.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(line.startswith("1,") for line in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM" in err and f"cmtl run --resume --out {out}" in err
    assert "last checkpoint: inside task 1" in err  # written before the next step, not task 0's
    assert load_checkpoint(out / "checkpoint.safetensors")[1]["position"]["task"] == 1
    assert not (out / "results.json").exists()
    assert main(["run", "--resume", "--out", str(out)]) == 0
