"""Training throughput of one configuration under each speed option: images/s, peak memory, data waiting.

Every variant builds a fresh Trainer (same seed, same initial weights) and times its real `train_step`
(forward, losses, backward, clipping, AdamW, EMA), so what is measured is what training runs. Two data modes:
`memory` reuses one batch already on the device (the model's own speed: no loading, no copy), `loader` pulls
batches from the training DataLoader with --num_workers workers and pinned memory on CUDA (the run's real
speed); the fraction of the loader's step time spent blocked on the next batch is the time the device
waited for data (0 means the workers keep up). `loader_only` times the DataLoader with no model, with
--preload False and True: the images/s the workers can supply, to compare with the model's images/s.
"""
from __future__ import annotations

import csv
import gc
import io
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

import torch

from guided_diffusion.distributed import DistInfo, set_cuda_speedups
from guided_diffusion.config import DataConfig, DiffusionConfig, ModelConfig, TrainConfig

OPTIONS = ("bf16", "fp16", "channels_last", "compile", "tf32", "cudnn_benchmark")
CUDA_ONLY = ("fp16", "tf32", "cudnn_benchmark")
DEFAULT_VARIANTS = {
    "cpu": "fp32,channels_last,bf16",
    "cuda": "fp32,tf32,cudnn_benchmark,bf16,channels_last,compile,tf32+cudnn_benchmark+bf16+channels_last+compile",
}
DATA_MODES = ("memory", "loader", "loader_only")


@dataclass
class BenchResult:
    """One (variant, data mode) measurement."""
    variant: str
    data: str
    images_per_s: float = float("nan")
    ms_per_step: float = float("nan")
    peak_mem_mib: float = float("nan")
    data_wait: float = float("nan")        # fraction of step time blocked on the next batch
    warmup_s: float = float("nan")         # the warm-up steps, compilation included
    loss: float = float("nan")             # mean loss of the timed steps (a sanity check, not a metric)
    speedup: float = float("nan")          # images/s over the fp32 (preload False) row's in the same data mode
    note: str = ""


@dataclass
class BenchConfig:
    """What to measure: the configs of a training run plus the benchmark's own settings."""
    model: ModelConfig
    diffusion: DiffusionConfig
    data: DataConfig
    train: TrainConfig
    warmup: int = 3
    steps: int = 10
    variants: list[frozenset[str]] = field(default_factory=lambda: [frozenset()])
    data_modes: tuple[str, ...] = DATA_MODES


def variant_name(opts: frozenset[str]) -> str:
    return "+".join(o for o in OPTIONS if o in opts) or "fp32"


def parse_variants(spec: str) -> list[frozenset[str]]:
    """'fp32,bf16,bf16+channels_last' -> [{}, {bf16}, {bf16, channels_last}] (fp32: no option)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        opts = frozenset(o.strip() for o in item.split("+") if o.strip() not in ("", "fp32", "baseline"))
        unknown = sorted(opts - set(OPTIONS))
        if unknown:
            raise ValueError(f"--variants: unknown option {unknown[0]!r} in {item!r}; options are fp32 (none), "
                             + ", ".join(OPTIONS) + ", joined with +")
        if {"bf16", "fp16"} <= opts:
            raise ValueError(f"--variants: {item!r} asks for both bf16 and fp16")
        out.append(opts)
    if not out:
        raise ValueError("--variants is empty")
    return out


def parse_data_modes(spec: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in spec.split(",") if m.strip())
    bad = [m for m in modes if m not in DATA_MODES]
    if bad or not modes:
        raise ValueError(f"--data must be a comma-separated list of {', '.join(DATA_MODES)}, got {spec!r}")
    return modes


# ----- memory ------------------------------------------------------------------------------------------
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_mib(device: torch.device) -> float:
    """Peak device memory allocated by tensors on CUDA; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- one measurement -----------------------------------------------------------------------------------
def _unavailable(opts: frozenset[str], device: torch.device) -> str:
    if device.type != "cuda":
        off = [o for o in CUDA_ONLY if o in opts]
        if off:
            return f"{', '.join(off)}: CUDA only"
    if "bf16" in opts and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "bf16 unsupported on this GPU (the trainer would use fp16 + grad scaler)"
    return ""


def _trainer(cfg: BenchConfig, opts: frozenset[str], device: torch.device, out_dir: str, data_mode: str):
    from guided_diffusion.training.diffusion import DiffusionTrainer

    amp = "bf16" if "bf16" in opts else "fp16" if "fp16" in opts else "none"
    preload = cfg.train.preload if data_mode == "loader" else "False"  # memory mode reads one batch
    tc = replace(cfg.train, out_dir=out_dir, resume="none", max_steps=10 ** 9, amp=amp, preload=preload,
                 channels_last="channels_last" in opts, compile="compile" in opts, device=str(device))
    if device.type == "cuda":
        set_cuda_speedups(tf32="tf32" in opts, cudnn_benchmark="cudnn_benchmark" in opts)
    return DiffusionTrainer(cfg.model, cfg.diffusion, cfg.data, tc, DistInfo(0, 1, 0, device))


def measure_loader(cfg: BenchConfig, preload: bool, device: torch.device) -> BenchResult:
    """Images/s the training DataLoader supplies alone (no model): worker start and preloading are warm-up."""
    from guided_diffusion.data import datasets
    from guided_diffusion.training.core import train_loader

    res = BenchResult(f"preload {preload}", "loader_only")
    datasets.ensure_dataset(cfg.data.data_name, cfg.data.data_dir)
    pairs = datasets.list_pairs(cfg.data.data_name, cfg.data.data_dir, "train")
    tc = replace(cfg.train, preload=str(preload))
    _reset_peak(torch.device("cpu"))  # the loader's memory is host memory, whatever the device
    start = time.perf_counter()
    loader = train_loader(pairs, cfg.model.image_size, tc, 0, DistInfo(0, 1, 0, device))
    batches = iter(loader)
    for _ in range(cfg.warmup):
        next(batches)
    res.warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(cfg.steps):
        next(batches)
    total = time.perf_counter() - start
    res.peak_mem_mib = _peak_mib(torch.device("cpu"))
    res.images_per_s = cfg.steps * cfg.train.batch_size / max(total, 1e-12)
    res.ms_per_step = 1000 * total / cfg.steps
    del batches, loader
    gc.collect()
    return res


def measure(cfg: BenchConfig, opts: frozenset[str], data_mode: str, device: torch.device) -> BenchResult:
    """Warm up, then time cfg.steps training steps of one variant in one data mode."""
    if data_mode == "loader_only":
        raise ValueError("measure_loader() times the loader alone")
    res = BenchResult(variant_name(opts), data_mode)
    res.note = _unavailable(opts, device)
    if res.note:
        return res
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        trainer = _trainer(cfg, opts, device, scratch, data_mode)
        trainer.model.train()
        batches = iter(trainer.loader)
        if data_mode == "memory":
            fixed = next(batches)
            fixed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in fixed.items()}
            next_batch = lambda: fixed  # noqa: E731
        else:
            next_batch = lambda: next(batches)  # noqa: E731
        _reset_peak(device)
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            trainer.train_step(next_batch())
        _sync(device)
        res.warmup_s = time.perf_counter() - start
        wait = total = 0.0
        losses = []
        for _ in range(cfg.steps):
            t0 = time.perf_counter()
            batch = next_batch()
            t1 = time.perf_counter()
            losses.append(trainer.train_step(batch)["loss"])  # ends with a host sync (the finite-loss check)
            _sync(device)
            t2 = time.perf_counter()
            wait += t1 - t0
            total += t2 - t0
        res.peak_mem_mib = _peak_mib(device)
        n = cfg.steps * cfg.train.batch_size
        res.images_per_s = n / max(total, 1e-12)
        res.ms_per_step = 1000 * total / cfg.steps
        res.data_wait = wait / max(total, 1e-12) if data_mode == "loader" else 0.0
        res.loss = sum(losses) / len(losses)
        trainer = batches = next_batch = None  # free the model and the workers before the next variant
    gc.collect()
    if "compile" in opts:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def run(cfg: BenchConfig, device: torch.device, log=print) -> list[BenchResult]:
    """Every variant in every data mode; speed-ups against fp32 (loader alone: preload False) in the same mode."""
    if cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    rows = []
    if "loader_only" in cfg.data_modes:  # the model plays no part: once per --preload setting
        for preload in (False, True):
            log(f"== data loader alone, preload {preload}: {cfg.warmup} warm-up + {cfg.steps} timed batches")
            rows.append(measure_loader(cfg, preload, device))
    for opts in cfg.variants:
        for mode in cfg.data_modes:
            if mode == "loader_only":
                continue
            log(f"== {variant_name(opts)}, data {mode}: {cfg.warmup} warm-up + {cfg.steps} timed steps")
            rows.append(measure(cfg, opts, mode, device))
    base = {r.data: r.images_per_s for r in rows if r.variant in ("fp32", "preload False") and not r.note}
    for r in rows:
        if r.data in base and not r.note:
            r.speedup = r.images_per_s / base[r.data]
    return rows


# ----- reporting ---------------------------------------------------------------------------------------
COLUMNS = ("variant", "data", "images_per_s", "ms_per_step", "speedup", "peak_mem_mib", "data_wait", "warmup_s",
           "loss", "note")


def _fmt(v, key: str) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if key == "speedup":
            return f"{v:.2f}x"
        if key == "data_wait":
            return f"{100 * v:.1f}%"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def to_markdown(rows: list[BenchResult]) -> str:
    head = ["variant", "data", "images/s", "ms/step", "speed-up", "peak MiB", "waiting for data", "warm-up s",
            "loss", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 7 + ["---"]) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(getattr(r, c), c) for c in COLUMNS) + " |")
    return "\n".join(lines)


def to_csv(rows: list[BenchResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if isinstance(getattr(r, c), float) and math.isnan(getattr(r, c)) else getattr(r, c)
                    for c in COLUMNS])
    return buf.getvalue()


def describe(cfg: BenchConfig, device: torch.device) -> str:
    """One line naming the configuration and the machine."""
    m, t = cfg.model, cfg.train
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    mem = "peak CUDA memory allocated" if device.type == "cuda" else "peak resident memory of the process"
    return (f"image {m.image_size}, width {m.num_channels}, {m.num_res_blocks} res block(s), attention at "
            f"{m.attention_resolutions or 'none'}, batch {t.batch_size}, {t.num_workers} loader worker(s), "
            f"preload {t.preload}; "
            f"{where}; torch {torch.__version__}; memory column: {mem}")
