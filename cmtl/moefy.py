"""MoEfication: split each ViT MLP's hidden neurons into equal, contiguous experts.

Following EMTAL (and MoEfication, Zhang et al. 2022), the hidden neurons of every block's `Mlp` are
clustered by balanced k-means on the L2-normalised rows of `fc1.weight`, then the neurons are
permuted (rows of `fc1`, its bias, columns of `fc2`) so expert `e` is the slice
`[e * h / E, (e + 1) * h / E)`. The permutation does not change the function.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

logger = logging.getLogger(__name__)


def _greedy_balanced_assign(sim: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each row to a column, most similar pairs first, no column above `capacity`."""
    n, k = sim.shape
    order = np.argsort(-sim, axis=None, kind="stable")
    assign = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    left = n
    for flat in order:
        i, c = divmod(int(flat), k)
        if assign[i] < 0 and load[c] < capacity:
            assign[i] = c
            load[c] += 1
            left -= 1
            if left == 0:
                break
    return assign


def _exact_balanced_assign(sim: np.ndarray, capacity: int) -> np.ndarray:
    """Optimal assignment with exactly `capacity` rows per column (Hungarian on repeated slots)."""
    k = sim.shape[1]
    rows, slots = linear_sum_assignment(-np.repeat(sim, capacity, axis=1))
    assign = np.empty(sim.shape[0], dtype=np.int64)
    assign[rows] = slots // capacity
    assert np.bincount(assign, minlength=k).max() == capacity
    return assign


def balanced_kmeans(points: np.ndarray, num_clusters: int, seed: int = 0, iters: int = 15) -> np.ndarray:
    """Cluster rows of `points` into `num_clusters` groups of exactly equal size (cosine k-means).

    Greedy capacity-constrained assignments drive the iterations (fast); the final assignment is
    the exact optimum for the final centroids.

    Args:
        points: (n, d) array; rows are L2-normalised here.
        num_clusters: number of clusters; must divide n.
        seed: seed of the k-means++ initialisation (the result is deterministic for a seed).
        iters: refinement iterations.

    Returns:
        (n,) int array of cluster ids, each id used exactly n / num_clusters times.
    """
    n = points.shape[0]
    if num_clusters <= 0 or n % num_clusters:
        raise ValueError(f"num_experts={num_clusters} must be positive and divide the {n} hidden neurons")
    capacity = n // num_clusters
    x = points.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if num_clusters == 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    # k-means++ seeding on cosine distance
    centroids = [x[rng.integers(n)]]
    dist = 1.0 - x @ centroids[0]
    for _ in range(1, num_clusters):
        p = np.clip(dist, 0, None) ** 2
        p = p / p.sum() if p.sum() > 0 else np.full(n, 1.0 / n)
        centroids.append(x[rng.choice(n, p=p)])
        dist = np.minimum(dist, 1.0 - x @ centroids[-1])
    c = np.stack(centroids)
    assign = None
    for _ in range(iters):
        new = _greedy_balanced_assign(x @ c.T, capacity)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(num_clusters):
            m = x[assign == j].sum(axis=0)
            c[j] = m / max(np.linalg.norm(m), 1e-12)
    return _exact_balanced_assign(x @ c.T, capacity)


def expert_permutation(fc1_weight: torch.Tensor, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Permutation of hidden neurons that makes each balanced cluster a contiguous slice."""
    assign = balanced_kmeans(fc1_weight.detach().float().cpu().numpy(), num_experts, seed=seed)
    # stable sort keeps neurons of an expert in their original relative order
    return torch.from_numpy(np.argsort(assign, kind="stable"))


@torch.no_grad()
def permute_mlp_hidden(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Permute the hidden units of a timm `Mlp` in place (function preserving)."""
    perm = perm.to(mlp.fc1.weight.device)
    mlp.fc1.weight.copy_(mlp.fc1.weight[perm])
    if mlp.fc1.bias is not None:
        mlp.fc1.bias.copy_(mlp.fc1.bias[perm])
    mlp.fc2.weight.copy_(mlp.fc2.weight[:, perm])
    norm = getattr(mlp, "norm", None)
    # a norm over the hidden features (scale_mlp_norm models) is permutation equivariant
    # once its affine parameters are permuted too
    if norm is not None and not isinstance(norm, nn.Identity):
        for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
            if p is not None:
                p.copy_(p[perm])


def moefy_mlp(mlp: nn.Module, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Cluster and permute one `Mlp` into `num_experts` contiguous experts; returns the permutation."""
    perm = expert_permutation(mlp.fc1.weight, num_experts, seed=seed)
    permute_mlp_hidden(mlp, perm)
    return perm


def find_mlps(vit: nn.Module) -> list[tuple[str, nn.Module]]:
    """The `(name, Mlp)` of every transformer block of a timm ViT, e.g. `blocks.3.mlp`."""
    out = []
    for i, block in enumerate(vit.blocks):
        mlp = block.mlp
        if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")):
            raise TypeError(f"blocks.{i}.mlp is {type(mlp).__name__}; expected a timm Mlp with fc1/fc2")
        out.append((f"blocks.{i}.mlp", mlp))
    return out


def moefy_vit(vit: nn.Module, num_experts: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """MoEfy every block's MLP of a timm ViT in place; returns the permutations by module name."""
    perms = {}
    for k, (name, mlp) in enumerate(find_mlps(vit)):
        perms[name] = moefy_mlp(mlp, num_experts, seed=seed + k)
    logger.debug("moefied %d MLPs into %d experts", len(perms), num_experts)
    return perms
