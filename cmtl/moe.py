"""MoEfied LoRA on a timm `Mlp`: per-task adapters of LoRA experts with a token router and fading.

The wrapped `Mlp` must already be MoEfied (see `cmtl.moefy`): expert `e` owns the contiguous hidden
slice `[e * h / E, (e + 1) * h / E)`. For an adapter with router, the pre-activation of expert `e`
(bias and LoRA deltas included) is scaled per token by

    g_e = a * w_e + (1 - a),   w = E * softmax(router(x) / tau)

`a = 1` is the routed mixture; at `a = 0` every gate is exactly 1, so the MLP is the dense MLP with
the LoRA deltas added and `merge_and_unload` is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmtl.lora import init_lora_pair, merge_is_cheaper


class ExpertAdapter(nn.Module):
    """One task's adapter on one MLP: LoRA experts on `fc1`, LoRA on `fc2`, an optional router.

    `fc1` gets one rank-`r` LoRA per expert on that expert's row slice (EMTAL's MoEfied LoRA), so the
    experts learn different low-rank updates. `fc2` gets one rank-`r` LoRA whose `A` columns fall on
    the expert slices; its input is already gated, so it needs no per-expert split of its own.
    With `num_experts == 1` and no router this is plain LoRA on both layers.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        rank: int,
        alpha: float,
        tau: float = 5.0,
        router: bool = True,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if hidden % num_experts:
            raise ValueError(f"num_experts={num_experts} does not divide the MLP width {hidden}")
        dd = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = alpha / rank
        self.tau = tau
        self.fading = 1.0
        self.lora_A1 = nn.Parameter(torch.empty(num_experts, rank, dim, **dd))
        self.lora_B1 = nn.Parameter(torch.empty(num_experts, hidden // num_experts, rank, **dd))
        self.lora_A2 = nn.Parameter(torch.empty(rank, hidden, **dd))
        self.lora_B2 = nn.Parameter(torch.empty(dim, rank, **dd))
        init_lora_pair(self.lora_A1, self.lora_B1)
        init_lora_pair(self.lora_A2, self.lora_B2)
        # zero init: a uniform softmax, so every gate starts at exactly 1
        self.router = nn.Linear(dim, num_experts, bias=False, **dd) if router else None
        if self.router is not None:
            nn.init.zeros_(self.router.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # the fading coefficient is a python float (no device sync in forward) saved with the weights
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.fading, dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.fading = float(state)

    def gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token expert gates `(..., E)`, or None when they are all exactly 1."""
        if self.router is None or self.fading == 0.0:
            return None
        p = F.softmax(self.router(x) / self.tau, dim=-1)
        # written as 1 + E (p - 1/E) so a uniform router gives exactly 1.0 for any E
        w = 1.0 + self.num_experts * (p - 1.0 / self.num_experts)
        if self.fading == 1.0:
            return w
        return self.fading * w + (1.0 - self.fading)

    def fc1_delta(self, x: torch.Tensor) -> torch.Tensor:
        e, r, d = self.lora_A1.shape
        z = F.linear(self.dropout(x), self.lora_A1.reshape(e * r, d)).unflatten(-1, (e, r))
        return torch.einsum("...er,ehr->...eh", z, self.lora_B1).flatten(-2) * self.scaling

    def fc2_delta(self, h: torch.Tensor) -> torch.Tensor:
        return (self.dropout(h) @ self.lora_A2.t()) @ self.lora_B2.t() * self.scaling

    def delta_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense updates `(dW_fc1 (h x d), dW_fc2 (d x h))`."""
        e, hs, r = self.lora_B1.shape
        dw1 = torch.bmm(self.lora_B1, self.lora_A1).reshape(e * hs, -1) * self.scaling
        dw2 = (self.lora_B2 @ self.lora_A2) * self.scaling
        return dw1, dw2


class MoEMlp(nn.Module):
    """A MoEfied timm `Mlp` (`base_layer`, frozen) with any number of named `ExpertAdapter`s."""

    def __init__(self, base_layer: nn.Module, num_experts: int):
        super().__init__()
        self.base_layer = base_layer
        self.num_experts = num_experts
        self.adapters = nn.ModuleDict()

    @property
    def dim(self) -> int:
        return self.base_layer.fc1.in_features

    @property
    def hidden(self) -> int:
        return self.base_layer.fc1.out_features

    def add_adapter(
        self, name: str, rank: int, alpha: float, tau: float, moe: bool = True, dropout: float = 0.0
    ) -> ExpertAdapter:
        """Add adapter `name`: `num_experts` routed LoRA experts, or plain LoRA when `moe=False`."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        w = self.base_layer.fc1.weight
        ad = ExpertAdapter(
            self.dim,
            self.hidden,
            self.num_experts if moe else 1,
            rank,
            alpha,
            tau=tau,
            router=moe,
            dropout=dropout,
            device=w.device,
            dtype=w.dtype,
        )
        self.adapters[name] = ad
        return ad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # eval with enough tokens: one matmul per layer with `W + B A` instead of the low-rank path
        merged = None
        if not self.training and self.adapters:
            d, h = self.dim, self.hidden
            experts = max(ad.num_experts for ad in self.adapters.values())
            # per rank unit, the low-rank path costs tokens * (E d + 2 h + d), the merged one 2 h d
            if merge_is_cheaper(x.numel() // d, experts * d + 2 * h + d, 2 * h * d):
                merged = self._merged_weights()
        if merged is not None:
            h = F.linear(x, merged[0], base.fc1.bias)
        else:
            h = base.fc1(x)
            for ad in self.adapters.values():
                h = h + ad.fc1_delta(x)
        gate = None
        for ad in self.adapters.values():
            g = ad.gate(x)
            if g is not None:
                gate = g if gate is None else gate * g
        if gate is not None:
            h = (h.unflatten(-1, (self.num_experts, -1)) * gate.unsqueeze(-1)).flatten(-2)
        h = base.norm(base.drop1(base.act(h)))
        if merged is not None:
            return base.drop2(F.linear(h, merged[1], base.fc2.bias))
        y = base.fc2(h)
        for ad in self.adapters.values():
            y = y + ad.fc2_delta(h)
        return base.drop2(y)

    def _merged_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`fc1` and `fc2` weights with every open adapter's deltas added (not written back)."""
        w1, w2 = self.base_layer.fc1.weight, self.base_layer.fc2.weight
        for ad in self.adapters.values():
            dw1, dw2 = ad.delta_weights()
            w1, w2 = w1 + dw1, w2 + dw2
        return w1, w2

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Merge every adapter (all must be fully faded) and return the plain timm `Mlp`."""
        base = self.base_layer
        for name, ad in self.adapters.items():
            if ad.router is not None and ad.fading != 0.0:
                raise RuntimeError(f"adapter {name!r} has fading a={ad.fading}; fade it to 0 before merging")
            dw1, dw2 = ad.delta_weights()
            base.fc1.weight += dw1.to(base.fc1.weight.dtype)
            base.fc2.weight += dw2.to(base.fc2.weight.dtype)
        return base
