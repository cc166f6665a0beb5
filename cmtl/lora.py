"""Plain LoRA on a linear layer (attention `qkv` / `proj`), stackable and mergeable.

Names follow PEFT (`base_layer`, `lora_A`, `lora_B`, `scaling`, `get_delta_weight`) so readers can
transfer what they know. Base weights are never edited until `merge_and_unload`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_lora_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """PEFT's default init: A Kaiming-uniform, B zero, so a new adapter changes nothing."""
    with torch.no_grad():
        if a.dim() == 3:  # per-expert stack (E, r, d): initialise each expert like a Linear
            for e in range(a.shape[0]):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b.zero_()


def merge_is_cheaper(tokens: int, low_rank_width: int, weight_size: int) -> bool:
    """Whether an eval forward should add the LoRA deltas to the weight before its matmul.

    Per unit of rank, the low-rank path costs `tokens * low_rank_width` multiply-adds (for plain
    LoRA `in + out`) and forming `W + B A` costs `weight_size` (`in * out`), independent of the
    batch. Big batches (many tokens) therefore run faster merged, single images low-rank: at
    ViT-B/16 a 197-token image stays low-rank, a batch of 64 merges.
    """
    return tokens * low_rank_width > weight_size


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus the low-rank deltas of any number of named adapters."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Add adapter `name` of rank `rank` with scaling `alpha / rank`."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        w = self.base_layer.weight
        a = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        b = nn.Parameter(torch.empty(w.shape[0], rank, device=w.device, dtype=w.dtype))
        init_lora_pair(a, b)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / rank

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """The dense weight update of adapter `name` (out x in)."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        if (
            not self.training
            and self.lora_A
            and merge_is_cheaper(x.numel() // w.shape[1], sum(w.shape), w.numel())
        ):
            # eval with many tokens: one matmul with W + sum(B A) instead of the low-rank path
            for name in self.lora_A:
                w = w + self.get_delta_weight(name)
            return F.linear(x, w, self.base_layer.bias)
        y = self.base_layer(x)
        for name, a in self.lora_A.items():
            z = self.lora_dropout[name](x) @ a.t()
            y = y + (z @ self.lora_B[name].t()) * self.scaling[name]
        return y

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Linear:
        """Add every adapter's delta to the base weight and return the plain `nn.Linear`."""
        for name in self.adapter_names:
            self.base_layer.weight += self.get_delta_weight(name).to(self.base_layer.weight.dtype)
        return self.base_layer
