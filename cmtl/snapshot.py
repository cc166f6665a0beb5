"""Consolidated model snapshots: a plain timm model folder plus task heads and a self-description.

    save_snapshot(model, "runs/x/snapshot", meta={"task_classes": ..., "mean": ..., "std": ...})
    snap = load_snapshot("runs/x/snapshot")             # Snapshot: backbone + heads, eval mode
    snap.predict(images, task=0)                         # labels in the stream's convention

    vit = timm.create_model("local-dir:runs/x/snapshot", pretrained=True)   # no cmtl needed

A snapshot directory holds tensors and JSON only, nothing pickled:

- `config.json`, `model.safetensors`: the consolidated backbone in timm's `local-dir:` format
  (`num_classes=0`); `config.json` also records the normalisation the streams used.
- `heads.safetensors`: `task{i}.weight` / `task{i}.bias` of every task head.
- `meta.json`: format, mode, classes per task, class names, architecture, versions, and whatever
  the caller adds (resolved config, metrics, ...).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, PatchDropout
from timm.models._hub import save_config_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cmtl.checkpoint import fsync_path
from cmtl.heads import MODES, TaskHeads
from cmtl.lora import LoRALinear
from cmtl.model import CMTLModel
from cmtl.moe import MoEMlp
from cmtl.version import __version__

__all__ = ["SNAPSHOT_FORMAT", "Snapshot", "SnapshotError", "load_snapshot", "save_snapshot"]

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HEADS_FILE = "heads.safetensors"
META_FILE = "meta.json"
SNAPSHOT_FILES = (CONFIG_FILE, WEIGHTS_FILE, HEADS_FILE, META_FILE)
# the architecture named in config.json for a backbone not built by timm's factory; every
# constructor argument that differs from VisionTransformer's defaults is given explicitly
FALLBACK_ARCHITECTURE = "vit_base_patch16_224"
# runtime-only modules that timm leaves out of exported constructor arguments
_RUNTIME_MODULES = (nn.Dropout, DropPath, PatchDropout, nn.Identity)


class SnapshotError(ValueError):
    """A snapshot file that is missing, truncated or inconsistent; the message names the file."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -- saving -----------------------------------------------------------------------------------------


def save_snapshot(model: CMTLModel, path: str | Path, meta: dict) -> Path:
    """Write a consolidated model to the directory `path`, replacing an earlier snapshot atomically.

    Args:
        model: a model without open adapters (`model.set_fading(0.0); model.consolidate()` first).
        path: the snapshot directory; an existing one is replaced only if it holds snapshot files only.
        meta: JSON-serialisable extras written to `meta.json`, usually `task_classes`, `mean`, `std`,
            `image_size`, `config` and `metrics`. They override the defaults derived from the model,
            except `format`, `mode` and `classes_per_task`, which always describe the saved heads.

    Returns:
        The snapshot directory.
    """
    if not isinstance(model, CMTLModel):
        raise TypeError(f"save_snapshot needs a CMTLModel, got {type(model).__name__}")
    if model.open_adapters:
        raise ValueError(
            f"cannot snapshot a model with open adapters ({', '.join(model.open_adapters)}); "
            "call model.set_fading(0.0) and model.consolidate() first"
        )
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    backbone = model.backbone
    wrapped = [n for n, m in backbone.named_modules() if isinstance(m, (LoRALinear, MoEMlp))]
    if wrapped:
        raise ValueError(
            f"the backbone still holds adapter wrappers ({', '.join(wrapped[:3])}); consolidate it"
        )
    if model.num_tasks == 0:
        raise ValueError("the model has no task head yet; call model.add_task(num_classes) first")

    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"snapshot path {str(path)!r} needs a directory name, e.g. 'runs/x/snapshot'")
    _check_replaceable(path)
    arch, model_args = _export_args(backbone)
    info = _meta(model, arch, meta)
    meta_text = json.dumps(info, indent=2)  # fail on a bad meta before touching the disk
    data_config = {
        "mean": tuple(info["mean"]),
        "std": tuple(info["std"]),
        # the streams' eval transform resizes the whole image to a square, no crop
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "interpolation": "bilinear",
    }

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_config(backbone, tmp / CONFIG_FILE, arch, model_args, data_config)
        _check_config_rebuilds(tmp / CONFIG_FILE, backbone)
        weights = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        heads = {}
        for i, head in enumerate(model.heads.heads):
            heads[f"task{i}.weight"] = head.weight.detach().cpu().contiguous()
            heads[f"task{i}.bias"] = head.bias.detach().cpu().contiguous()
        save_file(heads, str(tmp / HEADS_FILE), metadata={"format": "pt"})
        (tmp / META_FILE).write_text(meta_text + "\n")
        for name in SNAPSHOT_FILES:
            fsync_path(tmp / name)
        fsync_path(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved snapshot %s (%s, %d tasks)", path, model.mode, model.num_tasks)
    return path


def _check_replaceable(path: Path) -> None:
    # replacing means deleting: only ever delete a directory made of our own files
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"snapshot path {str(path)!r} exists and is not a directory")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in SNAPSHOT_FILES)
    if foreign:
        raise ValueError(
            f"refusing to replace {str(path)!r}: it is not a snapshot directory "
            f"(holds {', '.join(foreign[:5])}); choose an empty or new path"
        )


def _meta(model: CMTLModel, arch: str, meta: dict) -> dict:
    backbone = model.backbone
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    img_size = tuple(backbone.patch_embed.img_size or (224, 224))
    info: dict[str, Any] = {
        "architecture": arch,
        "versions": {"cmtl": __version__, "torch": torch.__version__, "timm": timm.__version__},
        "mean": list(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        "std": list(cfg.get("std", IMAGENET_DEFAULT_STD)),
        "image_size": img_size[0] if img_size[0] == img_size[1] else list(img_size),
        "model": model.describe(),
    }
    info.update(meta)
    classes_per_task = model.heads.classes_per_task
    info.update(format=SNAPSHOT_FORMAT, mode=model.mode, classes_per_task=classes_per_task)
    names = info.get("task_classes")
    if names is not None:
        widths = [len(n) for n in names] if isinstance(names, (list, tuple)) else None
        if widths != classes_per_task:
            raise ValueError(
                f"meta['task_classes'] gives {widths} class names per task; the heads have {classes_per_task}"
            )
        info["task_classes"] = [[str(c) for c in task] for task in names]
    for key in ("mean", "std"):
        value = info[key]
        if not isinstance(value, (list, tuple)) or len(value) != backbone.patch_embed.proj.in_channels:
            raise ValueError(f"meta[{key!r}]={value!r} needs one value per input channel")
    return info


def _export_args(backbone: VisionTransformer) -> tuple[str, dict | None]:
    """The timm architecture name and constructor arguments (None: timm's factory recorded them)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if getattr(backbone, "_model_args", None) is not None and cfg.get("architecture"):
        return cfg["architecture"], None
    return cfg.get("architecture", FALLBACK_ARCHITECTURE), _derive_vit_args(backbone)


def _derive_vit_args(vit: VisionTransformer) -> dict:
    """Constructor arguments of a VisionTransformer built without timm's factory, read off its modules."""
    block = vit.blocks[0]
    use_fc_norm = not isinstance(vit.fc_norm, nn.Identity)
    args = {
        "img_size": list(vit.patch_embed.img_size),
        "patch_size": list(vit.patch_embed.patch_size),
        "in_chans": vit.patch_embed.proj.in_channels,
        "num_classes": vit.num_classes,
        "global_pool": vit.global_pool,
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
        "proj_bias": block.attn.proj.bias is not None,
        # the LayerScale values are weights; only whether it exists matters here
        "init_values": 1.0 if isinstance(block.ls1, LayerScale) else None,
        "class_token": vit.cls_token is not None,
        "pos_embed": "learn" if vit.pos_embed is not None else "none",
        "no_embed_class": vit.no_embed_class,
        "reg_tokens": vit.num_reg_tokens,
        "pre_norm": not isinstance(vit.norm_pre, nn.Identity),
        "final_norm": use_fc_norm or not isinstance(vit.norm, nn.Identity),
        "fc_norm": use_fc_norm,
        "dynamic_img_size": vit.dynamic_img_size,
        "dynamic_img_pad": vit.patch_embed.dynamic_img_pad,
    }
    if hasattr(vit, "pool_include_prefix"):
        args["pool_include_prefix"] = vit.pool_include_prefix
    if hasattr(block.attn, "norm"):
        args["scale_attn_norm"] = not isinstance(block.attn.norm, nn.Identity)
    if hasattr(block.mlp, "norm"):
        args["scale_mlp_norm"] = not isinstance(block.mlp.norm, nn.Identity)
    return args


def _write_config(
    backbone: VisionTransformer, config_path: Path, arch: str, model_args: dict | None, data_config: dict
) -> None:
    # timm's exporter reads `model.pretrained_cfg`, which a directly built ViT lacks: lend it one
    borrowed = getattr(backbone, "pretrained_cfg", None) is None
    if borrowed:
        size = tuple(backbone.patch_embed.img_size)
        backbone.pretrained_cfg = {
            "architecture": arch,
            "input_size": (backbone.patch_embed.proj.in_channels, *size),
            "fixed_input_size": not backbone.dynamic_img_size,
            "num_classes": backbone.num_classes,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    try:
        save_config_for_hf(
            backbone,
            str(config_path),
            model_config={"pretrained_cfg": {"architecture": arch}},
            model_args=model_args,
            data_config=data_config,
        )
    finally:
        if borrowed:
            del backbone.pretrained_cfg


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    """What must agree for weights to mean the same function: leaf modules, tensor shapes, pooling."""
    out = [
        (name, repr(m))
        for name, m in model.named_modules()
        if not any(True for _ in m.children()) and not isinstance(m, _RUNTIME_MODULES)
    ]
    out += [(k, str(tuple(v.shape))) for k, v in model.state_dict().items()]
    attrs = ("global_pool", "num_prefix_tokens", "no_embed_class", "dynamic_img_size", "pool_include_prefix")
    out += [(a, repr(getattr(model, a, None))) for a in attrs]
    return out


def _check_config_rebuilds(config_path: Path, backbone: VisionTransformer) -> None:
    cfg = json.loads(config_path.read_text())
    with torch.device("meta"):  # shapes only, no memory or init cost
        rebuilt = timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {}))
    want, got = _structure(backbone), _structure(rebuilt)
    if want != got:
        i = next((i for i, (w, g) in enumerate(zip(want, got)) if w != g), min(len(want), len(got)))
        w, g = (want[i] if i < len(want) else None), (got[i] if i < len(got) else None)
        raise ValueError(
            f"timm cannot rebuild this backbone from constructor arguments (first difference: {w} vs "
            f"rebuilt {g}); create it with timm.create_model(...) so that timm records its arguments"
        )


def _replace_dir(tmp: Path, path: Path) -> None:
    # two renames: a crash between them leaves the old snapshot in the `.old-<pid>` sibling
    if path.exists():
        backup = path.parent / f".{path.name}.old-{os.getpid()}"
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(path, backup)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(backup, path)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)


# -- loading ----------------------------------------------------------------------------------------


class Snapshot(nn.Module):
    """A consolidated model for inference: a plain timm backbone and the task heads.

    Attributes:
        backbone: the timm `VisionTransformer` (`num_classes=0`).
        heads: one `nn.Linear` per task (a view of `task_heads.heads`).
        mode: "til" (a head per task, local labels) or "cil" (heads concatenated, global labels).
        meta: the contents of `meta.json`.
        task_classes: class names of each task, in label order.
        mean: normalisation mean of the streams' eval transform.
        std: normalisation std.
        image_size: side (or height, width) the streams resize images to.
    """

    def __init__(self, backbone: VisionTransformer, heads: Sequence[nn.Linear], mode: str, meta: dict):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        self.backbone = backbone
        self.task_heads = TaskHeads(backbone.num_features, mode=mode)
        self.task_heads.heads.extend(heads)
        self.mode = mode
        self.meta = meta
        widths = self.task_heads.classes_per_task
        names = meta.get("task_classes")
        if names is None:
            starts = np.cumsum([0, *widths]) if mode == "cil" else [0] * len(widths)
            names = [[str(s + i) for i in range(n)] for s, n in zip(starts, widths)]
        self.task_classes: list[list[str]] = [list(map(str, t)) for t in names]
        self.mean = tuple(float(v) for v in meta.get("mean", IMAGENET_DEFAULT_MEAN))
        self.std = tuple(float(v) for v in meta.get("std", IMAGENET_DEFAULT_STD))
        size = meta.get("image_size") or list(backbone.patch_embed.img_size)
        self.image_size: int | tuple[int, int] = size if isinstance(size, int) else tuple(size)

    @property
    def heads(self) -> nn.ModuleList:
        return self.task_heads.heads

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, pre-logit backbone features."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits of normalised images `x`.

        Args:
            x: float images N x C x H x W, normalised like the streams' eval transform.
            task: TIL only (required): the task id, or a tensor of per-sample ids for a mixed batch,
                whose narrower heads are padded to the widest with a very low logit.
        """
        if self.mode == "til":
            if task is None:
                raise ValueError(
                    f"a task-incremental snapshot needs `task` (0..{self.num_tasks - 1}) to pick a head"
                )
            if not isinstance(task, torch.Tensor) or task.ndim == 0:
                task = int(task)
        else:
            task = None
        return self.task_heads(self.forward_features(x), task)

    @torch.no_grad()
    def predict(self, images: Any, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """Predicted labels: local indices inside `task` (TIL) or global class indices (CIL).

        Args:
            images: see `preprocess`.
            task: as in `forward`.
        """
        return self(self.preprocess(images), task).argmax(dim=-1)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Turn images into the float batch the streams' eval transform yields.

        A float tensor N x C x H x W passes through unchanged (it is taken as already normalised).
        uint8 images (a tensor or array N x C x H x W, N x H x W x C or N x H x W, or a list of PIL
        images, H x W (x C) arrays or C x H x W tensors) are made RGB, resized to `image_size`
        (bilinear, antialiased, on uint8 like torchvision's `Resize`), scaled to [0, 1] and normalised.
        A 4-d batch is read as N x C x H x W when dim 1 looks like channels (1, 3 or 4).
        """
        device = next(self.parameters()).device
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if isinstance(images, torch.Tensor):
            if images.is_floating_point():
                if images.ndim != 4:
                    raise ValueError(f"float images must be N x C x H x W, got shape {tuple(images.shape)}")
                return images.to(device)
            return self._normalise(_batch_to_nchw(images).to(device))
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        return torch.cat([self._normalise(_image_to_chw(img)[None].to(device)) for img in images])

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        if x.dtype != torch.uint8:
            raise TypeError(f"integer images must be uint8, got {x.dtype}")
        channels = x.shape[1]
        if channels == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels == 4:
            x = x[:, :3]
        elif channels != 3:
            raise ValueError(f"cannot make RGB images from {channels} channels (shape {tuple(x.shape)})")
        size = [self.image_size] * 2 if isinstance(self.image_size, int) else list(self.image_size)
        x = F.resize(x, size, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        x = x.float() / 255.0
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def class_name(self, label: int | torch.Tensor, task: int | None = None) -> str:
        """The class name of a predicted label (TIL: `task` is required; CIL: `task` is ignored)."""
        label = int(label)
        if self.mode == "cil":
            names = [c for t in self.task_classes for c in t]
        else:
            if task is None:
                raise ValueError(f"a task-incremental label needs its task (0..{self.num_tasks - 1})")
            if not 0 <= int(task) < self.num_tasks:
                raise ValueError(f"task {task} does not exist; valid: 0..{self.num_tasks - 1}")
            names = self.task_classes[int(task)]
        if not 0 <= label < len(names):
            raise ValueError(f"label {label} out of range; valid: 0..{len(names) - 1}")
        return names[label]


def _batch_to_nchw(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(
            f"an image batch must be N x C x H x W, N x H x W x C or N x H x W, got {tuple(x.shape)}"
        )
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        return x.permute(0, 3, 1, 2)
    return x


def _image_to_chw(img: Any) -> torch.Tensor:
    if isinstance(img, torch.Tensor):  # torchvision's convention: C x H x W
        return img[None] if img.ndim == 2 else img
    if not isinstance(img, np.ndarray):
        from PIL import Image

        if not isinstance(img, Image.Image):
            raise TypeError(f"cannot read an image from {type(img).__name__}")
        img = np.asarray(img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGB"))
    t = torch.from_numpy(np.ascontiguousarray(img))  # arrays follow PIL: H x W (x C)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def load_snapshot(path: str | Path, device: str | torch.device = "cpu") -> Snapshot:
    """Load a snapshot directory written by `save_snapshot`, in eval mode.

    The backbone is built by `timm.create_model("local-dir:<path>", pretrained=True)`, the heads are
    read with safetensors: nothing is unpickled.

    Raises:
        SnapshotError: a file is missing, truncated, corrupted or inconsistent with the others.
    """
    path = Path(path)
    if not path.is_dir():
        raise SnapshotError(f"{path}: not a snapshot directory")
    meta = _read_meta(path / META_FILE)
    _read_config(path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    _check_safetensors(weights)
    try:
        backbone = timm.create_model(f"local-dir:{path}", pretrained=True)
    except Exception as e:
        raise SnapshotError(
            f"{weights}: does not load into the model {CONFIG_FILE} describes: {_one_line(e)}"
        ) from None
    if not isinstance(backbone, VisionTransformer):
        raise SnapshotError(
            f"{path / CONFIG_FILE}: builds a {type(backbone).__name__}, not a VisionTransformer"
        )
    heads = _read_heads(path / HEADS_FILE, meta["classes_per_task"], backbone.num_features)
    return Snapshot(backbone, heads, meta["mode"], meta).to(device).eval()


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise SnapshotError(f"{file}: missing")
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{file}: not valid JSON ({_one_line(e)})") from None


def _read_meta(file: Path) -> dict:
    meta = _read_json(file)
    if not isinstance(meta, dict):
        raise SnapshotError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    fmt = meta.get("format")
    if fmt != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"{file}: snapshot format {fmt!r} is not supported (this cmtl reads {SNAPSHOT_FORMAT})"
        )
    if meta.get("mode") not in MODES:
        raise SnapshotError(f"{file}: mode {meta.get('mode')!r} is not one of {', '.join(MODES)}")
    widths = meta.get("classes_per_task")
    if (
        not isinstance(widths, list)
        or not widths
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in widths)
    ):
        raise SnapshotError(
            f"{file}: classes_per_task={widths!r} must be a non-empty list of positive integers"
        )
    names = meta.get("task_classes")
    if names is not None and (
        not isinstance(names, list) or [len(t) if isinstance(t, list) else None for t in names] != widths
    ):
        raise SnapshotError(f"{file}: task_classes do not match classes_per_task={widths}")
    return meta


def _read_config(file: Path) -> None:
    cfg = _read_json(file)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise SnapshotError(f"{file}: not a timm model config (no 'architecture')")


def _check_safetensors(file: Path) -> None:
    if not file.is_file():
        raise SnapshotError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise SnapshotError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None


def _read_heads(file: Path, widths: list[int], in_features: int) -> list[nn.Linear]:
    _check_safetensors(file)
    try:
        tensors = load_file(str(file), device="cpu")
    except Exception as e:
        raise SnapshotError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None
    expected = {f"task{i}.{p}" for i in range(len(widths)) for p in ("weight", "bias")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise SnapshotError(
            f"{file}: tensors do not match {len(widths)} tasks "
            f"(missing {missing[:4]}, unexpected {extra[:4]})"
        )
    heads = []
    for i, n in enumerate(widths):
        w, b = tensors[f"task{i}.weight"], tensors[f"task{i}.bias"]
        if tuple(w.shape) != (n, in_features) or tuple(b.shape) != (n,):
            raise SnapshotError(
                f"{file}: task{i} has weight {tuple(w.shape)} and bias {tuple(b.shape)}; "
                f"expected ({n}, {in_features}) and ({n},)"
            )
        head = nn.Linear(in_features, n, dtype=w.dtype)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        heads.append(head.requires_grad_(False))
    return heads
