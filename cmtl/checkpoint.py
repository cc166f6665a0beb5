"""Run checkpoints: one safetensors file of plain tensors plus JSON metadata, written atomically.

A checkpoint holds everything `cmtl run --resume` needs to continue after a finished experience:
model tensors, strategy state (QR buffer, EWC importances, replay indices, ...), the RNG states of
python, numpy and torch, the stream position and the metrics so far. Nothing is pickled: tensors go
through safetensors, everything else is JSON in the safetensors header, so loading a checkpoint
cannot run code. The file is replaced with `os.replace` after an fsync, so a kill at any instant
leaves either the previous or the new checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.safetensors"
_META_KEY = "cmtl"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or from an incompatible run."""


def fsync_path(path: Path) -> None:
    """fsync a file or directory, where the platform allows it (some cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write `tensors` (CPU, contiguous copies are made) and JSON-able `meta`."""
    from safetensors.torch import save

    path = Path(path)
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = json.dumps({"format": CHECKPOINT_FORMAT, **meta})
    atomic_write_bytes(path, save(clean, metadata={_META_KEY: header}))
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint; CheckpointError names the file and the problem."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iterator)
    except Exception as e:  # safetensors raises its own types for truncated or garbled files
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable (truncated or corrupted): {e}"
        ) from None
    if header is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has no cmtl metadata")
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has corrupted metadata: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {meta.get('format')!r}; this cmtl reads {CHECKPOINT_FORMAT}"
        )
    return tensors, meta


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The python, numpy and torch (CPU and CUDA) RNG states as tensors + JSON."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned."""
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    n = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
