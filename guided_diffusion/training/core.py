"""The one training core every trainer uses: data stream, step, finite check, EMA, AMP, DDP, log and save cadence,
step and time budget, resume, split and checkpoint payload. A trainer (training/diffusion.py, auxiliary.py)
subclasses `Trainer` and supplies only its network (`build_network`), its loss (`compute_loss`) and what its
checkpoint records about them (`network_config`).

Resume is exact: the data order, the augmentation of every sample and the noise of every step are pure
functions of (seed, step), so a run stopped and resumed ends with the same weights as one that never
stopped (tests/training/test_core.py checks it).

Under torchrun the same functions of (seed, step) are cut into per-rank slices of the global batch, so N
processes with batch b train like one process with batch N*b: DDP averages the gradients of the N local
means, which is the gradient of the global mean (tests/test_distributed.py checks the loss curve and
the final weights). Rank 0 alone writes the split, the logs and the checkpoints; every rank resumes from the
same checkpoint. The equality (up to float summation order) needs --dropout 0: each rank draws its own
dropout masks. A run may resume with another number of processes; it continues the same stream exactly
when the global batch is unchanged (4 x 4 = 2 x 8 = 1 x 16).
"""
from __future__ import annotations

import csv
import io
import math
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from guided_diffusion import progress
from guided_diffusion.checkpoint import (DESCRIBE, CheckpointError, candidates, capture_rng_state, checkpoint_step,
                                         find_latest, load_checkpoint, restore_rng_state, save_checkpoint)
from guided_diffusion.cli import Interrupted
from guided_diffusion.config import DataConfig, RunConfig
from guided_diffusion.data import datasets, volumes
from guided_diffusion.distributed import DistInfo, barrier, loader_workers
from guided_diffusion.fileio import OutDirLock, atomic_write, remove_stale_tmp
from guided_diffusion.layout import LATEST, LOG_FILE, SPLIT_FILE


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


def seed_mix(*values: int) -> int:
    """A 63-bit seed from several integers (SplitMix64-style), stable across platforms."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class StepSampler(Sampler):
    """Infinite stream of (index, augmentation seed) in seeded per-epoch permutations; our DistributedSampler.

    The global stream is cut into global batches of batch_size * world_size; rank r takes the r-th slice of
    each. Position p of the stream is always the same item with the same seed, whatever the world size, so
    N processes see exactly the samples one process with the global batch would see. Every epoch is a new
    permutation (seeded by (seed, epoch): the per-epoch reshuffle of torch's DistributedSampler.set_epoch),
    each item once per epoch over all ranks, with no padding or dropped tail since the stream runs on
    across epoch ends; and it starts at any step, which makes resume exact.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.b, self.seed = num_items, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        perms: dict[int, np.ndarray] = {}
        while True:
            first = (step * self.world + self.rank) * self.b
            for pos in range(first, first + self.b):
                epoch, offset = divmod(pos, self.n)
                if epoch not in perms:
                    perms = {epoch: np.random.default_rng(seed_mix(self.seed, epoch)).permutation(self.n)}
                yield int(perms[epoch][offset]), seed_mix(self.seed, 7, pos)
            step += 1

    def __len__(self) -> int:  # pragma: no cover - infinite; DataLoader only needs it for len()
        return 2 ** 62


class SeededItems(Dataset):
    """Wraps a dataset so item (index, seed) is drawn with the torch RNG seeded by `seed` (exact resume)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):  # augmentation draws on the CPU generator only: seed just that one
            torch.default_generator.manual_seed(seed)  # (torch.manual_seed also seeds CUDA/XPU/MTIA: 1 ms an item)
            return self.base[index]


def train_loader(pairs: list, image_size: int, cfg: RunConfig, start_step: int, dist_info: DistInfo,
                 data_cfg: DataConfig | None = None) -> DataLoader:
    """The infinite, seeded training stream of one process: its StepSampler slice of every global batch,
    augmented by --num_workers workers from preloaded copies (--preload), pinned for the copy to CUDA.
    BRATS/NIFTI: the slices of the training cases (data/volumes.py), read once."""
    log = print if dist_info.is_main else lambda _: None
    if data_cfg is not None and volumes.is_volume_data(data_cfg.data_name):
        dataset = volumes.training_slices(pairs, data_cfg, image_size, cfg.augment, log=log, progress=dist_info.is_main)
    else:
        dataset = datasets.SegmentationDataset(pairs, image_size, augment=cfg.augment)
        datasets.maybe_preload(dataset, cfg.preload, log=log, progress=dist_info.is_main)
    sampler = StepSampler(len(dataset), cfg.batch_size, cfg.seed, start_step, dist_info.rank, dist_info.world_size)
    workers = loader_workers(cfg.num_workers, log=log)
    return DataLoader(SeededItems(dataset), batch_size=cfg.batch_size, sampler=sampler,
                      num_workers=workers, pin_memory=dist_info.device.type == "cuda",
                      persistent_workers=workers > 0, generator=torch.Generator(),
                      prefetch_factor=4 if workers > 0 else None)


def step_noise(seed: int, step: int, batch_size: int, shape: tuple[int, ...], num_timesteps: int,
               device: torch.device, rank: int = 0, world_size: int = 1,
               t_power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and noise of one process's slice of the global batch at ``step``.

    Sample i of the slice sits at global position (step * world_size + rank) * batch_size + i, as in StepSampler;
    its noise is drawn on ``device`` by a generator seeded by that position, so N processes draw what one process
    with the global batch draws, and each draws only its own slice (no host-side noise for the whole global batch).
    Timesteps are uniform over 0..num_timesteps-1, or with t_power p != 1 floor(T u^(1/p)) for uniform u, whose
    density in t/T is p (t/T)^(p-1): p > 1 draws the noisy levels more often.
    """
    first = (step * world_size + rank) * batch_size
    g = torch.Generator().manual_seed(seed_mix(seed, 11, step))
    if t_power == 1.0:
        t = torch.randint(0, num_timesteps, (batch_size * world_size,), generator=g)
    else:
        u = torch.rand(batch_size * world_size, generator=g, dtype=torch.float64)
        t = (num_timesteps * u ** (1.0 / t_power)).long().clamp(max=num_timesteps - 1)
    t = t[rank * batch_size:][:batch_size]
    noise = torch.empty((batch_size, *shape), device=device)
    gen = torch.Generator(device=device)
    for i in range(batch_size):
        noise[i].normal_(generator=gen.manual_seed(seed_mix(seed, 12, first + i)))
    return t.to(device), noise


class EMA:
    """Exponential moving average of the parameters (buffers copied), the weights sampling uses."""

    def __init__(self, model: torch.nn.Module, rate: float):
        self.rate = rate
        self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                      for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """ema <- ema + (1 - rate) (w - ema) for every float tensor, as one multi-tensor (foreach) operation."""
        avg, new = [], []
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                avg.append(self.state[k])
                new.append(v.float())
            else:
                self.state[k].copy_(v)
        if avg:
            torch._foreach_lerp_(avg, new, 1.0 - self.rate)


def run_progress(cfg: RunConfig, step: int, train_seconds: float) -> float:
    """How far the run is, in [0, 1]: the larger of the step and time fractions, so a budget that ends the run
    first reaches 1 at its end."""
    done = step / cfg.max_steps
    if cfg.max_minutes:
        done = max(done, train_seconds / (60 * cfg.max_minutes))
    return min(max(done, 0.0), 1.0)


def scheduled_lr(cfg: RunConfig, step: int, train_seconds: float) -> float:
    """--lr under --lr_schedule at this point of the run (constant: --lr; cosine and linear fall to 0 at the end).
    A function of the (step, training time) a checkpoint stores, so a resumed run goes on where it stopped; under
    --max_minutes it follows the clock, as the run's length does."""
    p = run_progress(cfg, step, train_seconds)
    factor = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1.0 - p}[cfg.lr_schedule]
    return cfg.lr * factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on the FF-Parser filters, whose neutral value is 1 (identity), not 0."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if "ff_parsers" not in n], "weight_decay": weight_decay},
              {"params": [p for n, p in named if "ff_parsers" in n], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def amp_dtype(flag: str, device: torch.device) -> torch.dtype | None:
    """--amp -> autocast dtype (None: fp32). auto: bf16 on CUDA where supported, fp32 elsewhere."""
    if flag == "none":
        return None
    if flag == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if flag == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16  # no bf16 on this GPU: fp16 with a grad scaler instead
        return torch.bfloat16
    if flag == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp fp16 needs CUDA; use --amp bf16 or none on CPU")
        return torch.float16
    raise ValueError(f"--amp must be auto, none, bf16 or fp16, got {flag!r}")


def find_resume(cfg: RunConfig, kind: str, dist_info: DistInfo) -> dict | None:
    """The checkpoint --resume points at (auto: the latest in --out_dir; none: none), checked to be of `kind`;
    under torchrun every rank must find the same one (--out_dir must be shared)."""
    hint = "use another --out_dir (or --overwrite True to replace that run)"
    if cfg.resume == "none" or (cfg.resume == "auto" and cfg.overwrite):
        ckpt = None
    elif cfg.resume == "auto":  # the newest intact checkpoint (a truncated newer one is skipped with a warning)
        found = find_latest(Path(cfg.out_dir)) is not None
        ckpt = load_checkpoint(cfg.out_dir, "--out_dir", kind=kind, hint=hint) if found else None
    else:
        ckpt = load_checkpoint(cfg.resume, "--resume", kind=kind, hint=hint)
    if dist_info.distributed:
        mine = (Path(ckpt["path"]).name, int(ckpt["step"])) if ckpt is not None else ("none", 0)
        every: list = [None] * dist_info.world_size
        dist.all_gather_object(every, mine)
        if len(set(every)) > 1:
            found = ", ".join(f"rank {r}: {name}" for r, (name, _) in enumerate(every))
            raise CheckpointError(f"the ranks found different checkpoints to resume in {cfg.out_dir} ({found}); "
                                  f"--out_dir must be one folder every node can read")
    return ckpt


def resolve_split(out_dir: Path, data: DataConfig, resume: dict | None, reference: dict | None,
                  dist_info: DistInfo) -> dict:
    """The run's split: the resumed checkpoint's, else the --split_from run's (`reference`), else an existing
    <out_dir>/split.json, else a new seeded one; written to <out_dir>/split.json by rank 0. A split file that
    disagrees with the --split_from run is an error."""
    path = Path(out_dir) / SPLIT_FILE
    if dist_info.is_main:  # one process generates the built-in set when absent ...
        datasets.ensure_dataset(data.data_name, data.data_dir)
    barrier()
    datasets.ensure_dataset(data.data_name, data.data_dir)  # ... the others find it (or make a node-local one)
    if resume is not None and resume.get("split"):
        split = resume["split"]
    elif reference is not None:
        split = reference["split"]
        if path.is_file() and any(datasets.load_split(path)[k] != split[k] for k in datasets.SPLITS):
            raise ValueError(f"{path} holds another split than the --split_from run {reference['path']}; "
                             f"use another --out_dir")
    elif path.is_file():
        split = datasets.load_split(path)
    else:
        split = datasets.resolve_split(data.data_name, data.data_dir, seed=data.split_seed, folds=data.folds,
                                        fold=data.fold)
    if dist_info.is_main:
        datasets.save_split(split, path)
    barrier()
    return split


class Trainer:
    """One training run: network, optimizer, EMA, AMP, data stream, loop, logs and checkpoints.

    Subclasses set what they train before calling this constructor and supply:
      kind               the checkpoint kind ('diffusion', 'preseg', 'denoiser'; checkpoint.DESCRIBE)
      loss_terms         the logged terms of the loss, "loss" (the total) first
      image_size         the side the training images are resized to
      build_network()    the network (built after the run's seed is set, so initial weights are seeded)
      compute_loss(image, mask) -> (total loss, {term: per-batch value}); call the network through
                         `self.wrapped` (DDP/compiled) inside `self.autocast()`
      network_config()   the checkpoint's config entries besides data and train
    """

    kind: str = ""
    loss_terms: tuple[str, ...] = ("loss",)
    image_size: int = 0

    def __init__(self, data_cfg: DataConfig, run_cfg: RunConfig, dist_info: DistInfo, resume: dict | None,
                 reference: dict | None = None):
        run_cfg.validate()
        self.data_cfg, self.tc, self.di = data_cfg, run_cfg, dist_info
        self.out_dir = Path(run_cfg.out_dir)
        self.device = dist_info.device
        self.lock: OutDirLock | None = None
        self._new_files = [n for n in (SPLIT_FILE, LOG_FILE) if not (self.out_dir / n).exists()]
        self._new_dir = not self.out_dir.exists()
        if dist_info.is_main:
            self.lock = OutDirLock(self.out_dir, "--out_dir").acquire()
        try:
            if dist_info.is_main:
                for stale in remove_stale_tmp(self.out_dir):
                    print(f"note: removed {stale.name}, a temporary file a killed run left in {self.out_dir}")
                self._claim_out_dir(resume)
            barrier()
            self._setup(data_cfg, run_cfg, dist_info, resume, reference)
        except BaseException:
            self._abandon()
            raise

    def _setup(self, data_cfg: DataConfig, run_cfg: RunConfig, dist_info: DistInfo, resume: dict | None,
               reference: dict | None) -> None:
        self.split = resolve_split(self.out_dir, data_cfg, resume, reference, dist_info)

        torch.manual_seed(run_cfg.seed)
        self.memory_format = torch.channels_last if run_cfg.channels_last else torch.contiguous_format
        self.model = self.build_network().to(self.device, memory_format=self.memory_format)
        self.ema = EMA(self.model, run_cfg.ema_rate)
        self.opt = torch.optim.AdamW(param_groups(self.model, run_cfg.weight_decay), lr=run_cfg.lr,
                                     fused=self.device.type == "cuda" or None)  # one kernel for all parameters
        self.amp = amp_dtype(run_cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.step, self.train_seconds = 0, 0.0
        if resume is not None:
            self._restore(resume)
        self.wrapped = self.model  # what the step calls: DDP-wrapped under torchrun, compiled with --compile
        if dist_info.distributed:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if run_cfg.compile:
            # Compiling the DDP wrapper lets DDP's optimizer split the graph at its gradient buckets, so the
            # all-reduce still overlaps the backward pass. self.model keeps the plain weights for checkpoints.
            self.wrapped = torch.compile(self.wrapped)

        if volumes.is_volume_data(data_cfg.data_name) and self.kind != "diffusion":
            raise ValueError(f"--data_name {data_cfg.data_name}: the {DESCRIBE[self.kind]} takes 3-channel images; "
                             f"NIfTI volumes train the diffusion model only (scripts/segmentation_train.py)")
        pairs = datasets.list_pairs(data_cfg.data_name, data_cfg.data_dir, "train", split_file=self.out_dir / SPLIT_FILE)
        self.loader = train_loader(pairs, self.image_size, run_cfg, self.step, dist_info, data_cfg)
        self.num_train = len(self.loader.dataset)  # images (BRATS/NIFTI: slices of the training cases)

    # ----- the run folder -------------------------------------------------------------------------------
    def _claim_out_dir(self, resume: dict | None) -> None:
        """A run never mixes with another in one --out_dir: checkpoints past the step this run starts at are
        another run's (or, past a resumed one, a rolled-back future): stop, unless --overwrite True drops them.
        Unreadable newer checkpoints that resume skipped are set aside as <name>.corrupt."""
        start = int(resume["step"]) if resume is not None else 0
        later = [p for p in candidates(self.out_dir) if resume is None or checkpoint_step(p) > start]
        if resume is not None and self.tc.resume == "auto" and later:
            for path in later:  # only unreadable ones can be newer than the one auto-resume chose
                path.rename(path.with_name(path.name + ".corrupt"))
                print(f"note: set the unreadable {path.name} aside as {path.name}.corrupt", flush=True)
            later = []
        if not later:
            return
        what = (f"a run up to step {checkpoint_step(later[0])} ({later[0].name})" if resume is None else
                f"checkpoints after the resumed step {start} (up to {later[0].name})")
        if not self.tc.overwrite:
            how = ("--resume auto continues it, " if resume is None else "") + "--overwrite True replaces it"
            raise ValueError(f"--out_dir {self.out_dir} already holds {what}; {how}, or use another --out_dir")
        print(f"--overwrite True: removing {what} from {self.out_dir}", flush=True)
        for path in later:
            path.unlink()
        (self.out_dir / LATEST).unlink(missing_ok=True)
        if resume is None:  # the old run's split, log and TensorBoard events go with it
            for name in (SPLIT_FILE, LOG_FILE):
                (self.out_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
            self._new_files = [SPLIT_FILE, LOG_FILE]

    def _abandon(self) -> None:
        """After a failure that left no checkpoint: remove the split and log this run created (a split left behind
        would silently fix the next run's split), and the folder if it made it and it is empty; drop the lock."""
        try:
            if self.di.is_main and find_latest(self.out_dir) is None:
                for name in self._new_files:
                    (self.out_dir / name).unlink(missing_ok=True)
                shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True) if LOG_FILE in self._new_files else None
                if self._new_dir and self.out_dir.is_dir():
                    (self.out_dir / ".lock").unlink(missing_ok=True)
                    if not any(self.out_dir.iterdir()):
                        self.out_dir.rmdir()
        finally:
            self.release()

    def release(self) -> None:
        """Drop the --out_dir lock (at the end of run(); also safe to call twice)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ----- what a trainer supplies ------------------------------------------------------------------
    def build_network(self) -> torch.nn.Module:
        raise NotImplementedError

    def compute_loss(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def network_config(self) -> dict:
        raise NotImplementedError

    # ----- helpers for compute_loss -----------------------------------------------------------------
    def autocast(self):
        """The forward pass's autocast (--amp), or nothing in fp32."""
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()

    def noise_and_t(self, batch_size: int, shape: tuple[int, ...], num_timesteps: int, stream: int = 0,
                    t_power: float = 1.0):
        """This step's timesteps and Gaussian noise (exact resume, see step_noise); `stream` k > 0 gives another,
        independent draw of the same step."""
        seed = self.tc.seed if stream == 0 else seed_mix(self.tc.seed, 17, stream)
        return step_noise(seed, self.step, batch_size, shape, num_timesteps, self.device, self.di.rank,
                          self.di.world_size, t_power)

    def coin(self, probability: float, stream: int) -> bool:
        """A seeded coin flip of this step, the same on every rank (a choice for the whole global batch)."""
        return probability > 0 and np.random.default_rng(seed_mix(self.tc.seed, 19, stream, self.step)).random() \
            < probability

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """x in the network's memory format (NHWC with --channels_last)."""
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 4 else x

    # ----- checkpoints --------------------------------------------------------------------------------
    def _restore(self, ckpt: dict) -> None:
        """Weights, EMA, optimizer, AMP scaler, RNG states, step and trained time from a checkpoint."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.state = {k: v.to(self.device) for k, v in ckpt["ema"].items()}
        self.opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng_state(ckpt["rng"])
        self.step, self.train_seconds = int(ckpt["step"]), float(ckpt.get("train_seconds", 0.0))
        self._apply_optimizer_flags(ckpt)
        was = int(ckpt["config"]["train"].get("batch_size", 0)) * int(ckpt.get("world_size", 1))
        now = self.tc.batch_size * self.di.world_size
        if was != now and self.di.is_main:
            print(f"note: the global batch was {was} before step {self.step} and is {now} now; training goes on, "
                  f"but not as the same data stream an unchanged global batch would give", flush=True)

    def _apply_optimizer_flags(self, ckpt: dict) -> None:
        """--lr, --lr_schedule and --weight_decay as given now, not the values the resumed run had (the checkpoint
        records the run's config, so it must be what the optimizer uses)."""
        was = ckpt["config"]["train"]
        changed = {f"--{key} {was.get(key, default)} -> {getattr(self.tc, key)}"
                   for key, default in (("lr", self.tc.lr), ("lr_schedule", "constant"))
                   if was.get(key, default) != getattr(self.tc, key)}
        wanted = param_groups(self.model, self.tc.weight_decay)
        for group, want in zip(self.opt.param_groups, wanted):
            if group["weight_decay"] != want["weight_decay"]:
                changed.add(f"--weight_decay {group['weight_decay']:g} -> {want['weight_decay']:g}")
                group["weight_decay"] = want["weight_decay"]
        self._set_lr()
        if changed and self.di.is_main:
            print(f"note: from step {self.step} on, " + ", ".join(sorted(changed)), flush=True)

    def _set_lr(self) -> None:
        """The optimizer's rate for the next step, from --lr_schedule."""
        lr = scheduled_lr(self.tc, self.step, self.train_seconds)
        for group in self.opt.param_groups:
            group["lr"] = lr

    def payload(self) -> dict:
        """Everything a checkpoint holds (self-describing: sampling needs nothing else)."""
        return {
            "kind": self.kind,
            "model": self.model.state_dict(),
            "ema": self.ema.state,
            "ema_rate": self.tc.ema_rate,
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "train_seconds": self.train_seconds,
            "world_size": self.di.world_size,
            "rng": capture_rng_state(),
            "config": {**self.network_config(), "data": asdict(self.data_cfg), "train": asdict(self.tc)},
            "split": self.split,
        }

    def save(self) -> Path | None:
        path = None
        if self.di.is_main:
            path = save_checkpoint(self.out_dir, self.step, self.payload(), keep=self.tc.keep_checkpoints)
        barrier()
        return path

    # ----- one step -----------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        """Forward, loss, backward, clipping, finite check (before the weights are touched), AdamW, EMA."""
        image = self.layout(batch["image"].to(self.device, non_blocking=True))
        mask = batch["mask"].to(self.device, non_blocking=True)
        torch.manual_seed(seed_mix(self.tc.seed, 13, self.step, self.di.rank))  # dropout, step-deterministic
        self._set_lr()
        loss, terms = self.compute_loss(image, mask)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tc.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        zero = torch.zeros((), device=loss.device)
        values = torch.stack([loss.detach().float()] + [terms.get(k, zero).detach().float()
                                                        for k in self.loss_terms[1:]])
        if self.di.distributed:
            dist.all_reduce(values)
            values /= self.di.world_size
        values = values.cpu().tolist()
        if not all(math.isfinite(v) for v in values):
            raise TrainingDiverged(
                f"loss became {values[0]} at step {self.step + 1}; stopped before updating the weights. "
                f"The last good checkpoint is {find_latest(self.out_dir) or 'none (none was saved yet)'}; "
                f"try a lower --lr, --grad_clip 1, or --amp none")
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        return dict(zip(self.loss_terms, values))

    # ----- the loop ----------------------------------------------------------------------------------
    def _should_stop(self) -> tuple[bool, bool]:
        """(out of --max_minutes, a SIGINT/SIGTERM arrived): rank 0's clock and any rank's signal decide for all.
        Every rank takes rank 0's training time, so a time-following --lr_schedule gives them one rate."""
        seconds = torch.tensor([self.train_seconds], dtype=torch.float64, device=self.device)
        signalled = torch.tensor([float(self._signal is not None)], device=self.device)
        if self.di.distributed:
            dist.broadcast(seconds, 0)
            dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
        self.train_seconds = float(seconds.item())
        return bool(self.tc.max_minutes) and self.train_seconds >= 60 * self.tc.max_minutes, bool(signalled.item())

    def _catch_signals(self) -> dict:
        """SIGINT and SIGTERM (Ctrl-C, a cluster's wall-time kill) finish the current step, save a checkpoint and
        stop; a second signal acts as usual (immediately)."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._signal = signum
            for sig, previous in old.items():
                signal.signal(sig, previous)

        old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in old:
            signal.signal(sig, handler)
        return old

    def run(self) -> Path | None:
        """Train until --max_steps (or --max_minutes), checkpointing every --save_interval steps and at the end."""
        try:
            path = self._run()
        except BaseException:
            self._abandon()
            raise
        self.release()
        return path

    def _run(self) -> Path | None:
        tc, main = self.tc, self.di.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            print(f"training the {DESCRIBE[self.kind]} on {self.num_train} images ({self.data_cfg.data_name}, split "
                  f"{self.split.get('source', '?')}); {sum(p.numel() for p in self.model.parameters()):,} "
                  f"parameters; device {self.device}, amp {self.amp or 'off'}; global batch "
                  f"{tc.batch_size * self.di.world_size} = {tc.batch_size} x {self.di.world_size} process(es)"
                  + (f"; resuming at step {self.step}" if self.step else ""), flush=True)
        if self.step >= tc.max_steps or (tc.max_minutes and self.train_seconds >= 60 * tc.max_minutes):
            if main:
                print(f"already at step {self.step} >= --max_steps {tc.max_steps}: nothing to do"
                      if self.step >= tc.max_steps else
                      f"already trained {self.train_seconds / 60:.1f} minutes >= --max_minutes {tc.max_minutes}: "
                      f"nothing to do (raise --max_minutes to train on)")
            return find_latest(self.out_dir)
        logger = RunLogger(self.out_dir, ["step", *self.loss_terms, "lr", "images_per_s", "data_wait"], enabled=main,
                           start_step=self.step)
        timed = bool(tc.max_minutes)  # a time budget: the bar counts training seconds, the steps go in its postfix
        trained_before = self.train_seconds
        bar = progress.progress(total=round(60 * tc.max_minutes) if timed else tc.max_steps,
                                initial=round(trained_before) if timed else self.step, disable=not main,
                                desc=f"train {self.kind}", unit="s" if timed else "step",
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"
                                if timed else None)
        self.model.train()
        window: list[dict[str, float]] = []
        started = t_last = time.perf_counter()
        seen, waited, hinted, path, speed = 0, 0.0, False, None, ""
        old_handlers = self._catch_signals()
        batches = iter(self.loader)  # infinite (StepSampler)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except Exception:
                    if self._signal is None:
                        raise
                    batch = None  # the signal also stopped the loader's workers: save what is trained
                waited += time.perf_counter() - t0  # blocked on the loader: the device had nothing to do
                if batch is not None:
                    window.append(self.train_step(batch))
                    self.train_seconds = trained_before + time.perf_counter() - started
                    seen += batch["mask"].shape[0] * self.di.world_size
                    bar.update(min(round(self.train_seconds), bar.total) - bar.n if timed else 1)
                    bar.set_postfix({"step": self.step, "loss": f"{window[-1]['loss']:.4f}"} if timed else
                                    {"loss": f"{window[-1]['loss']:.4f}"}, refresh=False)
                out_of_time, signalled = self._should_stop()
                last = self.step >= tc.max_steps or out_of_time or signalled
                if window and (self.step % tc.log_interval == 0 or last):
                    now = time.perf_counter()
                    row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    row.update(step=self.step, lr=self.opt.param_groups[0]["lr"],
                               images_per_s=seen / max(now - t_last, 1e-9),
                               data_wait=waited / max(now - t_last, 1e-9))
                    logger.log(row)
                    speed = f"{row['images_per_s']:.1f}"
                    gpu_starved = self.device.type == "cuda" and self.step >= 20 and row["data_wait"] > 0.1
                    if main and gpu_starved and not hinted:
                        hinted = True
                        progress.write(f"note: training waited for data {100 * row['data_wait']:.0f}% of the time "
                                       f"(--num_workers {tc.num_workers}, --preload {tc.preload}); more workers, or "
                                       f"--preload True, may help (scripts/benchmark_train.py --data loader_only "
                                       f"measures what the loader supplies)")
                    window, t_last, seen, waited = [], now, 0, 0.0
                if speed and not progress.is_terminal():
                    bar.set_postfix({**({"step": self.step} if timed else {}),
                                     "loss": f"{row['loss']:.4f}", "img/s": speed}, refresh=False)
                if self.step % tc.save_interval == 0 or last:
                    path = self.save()
                if last:
                    break
        finally:
            for sig, previous in old_handlers.items():
                signal.signal(sig, previous)
            bar.close()
            logger.close()
        if signalled:
            name = signal.Signals(self._signal).name if self._signal is not None else "a signal on another rank"
            raise Interrupted(f"stopped by {name} at step {self.step}; saved {path}; the same command resumes it",
                              128 + (self._signal or signal.SIGTERM))
        if main:
            why = "" if self.step >= tc.max_steps else f" (--max_minutes {tc.max_minutes} reached)"
            print(f"done: step {self.step}{why}, checkpoint {path}", flush=True)
        return path


def _step_of(row: list[str], fields: list[str]) -> float:
    try:
        return float(row[fields.index("step")])
    except (ValueError, IndexError):
        return math.inf  # a torn last line (a kill mid-write): dropped


class RunLogger:
    """CSV log (and TensorBoard when installed) written by the main process only."""

    def __init__(self, out_dir: Path, fields: list[str], enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = Path(out_dir) / LOG_FILE
        if self.path.exists():  # appending on resume: keep the columns the file already has ...
            with open(self.path, newline="") as fh:
                rows = list(csv.reader(fh))
            fields = rows[0] if rows else fields
            kept = [r for r in rows[1:] if r and _step_of(r, fields) <= start_step]
            if len(kept) < len(rows) - 1:  # ... but not the rows of steps this run does again (or another run's)
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows([fields, *kept])
                atomic_write(self.path, buf.getvalue())
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        if new:
            self.writer.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except Exception:  # tensorboard not installed: the CSV log is enough
            self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.writer.writerow({k: row.get(k, "") for k in self.writer.fieldnames})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
