"""Create a timm Vision Transformer backbone, with weights from the timm hub or a local file.

Local weights are loaded without executing code: `.safetensors` through safetensors, `.pth`/`.pt`/
`.bin` through `torch.load(weights_only=True)`, `.npz` (big_vision / JAX) through timm's numpy loader.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


class UnsafeCheckpointError(ValueError):
    """A weights file that would need arbitrary code (pickled objects) to load."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a weights-only torch file; never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise ValueError(f"cannot read {str(path)!r} as safetensors: {e}") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
                raise UnsafeCheckpointError(
                    f"refusing {str(path)!r}: it holds pickled objects that would run code on load; "
                    "save plain tensors (or .safetensors) instead"
                ) from None
            raise ValueError(f"cannot read {str(path)!r} as a torch weights file: {e}") from None
        for key in ("state_dict", "model", "module"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
        return sd
    valid = ", ".join(WEIGHT_SUFFIXES)
    raise ValueError(f"unsupported weights file {str(path)!r}; valid suffixes: {valid}")


def load_backbone_weights(model: VisionTransformer, path: str | Path) -> None:
    """Load local weights into a timm ViT; the classifier head is skipped if its shape differs."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"weights file {str(path)!r} does not exist")
        model.load_pretrained(str(path))
        return
    sd = checkpoint_filter_fn(load_state_dict_file(path), model)
    own = model.state_dict()
    for k in [k for k in sd if k.startswith("head.") and (k not in own or own[k].shape != sd[k].shape)]:
        del sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"weights in {str(path)!r} do not match the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def create_backbone(
    name: str,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **kwargs,
) -> VisionTransformer:
    """Create a timm `VisionTransformer` by name.

    Args:
        name: a timm model name (`vit_base_patch16_224.augreg_in21k`, `deit_small_patch16_224`, ...).
        pretrained: download pretrained weights from the timm hub (needs internet or a cache).
        checkpoint: a local weights file (`.safetensors`, `.pth`, `.npz`), loaded safely.
        **kwargs: timm constructor arguments (`img_size`, `patch_size`, `embed_dim`, ...).
    """
    if name not in timm.list_models(pretrained=False) and name.split(".")[0] not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models('vit_*')")
    img, patch = kwargs.get("img_size"), kwargs.get("patch_size")
    if isinstance(img, int) and isinstance(patch, int) and img % patch:
        raise ValueError(f"img_size={img} is not a multiple of patch_size={patch}")
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except (OSError, RuntimeError, ConnectionError) as e:
        if pretrained:
            raise ValueError(
                f"cannot fetch pretrained weights for {name!r} ({type(e).__name__}); "
                "you look offline: set the `checkpoint` option to a local weights file"
            ) from None
        raise
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{name!r} builds a {type(model).__name__}; cmtl needs a timm VisionTransformer")
    pe = model.patch_embed
    if pe.img_size is not None and any(i % p for i, p in zip(pe.img_size, pe.patch_size)):
        raise ValueError(
            f"img_size={tuple(pe.img_size)} is not a multiple of patch_size={tuple(pe.patch_size)}"
        )
    if checkpoint is not None:
        load_backbone_weights(model, checkpoint)
        logger.info("loaded backbone weights from %s", checkpoint)
    return model
