"""Process-group set-up for torchrun (DDP) and plain single-process runs, and device choice."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among world_size processes, and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda|cuda:N -> a torch.device; a clear error when CUDA is asked for but absent."""
    if flag == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if flag.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {flag}: CUDA is not available on this machine (use --device cpu)")
        return torch.device(f"cuda:{local_rank}") if flag == "cuda" else torch.device(flag)
    if flag == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {flag!r}")


def setup(device_flag: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
