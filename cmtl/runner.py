"""The task-stream experiment runner behind `cmtl run` and `cmtl compare`.

`run_experiment(cfg)` builds the backbone, the stream and the named strategy from an
`ExperimentConfig`, trains the experiences one by one, evaluates every task seen so far after each,
and writes the run directory:

    config.yaml          the resolved configuration
    results.json         accuracy matrix R[i][j], its summaries, wall time, parameters, buffer (and the
                         quality of its stored logits), versions
    metrics.csv          one line per (after_task, task) accuracy
    accuracy_matrix.png  heatmap of R; accuracy_per_task.png: each task's accuracy over the stream
    snapshot/            the consolidated model (timm local-dir format + heads + meta), see cmtl.snapshot
"""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmtl.backbone import create_backbone
from cmtl.config import ConfigError, ExperimentConfig, config_to_dict, save_config
from cmtl.model import CMTLModel
from cmtl.recipes import StrategySpec, strategy_spec
from cmtl.version import __version__

logger = logging.getLogger(__name__)

RESULTS_FORMAT = 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available; an unavailable CUDA device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' is {name!r} but CUDA is not available here; valid: auto, cpu")
    return torch.device(name)


def versions() -> dict[str, str]:
    """Versions of cmtl and the libraries whose behaviour the results depend on."""
    import avalanche
    import timm

    return {
        "cmtl": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "avalanche": getattr(avalanche, "__version__", "unknown"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def build_backbone(cfg: ExperimentConfig):
    mc = cfg.model
    return create_backbone(mc.name, pretrained=mc.pretrained, checkpoint=mc.checkpoint, **mc.kwargs)


def build_stream(cfg: ExperimentConfig, backbone, image_size: int | None = None, mean=None, std=None):
    """The task stream of `cfg.scenario`, sized and normalised for `backbone`."""
    from cmtl.scenarios import create_scenario

    sc, mc = cfg.scenario, cfg.model
    model_size = int(backbone.patch_embed.img_size[0]) if backbone is not None else image_size
    size = image_size or sc.image_size or model_size
    if model_size is not None and size != model_size:
        raise ConfigError(
            f"config key 'scenario.image_size' is {size} but the model takes {model_size}x{model_size} "
            f"images; valid: null or {model_size} (or change model.kwargs.img_size)"
        )
    pcfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = mean or mc.mean or pcfg.get("mean")
    std = std or mc.std or pcfg.get("std")
    return create_scenario(
        sc.name,
        mode=sc.mode,
        n_tasks=sc.n_tasks,
        classes_per_task=sc.classes_per_task,
        class_order_seed=sc.class_order_seed,
        max_per_class=sc.max_per_class,
        max_test_per_class=sc.max_test_per_class,
        validation_per_class=sc.validation_per_class,
        image_size=size,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        augment=sc.augment,
        flip=sc.flip,
        seed=cfg.seed,
        **sc.options,
    )


def accuracy_key(mode: str, exp: int) -> str:
    """Avalanche's metric name of the accuracy on test experience `exp`."""
    task = exp if mode == "til" else 0
    return f"Top1_Acc_Exp/eval_phase/test_stream/Task{task:03d}/Exp{exp:03d}"


def _atomic_write_text(path: Path, text: str) -> None:
    from cmtl.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    _atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@dataclass
class RunState:
    """What the runner has measured so far."""

    matrix: list[list[float]] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)
    open_after: list[int] = field(default_factory=list)  # adapters still open after each task


def _qr_buffer(strategy):
    """The strategy's `QRBuffer` (EMTAL, DER), or None."""
    from cmtl.strategies import find_emtal_plugin

    plugin = find_emtal_plugin(strategy)
    return None if plugin is None or plugin.controller is None else plugin.controller.qr


def _buffer_stats(strategy) -> tuple[int, int]:
    """(samples, bytes) held by the strategy's replay memory, whichever kind it has."""
    from avalanche.training.plugins import ReplayPlugin

    qr = _qr_buffer(strategy)
    if qr is not None:
        return len(qr), qr.nbytes()
    for p in strategy.plugins:
        if isinstance(p, ReplayPlugin):
            buffer = p.storage_policy.buffer
            if len(buffer) == 0:
                return 0, 0
            x = buffer[0][0]
            per_sample = x.element_size() * x.numel() + 16  # image + label and task label (int64)
            return len(buffer), len(buffer) * per_sample
    return 0, 0


def _evaluator(csv_dir: Path, cfg: ExperimentConfig, write: bool = True):
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.logging import CSVLogger, TensorboardLogger
    from avalanche.training.plugins import EvaluationPlugin

    loggers = []
    if cfg.logging.csv and write:
        loggers.append(CSVLogger(log_folder=str(csv_dir)))
    if cfg.logging.tensorboard and write:
        loggers.append(TensorboardLogger(tb_log_dir=str(csv_dir.parent / "tensorboard")))
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True), loggers=loggers
    )


def _progress_plugin(enabled: bool, state: RunState):
    from avalanche.training.plugins import SupervisedPlugin
    from tqdm.auto import tqdm

    class Progress(SupervisedPlugin):
        """A tqdm bar per epoch; records the trainable parameters of each experience."""

        bar = None

        def before_training_exp(self, strategy, **kwargs):
            state.trainable.append(sum(p.numel() for p in strategy.model.parameters() if p.requires_grad))

        def before_training_epoch(self, strategy, **kwargs):
            exp = strategy.experience.current_experience
            epoch = strategy.clock.train_exp_epochs + 1
            self.bar = tqdm(
                total=len(strategy.dataloader),
                desc=f"task {exp} epoch {epoch}/{strategy.train_epochs}",
                leave=False,
                disable=None if enabled else True,  # None: only on a terminal
                dynamic_ncols=True,
            )

        def after_training_iteration(self, strategy, **kwargs):
            if self.bar is not None and not self.bar.disable:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{float(strategy.loss.detach()):.3f}", refresh=False)

        def after_training_epoch(self, strategy, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def prepare_run_dir(cfg: ExperimentConfig, out: str | Path | None, resume: bool = False) -> Path:
    """The run directory (`out`, or `cfg.out/cfg.name`); never silently overwrites a run."""
    from cmtl.checkpoint import CHECKPOINT_NAME

    run_dir = Path(out) if out is not None else Path(cfg.out) / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} exists and is not a directory")
    if (run_dir / "results.json").exists():
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a finished run; "
            "choose another with --out or --set name=..., or delete it"
        )
    has_checkpoint = (run_dir / CHECKPOINT_NAME).exists()
    if resume and not has_checkpoint:
        raise ConfigError(f"--resume: no checkpoint in {str(run_dir)!r} (a run writes one after each task)")
    if not resume and has_checkpoint:
        raise ConfigError(
            f"run directory {str(run_dir)!r} holds an unfinished run; continue it with "
            f"`cmtl run --resume --out {run_dir}` or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_dict.items() if k not in ("logging", "out")}


def config_difference(now: dict[str, Any], then: dict[str, Any]) -> str | None:
    """The first key where two resolved configs differ in what they train (logging and out aside)."""
    return _first_difference(_comparable(now), _comparable(then))


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix[:-1]} ({b!r} in the checkpoint, {a!r} now)"


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stopped after the current step."""


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite."""


def _guard_plugin(stop: dict[str, Any], run_dir: Path, mid_task: Callable | None, every_epochs: int | None):
    """Stops on NaN/inf loss (naming task and step), and before the next step once a signal arrived.

    Install it first: its `before_training_iteration` writes mid-task checkpoints (on a signal, and
    every `every_epochs` epochs) before any other plugin has advanced its state for the step.
    `mid_task(strategy)` writes one and returns where it is, or None where it cannot (torchrun).
    """
    from avalanche.training.plugins import SupervisedPlugin

    class Guard(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kwargs):
            clock = strategy.clock
            if stop["signal"] is not None:
                where = mid_task(strategy) if mid_task is not None else None
                raise RunInterrupted(stop["signal"], where)
            epoch = clock.train_exp_epochs
            if (
                every_epochs
                and mid_task
                and clock.train_epoch_iterations == 0
                and epoch
                and epoch % every_epochs == 0
            ):
                mid_task(strategy)

        def after_backward(self, strategy, **kwargs):
            loss = strategy.loss  # with every plugin's terms added
            if not bool(torch.isfinite(loss.detach()).all()):
                task = strategy.experience.current_experience
                step = strategy.clock.train_exp_iterations
                epoch = strategy.clock.train_exp_epochs
                raise TrainingDiverged(
                    f"training loss is {float(loss.detach()):g} at task {task}, epoch {epoch}, step {step}; "
                    f"last good checkpoint: {stop.get('last') or 'none yet'} in {run_dir} "
                    "(try a lower strategy.lr)"
                )

    return Guard()


def _install_signal_handlers(stop: dict[str, Any]):
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, handler)
    return old


def _restore_signal_handlers(old) -> None:
    import signal

    for sig, h in old.items():
        signal.signal(sig, h)


def _rebuild_structure(model: CMTLModel, classes_per_task: list[int], open_after: list[int]) -> None:
    """Replay the adapter/head history of the checkpointed run so its tensors load strictly."""
    for n, still_open in zip(classes_per_task, open_after):
        model.add_task(n)
        if still_open == 0 and model.open_adapters:
            model.set_fading(0.0)
            model.consolidate()


def _write_checkpoint(
    run_dir: Path,
    model: CMTLModel,
    strategy,
    state: RunState,
    extra: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    from cmtl.checkpoint import CHECKPOINT_NAME, rng_state, save_checkpoint
    from cmtl.strategies.state import strategy_state

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    s_tensors, s_meta = strategy_state(strategy)
    tensors.update({f"strategy.{k}": v for k, v in s_tensors.items()})
    r_tensors, r_meta = rng_state()
    tensors.update(r_tensors)
    tensors.update(extra_tensors or {})
    meta = {
        **extra,
        "matrix": state.matrix,
        "wall_time": state.wall_time,
        "trainable": state.trainable,
        "open_after": state.open_after,
        "strategy_state": s_meta,
        "rng": r_meta,
    }
    save_checkpoint(run_dir / CHECKPOINT_NAME, tensors, meta)


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path | None = None,
    echo: Callable[[str], None] = print,
    progress: bool | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run `cfg` end to end and write the run directory; returns the content of `results.json`.

    A checkpoint is written after every task, inside a task on SIGINT/SIGTERM (after the current
    step) and every `strategy.checkpoint_every_epochs` epochs; `resume=True` continues from it
    (same config needed) to the same results as an uninterrupted run.
    Under torchrun every rank trains its shard of the data and rank 0 writes the run directory.
    """
    from cmtl import distributed as D

    device = resolve_device(cfg.device)
    # Avalanche builds loggers when avalanche.training is first imported, which it refuses to do on
    # a non-main rank once torch.distributed is up: import it before joining the process group
    import cmtl.strategies  # noqa: F401

    ctx = D.init_distributed(device) if D.launched_by_torchrun() else None
    if ctx is not None:
        device = ctx.device
    try:
        return _run(cfg, out, echo, progress, resume, device, ctx)
    finally:
        if ctx is not None:
            D.shutdown()


def _run(cfg, out, echo, progress, resume, device, ctx) -> dict[str, Any]:
    from cmtl import distributed as D
    from cmtl.checkpoint import CHECKPOINT_NAME, load_checkpoint, set_rng_state
    from cmtl.metrics import format_matrix, summarize
    from cmtl.snapshot import save_snapshot
    from cmtl.strategies import build_strategy
    from cmtl.strategies.state import ResumePoint, load_strategy_state

    main_proc = ctx is None or ctx.is_main  # only rank 0 writes and prints
    if not main_proc:
        echo, progress = (lambda _msg: None), False
    # the strategy's own `per_strategy` settings in place, so config.yaml and the checkpoint say
    # what actually trained
    cfg = replace(cfg, strategy=cfg.strategy.resolved())
    run_dir = prepare_run_dir(cfg, out, resume)
    D.barrier()
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
        diff = config_difference(config_to_dict(cfg), checkpoint[1]["config"])
        if diff:
            raise ConfigError(f"--resume: the config differs from the checkpointed run's at {diff}")
    elif main_proc:
        save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.seed)
    started = time.time()

    backbone = build_backbone(cfg)
    stream = build_stream(cfg, backbone)
    spec: StrategySpec = strategy_spec(cfg.strategy.name, cfg.model, cfg.strategy, seed=cfg.seed)
    model = CMTLModel(backbone, spec.adapter, mode=stream.mode, moefy_seed=cfg.model.moefy_seed)
    state = RunState()
    elapsed_before = 0.0
    position = None  # where inside a task a mid-task checkpoint was written
    model_state: dict[str, torch.Tensor] = {}
    if checkpoint is not None:
        tensors, meta = checkpoint
        position = meta.get("position")
        state = RunState(meta["matrix"], meta["wall_time"], meta["trainable"], meta["open_after"])
        elapsed_before = float(meta["elapsed"])
        _rebuild_structure(model, stream.classes_per_task[: meta["done"]], state.open_after)
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        if position is None:  # else: loaded once the resumed task has added its adapter and head
            try:
                model.load_state_dict(model_state, strict=True)
            except RuntimeError as e:
                raise ConfigError(
                    f"--resume: checkpoint does not match the model: {str(e).splitlines()[0]}"
                ) from None
    done = len(state.matrix) if spec.avalanche != "joint" else 0
    show = cfg.logging.progress if progress is None else progress
    stop: dict[str, Any] = {"signal": None, "last": None}
    if done:
        stop["last"] = f"after task {done - 1}"
    csv_dir = run_dir / ("avalanche_csv" if not resume else f"avalanche_csv_resumed_at_task{done}")
    ckpt_meta = {"config": config_to_dict(cfg), "versions": versions()}
    task_clock = {"start": time.time(), "before": 0.0}  # time spent in the current task

    def mid_task(strat) -> str | None:
        """Write a checkpoint inside the current task; None where that is not supported."""
        from cmtl.strategies.state import mid_task_state

        if not main_proc or ctx is not None or spec.avalanche == "joint":
            return None  # torchrun ranks and joint training resume from the last finished task
        r_tensors, pos = mid_task_state(strat)
        n = len(state.matrix)
        pos["task_elapsed"] = task_clock["before"] + time.time() - task_clock["start"]
        kept = RunState(state.matrix, state.wall_time, state.trainable[:n], state.open_after)
        extra = {**ckpt_meta, "done": n, "elapsed": elapsed_before + time.time() - started, "position": pos}
        _write_checkpoint(
            run_dir, model, strat, kept, extra, {f"resume.{k}": v for k, v in r_tensors.items()}
        )
        where = f"inside task {pos['task']} (epoch {pos['epoch'] + 1}, step {pos['iteration']})"
        stop["last"] = where
        return where

    strategy = build_strategy(
        spec,
        model,
        cfg.strategy,
        classes_per_task=stream.classes_per_task,
        device=device,
        evaluator=_evaluator(csv_dir, cfg, write=main_proc),
        plugins=[
            _guard_plugin(stop, run_dir, mid_task, cfg.strategy.checkpoint_every_epochs),
            _progress_plugin(show, state),
        ],
    )
    train, test = stream.benchmark.train_stream, stream.benchmark.test_stream
    if checkpoint is not None:
        tensors, meta = checkpoint
        s_tensors = {k[9:]: v for k, v in tensors.items() if k.startswith("strategy.")}
        load_strategy_state(strategy, s_tensors, meta["strategy_state"], train)
        if position is not None:
            emtal = None
            if "emtal" in meta["strategy_state"]:
                emtal_tensors = {k[6:]: v for k, v in s_tensors.items() if k.startswith("emtal.")}
                emtal = {"tensors": emtal_tensors, "meta": meta["strategy_state"]["emtal"]}
            r_tensors = {k[7:]: v for k, v in tensors.items() if k.startswith("resume.")}
            strategy.resume_point = ResumePoint(r_tensors, position, model_state, emtal)
            task_clock["before"] = float(position["task_elapsed"])
            echo(
                f"cmtl run: resuming {run_dir} inside task {done} "
                f"(epoch {position['epoch'] + 1}, step {position['iteration']})"
            )
        else:
            echo(f"cmtl run: resuming {run_dir} after task {done - 1}")
        set_rng_state(tensors, meta["rng"])  # last: everything above may draw random numbers
    echo(
        f"cmtl run: {cfg.strategy.name} on {stream.name} ({stream.mode}, {stream.num_tasks} tasks, "
        f"{stream.num_classes} classes), {cfg.model.name}, device {device}, run dir {run_dir}"
    )
    kwargs = {"num_workers": cfg.strategy.num_workers}
    old_handlers = _install_signal_handlers(stop)
    try:
        if spec.avalanche == "joint":
            t0 = time.time()
            strategy.train(train, **kwargs)
            state.wall_time.append(time.time() - t0)
            res = strategy.eval(test, **kwargs)
            state.matrix.append([float(res[accuracy_key(stream.mode, j)]) for j in range(stream.num_tasks)])
            _echo_row(echo, state, "all tasks")
        else:
            for i in range(done, stream.num_tasks):
                task_clock["start"] = time.time()
                strategy.train(train[i], **kwargs)
                state.wall_time.append(task_clock["before"] + time.time() - task_clock["start"])
                task_clock["before"] = 0.0
                res = strategy.eval(test[: i + 1], **kwargs)
                state.matrix.append([float(res[accuracy_key(stream.mode, j)]) for j in range(i + 1)])
                state.open_after.append(len(model.open_adapters))
                _echo_row(echo, state, f"task {i}")
                elapsed = elapsed_before + time.time() - started
                if main_proc:
                    _write_checkpoint(
                        run_dir, model, strategy, state, {**ckpt_meta, "done": i + 1, "elapsed": elapsed}
                    )
                    stop["last"] = f"after task {i}"
                if stop["signal"] is not None:
                    raise RunInterrupted(stop["signal"])
    except RunInterrupted as e:
        kept = stop["last"] or "none (stopped before the first checkpoint)"
        raise RunInterrupted(
            f"{e.args[0]} received: stopped before the next step; last checkpoint: {kept}. "
            f"Resume with: cmtl run --resume --out {run_dir}"
        ) from None
    finally:
        _restore_signal_handlers(old_handlers)
    if model.open_adapters:  # strategies merge at the end of the stream; make sure of it
        model.set_fading(0.0)
        model.consolidate()

    summary = summarize(state.matrix)
    buffer_samples, buffer_bytes = _buffer_stats(strategy)
    qr = _qr_buffer(strategy)
    checksums = D.gather_strings(D.state_checksum(model.state_dict()))
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "name": cfg.name,
        "strategy": cfg.strategy.name,
        "scenario": stream.name,
        "mode": stream.mode,
        "evaluated_on": stream.evaluation,
        "seed": cfg.seed,
        "device": str(device),
        "task_classes": stream.task_classes,
        "accuracy_matrix": state.matrix,
        **summary,
        "wall_time_per_task": state.wall_time,
        "wall_time_total": elapsed_before + time.time() - started,
        "resumed": resume,
        "trainable_parameters_per_task": state.trainable,
        "backbone_parameters": sum(p.numel() for p in model.backbone.parameters()),
        "buffer_samples": buffer_samples,
        "buffer_bytes": buffer_bytes,
        "qr_records": None if qr is None else qr.record_quality(),
        "versions": versions(),
        "world_size": len(checksums),
    }
    if len(checksums) > 1:
        results["distributed"] = {"model_checksums": checksums, "ranks_identical": len(set(checksums)) == 1}
    if not main_proc:
        return results
    meta = {
        "task_classes": stream.task_classes,
        "image_size": stream.image_size,
        "mean": list(stream.mean),
        "std": list(stream.std),
        "scenario": stream.name,
        "strategy": cfg.strategy.name,
        "config": config_to_dict(cfg),
        "metrics": {k: results[k] for k in ("accuracy_matrix", *summary)},
    }
    save_snapshot(model, run_dir / "snapshot", meta)
    _write_metrics_csv(run_dir / "metrics.csv", state.matrix)
    if cfg.logging.plots:
        from cmtl.plots import plot_accuracy_matrix, plot_accuracy_per_task

        title = f"{cfg.strategy.name} on {stream.name} ({stream.mode})"
        plot_accuracy_matrix(state.matrix, run_dir / "accuracy_matrix.png", title=title)
        plot_accuracy_per_task(state.matrix, run_dir / "accuracy_per_task.png", title=title)
    write_json(run_dir / "results.json", results)  # last: its presence marks a finished run
    on = "" if stream.evaluation == "test" else f", on the {stream.evaluation} split"
    echo(f"accuracy matrix (%{on}; row: after training task i, column: task j)")
    echo(format_matrix(state.matrix))
    forgetting = summary["forgetting"]
    echo(
        f"final average accuracy {100 * summary['final_average_accuracy']:.2f}%, average incremental "
        f"accuracy {100 * summary['average_incremental_accuracy']:.2f}%, forgetting "
        + ("n/a" if forgetting is None else f"{100 * forgetting:.2f} pt")
        + f", {results['wall_time_total']:.0f}s; results in {run_dir}"
    )
    records = results["qr_records"]
    if records is not None:
        echo(
            f"QR buffer: {records['records']} records, {100 * records['wrong']:.1f}% of them wrong on "
            f"their own sample, mean true-class probability {records['true_class_probability']:.2f}"
        )
    return results


def _echo_row(echo: Callable[[str], None], state: RunState, label: str) -> None:
    row = state.matrix[-1]
    avg = 100 * sum(row) / len(row)
    seconds = state.wall_time[-1]
    echo(f"{label}: accuracy {100 * row[-1]:.1f}%, average over {len(row)} seen {avg:.1f}% ({seconds:.1f}s)")


def _write_metrics_csv(path: Path, matrix: list[list[float]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["after_task", "task", "accuracy"])
    for i, row in enumerate(matrix):
        after = len(matrix[-1]) - 1 if len(matrix) == 1 and len(row) > 1 else i
        for j, acc in enumerate(row):
            writer.writerow([after, j, f"{acc:.6f}"])
    _atomic_write_text(path, buf.getvalue())


@torch.no_grad()
def evaluate_snapshot(
    snapshot, cfg: ExperimentConfig, batch_size: int | None = None, device: str | torch.device = "cpu"
) -> list[float]:
    """Test accuracy of a loaded `Snapshot` on every task of `cfg`'s stream (built the same way as in
    the run: the snapshot's image size and normalisation). Mismatching streams raise ConfigError."""
    from torch.utils.data import DataLoader

    meta = snapshot.meta
    stream = build_stream(cfg, None, image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    if stream.mode != snapshot.mode or stream.classes_per_task != meta["classes_per_task"]:
        raise ConfigError(
            f"snapshot does not match the config: snapshot {snapshot.mode} with classes per task "
            f"{meta['classes_per_task']}, config {stream.mode} with {stream.classes_per_task}"
        )
    snapshot.to(device).eval()
    accs = []
    for j, exp in enumerate(stream.benchmark.test_stream):
        correct = total = 0
        loader = DataLoader(exp.dataset.eval(), batch_size=batch_size or cfg.strategy.eval_batch_size)
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            logits = snapshot(x, j if snapshot.mode == "til" else None)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
        accs.append(correct / max(total, 1))
    return accs
