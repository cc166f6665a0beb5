"""The continual model: a timm ViT that grows an adapter per task and consolidates back to plain timm.

    model = CMTLModel.from_timm("vit_base_patch16_224.augreg_in21k", pretrained=True,
                                adapter=AdapterConfig(num_experts=16, rank=4))
    model.add_task(num_classes=10)        # new adapter (LoRA experts + routers) and head
    ...train model.trainable_parameters()...
    model.set_fading(0.0)                 # routers faded out: every gate is exactly 1
    vit = model.consolidate()             # adapters merged: a plain timm VisionTransformer

Task labels only choose a head (task-incremental); in class-incremental mode there is one growing
head and task labels are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cmtl.backbone import create_backbone
from cmtl.heads import MODES, TaskHeads
from cmtl.lora import LoRALinear
from cmtl.moe import ExpertAdapter, MoEMlp
from cmtl.moefy import find_mlps, moefy_vit

logger = logging.getLogger(__name__)

ATTN_TARGETS = ("qkv", "proj")
BASE_GROUPS = ("embed", "norms", "attn", "mlp")  # pre-trained weights an adapter strategy may train directly


@dataclass
class AdapterConfig:
    """How each task's adapter is built.

    Attributes:
        num_experts: experts per MLP (EMTAL: 16 for ViT-B, i.e. 192 neurons each).
        rank: LoRA rank of every low-rank update.
        alpha: LoRA scaling numerator (scaling = alpha / rank); None means alpha = rank.
        tau: router softmax temperature.
        attn_lora: also put plain LoRA on `attn.qkv` and `attn.proj` (EMTAL adapts all four).
        moe: False gives plain LoRA on the MLP (no experts, no router): the `lora` baseline and
            the `emtal_no_moe` ablation.
        dropout: dropout on the LoRA inputs.
    """

    num_experts: int = 8
    rank: int = 4
    alpha: float | None = None
    tau: float = 5.0
    attn_lora: bool = True
    moe: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for field, value in (("num_experts", self.num_experts), ("rank", self.rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field}={value!r} must be a positive integer")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau!r} must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")

    @property
    def scaling_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


class CMTLModel(nn.Module):
    """A timm ViT with MoEfied MLPs, per-task adapters and heads.

    Args:
        backbone: a timm `VisionTransformer`; its classifier is removed (heads live in `self.heads`).
        adapter: adapter settings; None builds no adapters (full fine-tuning baselines).
        mode: "til" (one head per task) or "cil" (one growing head).
        moefy_seed: seed of the balanced k-means that splits each MLP into experts.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        adapter: AdapterConfig | None = None,
        mode: str = "til",
        moefy_seed: int = 0,
    ):
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"backbone must be a timm VisionTransformer, got {type(backbone).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.adapter_config = adapter
        self.mode = mode
        self.moefy_seed = moefy_seed
        self.heads = TaskHeads(backbone.num_features, mode=mode)
        self.open_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.tuned_base: tuple[str, ...] = ()
        self.backbone.requires_grad_(False)
        self._moefied = False
        if adapter is not None and adapter.moe:
            self._check_experts(adapter.num_experts)
            self._moefy()

    def _moefy(self) -> None:
        # merged weights differ from the last split, so each consolidation round re-clusters
        seed = self.moefy_seed + 1000 * len(self.merged_adapters)
        moefy_vit(self.backbone, self.adapter_config.num_experts, seed=seed)
        self._moefied = True

    @classmethod
    def from_timm(
        cls,
        name: str,
        pretrained: bool = False,
        checkpoint: str | None = None,
        adapter: AdapterConfig | None = None,
        mode: str = "til",
        moefy_seed: int = 0,
        **model_kwargs,
    ) -> CMTLModel:
        """Build from a timm model name; see `cmtl.backbone.create_backbone` for the weights options."""
        backbone = create_backbone(name, pretrained=pretrained, checkpoint=checkpoint, **model_kwargs)
        return cls(
            backbone,
            adapter=adapter if adapter is not None else AdapterConfig(),
            mode=mode,
            moefy_seed=moefy_seed,
        )

    def _check_experts(self, num_experts: int) -> None:
        for name, mlp in find_mlps(self.backbone):
            hidden = mlp.fc1.out_features
            if hidden % num_experts:
                valid = [d for d in range(1, min(hidden, 64) + 1) if hidden % d == 0]
                raise ValueError(
                    f"num_experts={num_experts} does not divide the MLP width {hidden} of {name}; "
                    f"valid: {', '.join(map(str, valid))}"
                )

    # -- tasks and adapters ---------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.heads.heads)

    def add_task(self, num_classes: int, adapter: bool = True) -> int:
        """Add a head for a new task and (by default) a fresh adapter; returns the task index.

        Earlier adapters are frozen; the new adapter starts as the identity (B = 0, gates = 1).
        """
        task = self.num_tasks
        self.heads.add_task(num_classes)
        if adapter and self.adapter_config is not None:
            self.add_adapter(f"task{task}")
        return task

    def add_adapter(self, name: str) -> None:
        """Add a fresh adapter called `name` to every targeted layer, freezing the older ones."""
        cfg = self.adapter_config
        if cfg is None:
            raise RuntimeError("this model was built without an AdapterConfig")
        if name in self.open_adapters or name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} already exists")
        for old in self.adapter_modules(self.open_adapters):
            old.requires_grad_(False)
        if cfg.moe and not self._moefied:
            self._moefy()
        self._wrap_layers()
        for block in self.backbone.blocks:
            block.mlp.add_adapter(
                name, cfg.rank, cfg.scaling_alpha, cfg.tau, moe=cfg.moe, dropout=cfg.dropout
            )
            if cfg.attn_lora:
                for t in ATTN_TARGETS:
                    getattr(block.attn, t).add_adapter(name, cfg.rank, cfg.scaling_alpha, cfg.dropout)
        self.open_adapters.append(name)

    def _wrap_layers(self) -> None:
        cfg = self.adapter_config
        for block in self.backbone.blocks:
            if not isinstance(block.mlp, MoEMlp):
                block.mlp = MoEMlp(block.mlp, cfg.num_experts)
            if cfg.attn_lora:
                for t in ATTN_TARGETS:
                    layer = getattr(block.attn, t)
                    if not isinstance(layer, LoRALinear):
                        setattr(block.attn, t, LoRALinear(layer))

    def adapter_modules(self, names: list[str] | None = None) -> list[nn.Module]:
        """Per-layer pieces (`ExpertAdapter`s and LoRA factors) of the named (default: open) adapters."""
        names = self.open_adapters if names is None else names
        out: list[nn.Module] = []
        for block in self.backbone.blocks:
            if isinstance(block.mlp, MoEMlp):
                out += [block.mlp.adapters[n] for n in names if n in block.mlp.adapters]
            for t in ATTN_TARGETS:
                layer = getattr(block.attn, t)
                if isinstance(layer, LoRALinear):
                    out += [
                        nn.ParameterList([layer.lora_A[n], layer.lora_B[n]])
                        for n in names
                        if n in layer.lora_A
                    ]
        return out

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Parameters of adapter `name` (default: the newest open adapter), routers included."""
        if not self.open_adapters:
            return []
        name = self.open_adapters[-1] if name is None else name
        if name not in self.open_adapters:
            raise ValueError(f"no open adapter {name!r}; open: {', '.join(self.open_adapters) or 'none'}")
        return [p for m in self.adapter_modules([name]) for p in m.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that currently requires grad (the newest adapter and the heads, by default)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of the newest adapter, split into LoRA, routers, and heads."""
        routers = lora = 0
        for p_name, p in self._named_adapter_params():
            if ".router." in p_name:
                routers += p.numel()
            else:
                lora += p.numel()
        head = (
            self.heads.heads[-1].weight.numel() + self.heads.heads[-1].bias.numel() if self.num_tasks else 0
        )
        return {"lora": lora, "routers": routers, "adapter": lora + routers, "head": head}

    def _named_adapter_params(self):
        if not self.open_adapters:
            return
        name = self.open_adapters[-1]
        for p_name, p in self.backbone.named_parameters():
            parts = p_name.split(".")
            if name in parts:
                yield p_name, p

    # -- fading and consolidation ---------------------------------------------------------------

    def _expert_adapters(self, name: str | None) -> list[ExpertAdapter]:
        names = self.open_adapters if name is None else [name]
        return [m for m in self.adapter_modules(names) if isinstance(m, ExpertAdapter)]

    def set_fading(self, a: float, adapter: str | None = None) -> None:
        """Set the router fading coefficient `a` in [0, 1] of adapter `adapter` (default: every open one).

        `a = 1` routes tokens through the experts; `a = 0` makes every gate exactly 1.
        """
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"fading a={a!r} must be in [0, 1]")
        if not self.open_adapters:
            return
        if adapter is not None and adapter not in self.open_adapters:
            raise ValueError(f"no open adapter {adapter!r}; open: {', '.join(self.open_adapters)}")
        for ad in self._expert_adapters(adapter):
            ad.fading = float(a)

    def fading(self) -> dict[str, float]:
        """Current fading coefficient of each open adapter (adapters without routers count as 0)."""
        out = {}
        for name in self.open_adapters:
            ads = [ad for ad in self._expert_adapters(name) if ad.router is not None]
            out[name] = max((ad.fading for ad in ads), default=0.0)
        return out

    @torch.no_grad()
    def consolidate(self) -> VisionTransformer:
        """Merge every open adapter into the base weights and drop adapters and routers.

        Every open adapter must be fully faded (`set_fading(0.0)`), which makes the merge exact.
        Afterwards `self.backbone` is a plain timm `VisionTransformer`; the next `add_adapter`
        re-MoEfies it (a function preserving permutation) before adding experts.
        """
        unfaded = {n: a for n, a in self.fading().items() if a != 0.0}
        if unfaded:
            raise RuntimeError(f"adapters not faded to 0: {unfaded}; call set_fading(0.0, name) first")
        for block in self.backbone.blocks:
            if isinstance(block.mlp, MoEMlp):
                block.mlp = block.mlp.merge_and_unload()
            for t in ATTN_TARGETS:
                layer = getattr(block.attn, t)
                if isinstance(layer, LoRALinear):
                    setattr(block.attn, t, layer.merge_and_unload())
        self.merged_adapters += self.open_adapters
        self.open_adapters = []
        self.backbone.requires_grad_(False)
        self.tune_base(self.tuned_base)
        self._moefied = False
        return self.backbone

    def set_backbone_trainable(self, trainable: bool = True) -> None:
        """Unfreeze (or freeze) the base weights, for full fine-tuning baselines.

        Freezing keeps the `tune_base` groups trainable."""
        for name, p in self.backbone.named_parameters():
            if ".base_layer." in name or not any(k in name for k in ("lora_", ".router.")):
                p.requires_grad_(trainable)
        if not trainable:
            self.tune_base(self.tuned_base)

    def tune_base(self, groups: tuple[str, ...] | list[str]) -> None:
        """Train these groups of pre-trained weights directly, next to the adapters.

        "embed": the patch embedding, position embedding and class (and register) tokens;
        "norms": every LayerNorm's scale and shift; "attn": every block's attention `qkv` and
        `proj` weights and biases (under their LoRA adapters); "mlp": every block's MLP `fc1` and
        `fc2` (the weights the experts are cut from, under the routers' gates and the experts'
        adapters). All four together train every pre-trained weight, as full fine-tuning does,
        with the adapters on top. They are plain timm weights, so a consolidated model still has
        the same modules and cost. Groups left out are frozen again; the choice survives
        `consolidate` (and the re-clustering into experts after it, which permutes in place).
        `tuned_base_parameters` lists what is trained.
        """
        bad = [g for g in groups if g not in BASE_GROUPS]
        if bad:
            raise ValueError(f"unknown base weight group {bad[0]!r}; valid: {', '.join(BASE_GROUPS)}")
        for p in self.tuned_base_parameters():
            p.requires_grad_(False)
        self.tuned_base = tuple(dict.fromkeys(groups))
        for p in self.tuned_base_parameters():
            p.requires_grad_(True)

    def tuned_base_parameters(self) -> list[nn.Parameter]:
        """The pre-trained weights in the `tune_base` groups (empty when none are chosen)."""
        vit = self.backbone
        params: list[nn.Parameter] = []
        if "embed" in self.tuned_base:
            params += list(vit.patch_embed.parameters())
            params += [
                p
                for p in (getattr(vit, n, None) for n in ("pos_embed", "cls_token", "reg_token"))
                if isinstance(p, nn.Parameter)
            ]
        if "norms" in self.tuned_base:
            params += [p for m in vit.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
        if "attn" in self.tuned_base:
            for block in vit.blocks:
                for t in ATTN_TARGETS:
                    layer = getattr(block.attn, t)
                    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
                    params += list(base.parameters())
        if "mlp" in self.tuned_base:
            for block in vit.blocks:
                mlp = block.mlp.base_layer if isinstance(block.mlp, MoEMlp) else block.mlp
                params += list(mlp.parameters())
        return list({id(p): p for p in params}.values())

    # -- timm protocol --------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, pre-logit features of the shared backbone."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward_head(
        self, features: torch.Tensor, task_labels: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        return self.heads(features, task_labels)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), task_labels)

    def describe(self) -> dict:
        """Plain-data description (architecture arguments, tasks, adapters) for snapshots and logs."""
        return {
            "mode": self.mode,
            "classes_per_task": self.heads.classes_per_task,
            "open_adapters": list(self.open_adapters),
            "merged_adapters": list(self.merged_adapters),
            "adapter_config": asdict(self.adapter_config) if self.adapter_config else None,
            "moefy_seed": self.moefy_seed,
            "num_features": self.backbone.num_features,
        }
