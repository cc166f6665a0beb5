"""Multi-process training with PyTorch's own distributed engine (torchrun; gloo on CPU, nccl on GPU).

cmtl's model changes shape every task (adapters are added, then merged away), and EMTAL's step runs
a second forward on a replay batch. Rather than re-wrapping the model in `DistributedDataParallel`
each task, ranks keep identical weights by: broadcasting the model from rank 0 whenever its
structure changed, averaging every gradient with one coalesced all-reduce before each optimiser
step (what DDP's reducer computes), and broadcasting the QR buffer after it is filled. Avalanche's
data loaders shard the training data per rank once `torch.distributed` is initialised.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes; CUDA devices are picked by LOCAL_RANK."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over ranks (one all-reduce per device and dtype)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        flat /= world
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` in place with rank `src`'s values."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data if isinstance(t, torch.nn.Parameter) else t, src)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Parameters and buffers of `module` from rank `src` (same structure required on every rank)."""
    broadcast_tensors([*module.parameters(), *module.buffers()], src)


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and bytes (to check that ranks agree)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_strings(value: str) -> list[str]:
    if not is_distributed():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
