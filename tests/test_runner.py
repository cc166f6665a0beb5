"""`cmtl run` / `compare` / `eval` / `inspect` end to end on tiny streams, and snapshot reproduction."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmtl.cli import main
from cmtl.config import load_config

TINY = [
    "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
    "model.num_experts=4",
    "model.rank=2",
    "scenario.n_tasks=3",
    "scenario.classes_per_task=2",
    "scenario.max_per_class=30",
    "scenario.max_test_per_class=20",
    "strategy.epochs=1",
    "strategy.batch_size=16",
    "strategy.buffer_size=24",
    "logging.progress=false",
]


def _tiny(*extra):
    return load_config(None, [*TINY, *extra])


def _run(tmp_path, *extra, name="run"):
    from cmtl.runner import run_experiment

    lines = []
    res = run_experiment(_tiny(*extra), out=tmp_path / name, echo=lines.append)
    return res, tmp_path / name, "\n".join(lines)


@pytest.fixture(scope="module")
def til_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("til"))


def test_run_writes_every_file_and_consistent_results(til_run):
    res, run_dir, printed = til_run
    for f in ("config.yaml", "results.json", "metrics.csv", "accuracy_matrix.png", "accuracy_per_task.png"):
        assert (run_dir / f).stat().st_size > 0, f
    for f in ("config.json", "model.safetensors", "heads.safetensors", "meta.json"):
        assert (run_dir / "snapshot" / f).is_file(), f
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["accuracy_matrix"] == res["accuracy_matrix"]
    matrix = res["accuracy_matrix"]
    assert [len(r) for r in matrix] == [1, 2, 3]
    assert res["final_average_accuracy"] == pytest.approx(np.mean(matrix[-1]))
    assert res["average_incremental_accuracy"] == pytest.approx(np.mean([np.mean(r) for r in matrix]))
    assert len(res["wall_time_per_task"]) == 3 and all(t > 0 for t in res["wall_time_per_task"])
    assert len(res["trainable_parameters_per_task"]) == 3
    assert 0 < res["buffer_samples"] <= 24 and res["buffer_bytes"] > 0
    records = res["qr_records"]
    assert records["records"] == res["buffer_samples"] and 0.0 <= records["wrong"] <= 1.0
    assert 0.0 < records["true_class_probability"] <= 1.0
    assert sum(r["records"] for r in records["per_task"].values()) == records["records"]
    assert f"QR buffer: {records['records']} records" in printed
    assert set(res["versions"]) >= {"cmtl", "torch", "timm", "avalanche"}
    assert "accuracy matrix (%;" in printed and "after 2" in printed
    assert res["evaluated_on"] == "test"
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "after_task,task,accuracy" and len(csv_lines) == 1 + 6
    # the resolved config reloads to the same experiment
    assert load_config(run_dir / "config.yaml") == _tiny()


def test_validation_split_run_is_marked_as_such(tmp_path):
    res, run_dir, printed = _run(tmp_path, "scenario.n_tasks=2", "scenario.validation_per_class=5")
    assert res["evaluated_on"] == "validation" and "on the validation split" in printed
    assert json.loads((run_dir / "results.json").read_text())["evaluated_on"] == "validation"
    assert load_config(run_dir / "config.yaml").scenario.validation_per_class == 5


def test_snapshot_reproduces_runner_accuracy(til_run):
    from cmtl.runner import evaluate_snapshot
    from cmtl.snapshot import load_snapshot

    res, run_dir, _ = til_run
    accs = evaluate_snapshot(load_snapshot(run_dir / "snapshot"), _tiny())
    assert accs == pytest.approx(res["accuracy_matrix"][-1], abs=1e-3)  # within 0.1 points


def test_plain_timm_plus_heads_reproduces_accuracy(til_run, tmp_path):
    """Without cmtl: timm's local-dir loader, safetensors heads, the stream's own test images."""
    from cmtl.runner import build_stream

    res, run_dir, _ = til_run
    meta = json.loads((run_dir / "snapshot" / "meta.json").read_text())
    stream = build_stream(_tiny(), None, image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    xs, ys = [], []
    for exp in stream.benchmark.test_stream:
        data = exp.dataset.eval()
        xs.append(torch.stack([data[i][0] for i in range(len(data))]))
        ys.append(torch.tensor([int(data[i][1]) for i in range(len(data))]))
    torch.save({"x": xs, "y": ys}, tmp_path / "test.pt")
    script = f"""
import sys, json, timm, torch
from safetensors.torch import load_file
snap = {str(run_dir / "snapshot")!r}
vit = timm.create_model("local-dir:" + snap, pretrained=True).eval()
heads = load_file(snap + "/heads.safetensors")
data = torch.load({str(tmp_path / "test.pt")!r})
accs = []
with torch.no_grad():
    for t, (x, y) in enumerate(zip(data["x"], data["y"])):
        logits = vit(x) @ heads[f"task{{t}}.weight"].T + heads[f"task{{t}}.bias"]
        accs.append((logits.argmax(-1) == y).float().mean().item())
assert "cmtl" not in sys.modules
print(json.dumps(accs))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    accs = json.loads(out.stdout.strip().splitlines()[-1])
    assert accs == pytest.approx(res["accuracy_matrix"][-1], abs=1e-3)


def test_cil_run(tmp_path):
    res, run_dir, _ = _run(tmp_path, "scenario.mode=cil")
    assert res["mode"] == "cil" and [len(r) for r in res["accuracy_matrix"]] == [1, 2, 3]
    meta = json.loads((run_dir / "snapshot" / "meta.json").read_text())
    assert meta["mode"] == "cil" and meta["classes_per_task"] == [2, 2, 2]


def test_joint_run_has_one_row(tmp_path):
    res, _, _ = _run(tmp_path, "strategy.name=joint")
    assert len(res["accuracy_matrix"]) == 1 and len(res["accuracy_matrix"][0]) == 3
    assert res["forgetting"] is None


def test_cli_run_refuses_to_overwrite_a_finished_run(til_run, capsys):
    _, run_dir, _ = til_run
    before = (run_dir / "results.json").read_bytes()
    assert main(["run", "--out", str(run_dir), *sum((["--set", s] for s in TINY), [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finished run" in err[0]
    assert (run_dir / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--set", "strategy.nmae=emtal"], "did you mean 'strategy.name'"),
        (["run", "--set", "strategy.name=emtl"], "emtal"),
        (["compare", "--strategies", "emtal,nave"], "did you mean 'naive'"),
        (["inspect", "/nonexistent/snapshot"], "/nonexistent/snapshot"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmtl: error:") and message in err[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("results.json"))


def test_cli_eval_and_inspect(til_run, capsys, tmp_path):
    res, run_dir, _ = til_run
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text((run_dir / "config.yaml").read_text())
    assert main(["eval", str(run_dir / "snapshot"), "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    for j, acc in enumerate(res["accuracy_matrix"][-1]):
        assert f"task {j}: accuracy {100 * acc:.2f}%" in out
    assert main(["inspect", str(run_dir / "snapshot")]) == 0
    out = capsys.readouterr().out
    assert "task 2" in out and "model.safetensors" in out and "accuracy matrix" in out
    # a stream that does not match the snapshot is refused
    assert (
        main(["eval", str(run_dir / "snapshot"), "--config", str(cfg_file), "--set", "scenario.n_tasks=5"])
        == 2
    )
    assert "does not match" in capsys.readouterr().err


def test_compare_table_has_every_baseline(tmp_path, capsys, monkeypatch):
    from cmtl.config import STRATEGY_NAMES

    monkeypatch.chdir(tmp_path)
    args = ["compare", "--out", str(tmp_path / "cmp")]  # no --strategies: all of them
    assert main([*args, *sum((["--set", s] for s in TINY), []), "--set", "scenario.n_tasks=2"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["strategy"] for r in summary["rows"]] == list(STRATEGY_NAMES)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    for name in STRATEGY_NAMES:
        assert name in out and f"| {name}" in md
    assert all(len(m) == 1 for m in summary["runs"].values())  # one seed each
    # the strategies that keep a memory, all at the configured one
    assert sorted(summary["memory"]) == ["der", "emtal", "emtal_no_fading", "emtal_no_moe", "replay"]
    assert summary["equal_budgets"] and "Unequal" not in md


def test_compare_pairs_the_first_strategy_with_each_other_seed_by_seed(tmp_path, capsys):
    sets = sum((["--set", s] for s in [*TINY, "scenario.n_tasks=2"]), [])
    assert main(["compare", "--strategies", "emtal,lora", "--seeds", "2", *sets, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "compare.json").read_text())
    finals = {
        n: [
            json.loads((tmp_path / f"{n}_seed{s}" / "results.json").read_text())["final_average_accuracy"]
            for s in (0, 1)
        ]
        for n in ("emtal", "lora")
    }
    assert finals["emtal"] != finals["lora"]  # otherwise every difference below would be trivially 0
    got = summary["paired"]
    assert got["reference"] == "emtal" and list(got["against"]) == ["lora"]
    diffs = [a - b for a, b in zip(finals["emtal"], finals["lora"])]
    assert got["against"]["lora"]["differences"] == pytest.approx(diffs)
    assert got["against"]["lora"]["ahead"] == sum(d > 0 for d in diffs)
    md = (tmp_path / "compare.md").read_text()
    assert "mean ± std over seeds; test split." in md
    assert "emtal − strategy, final acc (pt, ± s.e.)" in md and "emtal − strategy" in out
    assert " / ".join(f"{100 * d:+.1f}" for d in diffs) in md


def test_compare_in_parallel_and_resumed_gives_the_same_table(tmp_path, capsys):
    import shutil

    sets = sum((["--set", s] for s in [*TINY, "scenario.n_tasks=2"]), [])
    base = ["compare", "--strategies", "emtal,naive", *sets]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    one = json.loads((tmp_path / "one" / "compare.json").read_text())
    two = json.loads((tmp_path / "two" / "compare.json").read_text())
    assert one["runs"] == two["runs"] and one["rows"][0]["final_average_accuracy"][0] > 0
    assert json.loads((tmp_path / "one" / "naive_seed0" / "results.json").read_text())["qr_records"] is None
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "two")]) == 2  # a finished comparison is kept
    assert "--resume" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "two" / "naive_seed0")  # as if the compare had been killed before it
    mtime = (tmp_path / "two" / "emtal_seed0" / "results.json").stat().st_mtime_ns
    assert main([*base, "--resume", "--out", str(tmp_path / "two")]) == 0
    again = json.loads((tmp_path / "two" / "compare.json").read_text())
    assert again["runs"] == one["runs"]
    assert (tmp_path / "two" / "emtal_seed0" / "results.json").stat().st_mtime_ns == mtime  # reused
    capsys.readouterr()
    assert main([*base, "--resume", "--set", "strategy.lr=0.01", "--out", str(tmp_path / "two")]) == 2
    assert "has another config at strategy.lr" in capsys.readouterr().err


def test_compare_gives_each_strategy_its_per_strategy_settings(tmp_path, capsys):
    sets = sum((["--set", s] for s in [*TINY, "scenario.n_tasks=2"]), [])
    per = ["--set", "strategy.per_strategy.der={buffer_size: 6, buffer_selection: reservoir}"]
    base = ["compare", "--strategies", "emtal,der", *sets, *per, "--out", str(tmp_path)]
    # another memory for der breaks the one-budget comparison: refused before anything is written
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different buffer_sizes (emtal 24, der 6)" in err[0], err
    assert "--unequal-budgets" in err[0] and not any(tmp_path.iterdir())
    # a cap per class that replay's memory would ignore is refused too, not silently dropped
    cap = ["--set", "strategy.buffer_per_class=3"]
    assert main(["compare", "--strategies", "emtal,replay", *sets, *cap, "--out", str(tmp_path)]) == 2
    assert "which replay does not honour" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert main([*base, "--unequal-budgets"]) == 0
    capsys.readouterr()
    got = {}
    for name in ("emtal", "der"):
        run = tmp_path / f"{name}_seed0"
        saved = load_config(run / "config.yaml").strategy
        records = json.loads((run / "results.json").read_text())["qr_records"]["records"]
        got[name] = (saved.name, saved.buffer_size, saved.buffer_selection, records)
    # the buffers really held what each strategy's settings say, and config.yaml says what trained
    assert got == {"emtal": ("emtal", 24, "balanced", 24), "der": ("der", 6, "reservoir", 6)}
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["per_strategy"] == {"der": {"buffer_size": 6, "buffer_selection": "reservoir"}}
    assert summary["equal_budgets"] is False
    assert summary["memory"] == {
        "emtal": {"buffer_size": 24, "buffer_per_class": None},
        "der": {"buffer_size": 6, "buffer_per_class": None},
    }
    md = (tmp_path / "compare.md").read_text()
    assert "**Unequal memory budgets** (`--unequal-budgets`): emtal: buffer_size=24" in md
    assert (
        "(`strategy.per_strategy`), the rest as configured: der: buffer_size=6, buffer_selection=reservoir."
        in md
    )


def test_image_folder_stream_end_to_end(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(4):  # four classes with distinct colours, 12 PNGs each
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            img = np.clip(rng.normal(60 * c + 30, 20, size=(20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    res, run_dir, _ = _run(
        tmp_path,
        "scenario.name=image_folder",
        f"scenario.options={{root: {root}, test_fraction: 0.25}}",
        "scenario.n_tasks=2",
        "scenario.max_per_class=null",
        "scenario.max_test_per_class=null",
        "strategy.epochs=3",
    )
    assert [len(r) for r in res["accuracy_matrix"]] == [1, 2]
    meta = json.loads((run_dir / "snapshot" / "meta.json").read_text())
    assert [len(c) for c in meta["task_classes"]] == [2, 2]
