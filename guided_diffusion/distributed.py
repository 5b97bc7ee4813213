"""Process-group set-up for torchrun (DDP) and plain single-process runs, device choice and CUDA speed flags.

Launch: `torchrun --nproc_per_node N script.py ...` (one process per GPU; `--nnodes/--rdzv_*` across nodes).
torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the script runs as one process, as before.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective (barrier, all-reduce, DDP's gradient reduction) waits for a silent peer before it
# fails. A peer that *exits* is noticed at once: torchrun then stops every worker. Override with
# SEG_DIST_TIMEOUT_S (seconds) when rank 0 needs longer alone, e.g. to save a very large checkpoint.
DEFAULT_TIMEOUT_S = 1800.0


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


def set_cuda_speedups(tf32: bool = True, cudnn_benchmark: bool = True) -> None:
    """cuDNN autotuning (`cudnn.benchmark`) and TF32 for fp32 matmuls and convolutions on Ampere and later.

    TF32 keeps fp32's range with a 10-bit mantissa in the tensor cores: several times faster fp32 matmuls,
    well inside the noise of diffusion training. Only the CUDA backends are touched; CPU numerics stay
    exact fp32. Uses the fp32_precision API where torch has it (mixing it with the legacy allow_tf32
    flags is an error in recent torch).
    """
    torch.backends.cudnn.benchmark = cudnn_benchmark
    mode = "tf32" if tf32 else "ieee"
    try:
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    except AttributeError:  # torch < 2.9: the legacy switches
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def _timeout() -> timedelta:
    raw = os.environ.get("SEG_DIST_TIMEOUT_S", "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"SEG_DIST_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    return timedelta(seconds=seconds)


def setup(device_flag: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU), else run alone.

    Under torchrun each process takes the GPU of its local rank (`--device cuda` or auto). On CUDA the
    speed flags of set_cuda_speedups are switched on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and device_flag.startswith("cuda:"):
        raise ValueError(f"--device {device_flag} under torchrun would put every process on one GPU; use "
                         f"--device cuda (each process takes the GPU of its LOCAL_RANK)")
    device = resolve_device(device_flag, local_rank)
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} needs GPU {device.index} but this node has "
                             f"{torch.cuda.device_count()}; start at most that many processes per node "
                             f"(--nproc_per_node)")
        torch.cuda.set_device(device)
        set_cuda_speedups()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=_timeout())
    return DistInfo(rank, world, local_rank, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def worker(info: DistInfo):
    """Run a script's body as one worker of the job: leave the process group cleanly on success; on an
    error, record it for torchrun's failure summary and leave at once.

    torchrun stops every worker when one exits non-zero, so a rank that fails (a bad image in its
    shard, a lost GPU) ends the whole job instead of leaving its peers blocked in a collective; the
    failing rank prints its own error, and the summary names that rank with the message. A rank whose
    collective broke only because a peer vanished prints one line instead of a traceback. A failed rank
    skips destroy_process_group: with peers blocked in NCCL it could wait on them forever.
    """
    try:
        yield info
    except Exception as exc:
        if not info.distributed:
            raise
        if is_peer_loss(exc) and not os.environ.get("SEG_DEBUG"):
            # Not this rank's fault: say so in one line and leave the root cause to the rank that failed.
            print(f"[rank{info.rank}]: stopped because another rank failed (see its error above or below): "
                  f"{str(exc).splitlines()[0][:200]}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        record_error(exc)
        raise
    cleanup()


_PEER_LOSS = ("connection closed by peer", "connection reset by peer", "remote worker", "broken pipe")


def is_peer_loss(exc: BaseException) -> bool:
    """A collective failed because a peer process went away (gloo reports it; NCCL ranks get killed)."""
    if isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _PEER_LOSS)


def record_error(exc: BaseException) -> None:
    """Write exc to the error file torchrun's elastic agent reads (TORCHELASTIC_ERROR_FILE), if any."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception:  # reporting must never hide the error itself
        pass


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (identity when not distributed)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def loader_workers(requested: int, log=print) -> int:
    """--num_workers capped at the CPUs this process may run on (torch warns about, and gains nothing from, more
    loader processes than CPUs); a note when it is capped. The data stream does not depend on the number."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on macOS / Windows
        usable = os.cpu_count() or 1
    if requested > usable:
        log(f"--num_workers {requested}: this process may use {usable} CPU(s); loading with {usable} worker(s)")
        return usable
    return requested
