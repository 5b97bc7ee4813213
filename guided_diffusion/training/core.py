"""The training loop: data order, diffusion loss + calibration-head loss, EMA, AMP, checkpoints, logs.

Resume is exact: the data order, the augmentation of every sample and the noise of every step are pure
functions of (seed, step), so a run stopped and resumed ends with the same weights as one that never
stopped (tests/test_train.py checks it).

Under torchrun the same functions of (seed, step) are cut into per-rank slices of the global batch, so N
processes with batch b train like one process with batch N*b: DDP averages the gradients of the N local
means, which is the gradient of the global mean (tests/test_distributed.py checks the loss curve and the
final weights). Rank 0 alone writes the split, the logs and the checkpoints; every rank resumes from the
same checkpoint. The equality (up to float summation order) needs --dropout 0: each rank draws its own
dropout masks. A run may resume with another number of processes; it continues the same stream exactly
when the global batch is unchanged (4 x 4 = 2 x 8 = 1 x 16).
"""
from __future__ import annotations

import csv
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from guided_diffusion.data import datasets
from guided_diffusion.checkpoint import (CheckpointError, capture_rng_state, find_latest, load_checkpoint,
                                         restore_rng_state, save_checkpoint)
from guided_diffusion.distributed import DistInfo
from guided_diffusion.diffusion.gaussian_diffusion import dice_bce_loss
from guided_diffusion.config import (DataConfig, DiffusionConfig, ModelConfig, TrainConfig,
                                     create_gaussian_diffusion, create_model, from_dict)

SPLIT_FILE = "split.json"
LOG_FILE = "log.csv"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""


def _mix(*values: int) -> int:
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
                    perms = {epoch: np.random.default_rng(_mix(self.seed, epoch)).permutation(self.n)}
                yield int(perms[epoch][offset]), _mix(self.seed, 7, pos)
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


def train_loader(pairs: list, image_size: int, tc, start_step: int, dist_info: DistInfo) -> DataLoader:
    """The infinite, seeded training stream of one process: its StepSampler slice of every global batch,
    augmented by --num_workers workers from preloaded copies (--preload), pinned for the copy to CUDA.

    ``tc`` is any config with batch_size, seed, num_workers, preload and augment (TrainConfig, AuxTrainConfig).
    """
    dataset = datasets.SegmentationDataset(pairs, image_size, augment=tc.augment)
    datasets.maybe_preload(dataset, tc.preload, log=print if dist_info.is_main else lambda _: None,
                           progress=dist_info.is_main)
    sampler = StepSampler(len(pairs), tc.batch_size, tc.seed, start_step, dist_info.rank, dist_info.world_size)
    return DataLoader(SeededItems(dataset), batch_size=tc.batch_size, sampler=sampler,
                      num_workers=tc.num_workers, pin_memory=dist_info.device.type == "cuda",
                      persistent_workers=tc.num_workers > 0, generator=torch.Generator(),
                      prefetch_factor=4 if tc.num_workers > 0 else None)


def step_noise(seed: int, step: int, batch_size: int, shape: tuple[int, ...], num_timesteps: int,
               device: torch.device, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and noise of one process's slice of the global batch at ``step``.

    Sample i of the slice sits at global position (step * world_size + rank) * batch_size + i, as in StepSampler;
    its noise is drawn on ``device`` by a generator seeded by that position, so N processes draw what one process
    with the global batch draws, and each draws only its own slice (no host-side noise for the whole global batch).
    """
    first = (step * world_size + rank) * batch_size
    g = torch.Generator().manual_seed(_mix(seed, 11, step))
    t = torch.randint(0, num_timesteps, (batch_size * world_size,), generator=g)[rank * batch_size:][:batch_size]
    noise = torch.empty((batch_size, *shape), device=device)
    gen = torch.Generator(device=device)
    for i in range(batch_size):
        noise[i].normal_(generator=gen.manual_seed(_mix(seed, 12, first + i)))
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


def restore_training_state(ckpt: dict, model: torch.nn.Module, ema: "EMA", opt: torch.optim.Optimizer,
                           scaler, device: torch.device) -> int:
    """Load weights, EMA, optimizer, AMP scaler and RNG states from a checkpoint; returns its step."""
    model.load_state_dict(ckpt["model"])
    ema.state = {k: v.to(device) for k, v in ckpt["ema"].items()}
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng_state(ckpt["rng"])
    return int(ckpt["step"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on the FF-Parser filters, whose neutral value is 1 (identity), not 0."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "ff_parsers" not in n], "weight_decay": weight_decay},
            {"params": [p for n, p in named if "ff_parsers" in n], "weight_decay": 0.0}]


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


def check_matches_checkpoint(ckpt: dict, model_cfg: ModelConfig, diff_cfg: DiffusionConfig) -> None:
    """A flag that contradicts the checkpoint being resumed is an error, never a silent mismatch."""
    for name, given in (("model", asdict(model_cfg)), ("diffusion", asdict(diff_cfg))):
        saved = ckpt["config"][name]
        for key, value in given.items():
            if key in saved and saved[key] != value:
                raise ValueError(f"--{key} {value} contradicts the checkpoint {ckpt['path']} ({saved[key]}); "
                                 f"use the same value or another --out_dir")


class Trainer:
    """Owns the model, optimizer, EMA and data stream of one training run."""

    def __init__(self, model_cfg: ModelConfig, diff_cfg: DiffusionConfig, data_cfg: DataConfig,
                 train_cfg: TrainConfig, dist_info: DistInfo):
        self.mc, self.dc, self.data_cfg, self.tc, self.di = model_cfg, diff_cfg, data_cfg, train_cfg, dist_info
        self.out_dir = Path(train_cfg.out_dir)
        self.device = dist_info.device
        if train_cfg.max_steps < 1 or train_cfg.batch_size < 1:
            raise ValueError("--max_steps and --batch_size must be >= 1")
        if not 0.0 <= train_cfg.ema_rate < 1.0:
            raise ValueError(f"--ema_rate must be in [0, 1), got {train_cfg.ema_rate}")
        datasets.preload_choice(train_cfg.preload)

        resume_ckpt = self._find_resume()
        self._check_same_start(resume_ckpt)
        if resume_ckpt is not None:
            check_matches_checkpoint(resume_ckpt, model_cfg, diff_cfg)
        self.split = self._resolve_split(resume_ckpt)

        torch.manual_seed(train_cfg.seed)
        self.diffusion = create_gaussian_diffusion(diff_cfg)
        self.model = create_model(model_cfg, diff_cfg).to(self.device)
        self.memory_format = torch.channels_last if train_cfg.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.ema = EMA(self.model, train_cfg.ema_rate)
        self.opt = torch.optim.AdamW(param_groups(self.model, train_cfg.weight_decay), lr=train_cfg.lr,
                                     fused=self.device.type == "cuda" or None)  # one kernel for all parameters
        self.amp = amp_dtype(train_cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.step = 0
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self.ddp = self.model  # what the step calls: DDP-wrapped under torchrun, compiled with --compile
        if dist_info.distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if train_cfg.compile:
            # Compiling the DDP wrapper lets DDP's optimizer split the graph at its gradient buckets, so the
            # all-reduce still overlaps the backward pass. self.model keeps the plain weights for checkpoints.
            self.ddp = torch.compile(self.ddp)

        pairs = datasets.list_pairs(data_cfg.data_name, data_cfg.data_dir, "train",
                                    split_file=self.out_dir / SPLIT_FILE)
        self.num_train = len(pairs)
        self.loader = train_loader(pairs, model_cfg.image_size, train_cfg, self.step, dist_info)

    # ----- set-up helpers ---------------------------------------------------------------------------
    def _find_resume(self) -> dict | None:
        flag = self.tc.resume
        if flag == "none":
            return None
        if flag == "auto":
            path = find_latest(self.out_dir)
            return load_checkpoint(path) if path is not None else None
        try:
            return load_checkpoint(flag)
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace("--model_path", "--resume")) from None

    def _resolve_split(self, ckpt: dict | None) -> dict:
        """The checkpoint's split on resume, else an existing split file in out_dir, else a new one."""
        split_path = self.out_dir / SPLIT_FILE
        dcfg = self.data_cfg
        if self.di.is_main:  # one process generates the built-in set when absent ...
            datasets.ensure_dataset(dcfg.data_name, dcfg.data_dir)
        _dist_barrier()
        datasets.ensure_dataset(dcfg.data_name, dcfg.data_dir)  # ... the others find it (or make a node-local one)
        if ckpt is not None and ckpt.get("split"):
            split = ckpt["split"]
        elif split_path.is_file():
            split = datasets.load_split(split_path)
        else:
            split = datasets.resolve_split(dcfg.data_name, dcfg.data_dir, seed=dcfg.split_seed)
        if self.di.is_main:
            datasets.save_split(split, split_path)
        _dist_barrier()
        return split

    def _check_same_start(self, ckpt: dict | None) -> None:
        """Every rank must resume from the same checkpoint (or all from none): --out_dir must be shared."""
        if not self.di.distributed:
            return
        mine = (Path(ckpt["path"]).name, int(ckpt["step"])) if ckpt is not None else ("none", 0)
        every: list = [None] * self.di.world_size
        dist.all_gather_object(every, mine)
        if len(set(every)) > 1:
            found = ", ".join(f"rank {r}: {name}" for r, (name, _) in enumerate(every))
            raise CheckpointError(f"the ranks found different checkpoints to resume in {self.out_dir} ({found}); "
                                  f"--out_dir must be one folder every node can read")

    def _restore(self, ckpt: dict) -> None:
        self.step = restore_training_state(ckpt, self.model, self.ema, self.opt, self.scaler, self.device)
        was = int(ckpt["config"]["train"].get("batch_size", 0)) * int(ckpt.get("world_size", 1))
        now = self.tc.batch_size * self.di.world_size
        if was != now and self.di.is_main:
            print(f"note: the global batch was {was} before step {self.step} and is {now} now; training goes on, "
                  f"but not as the same data stream an unchanged global batch would give", flush=True)

    def payload(self) -> dict:
        """Everything a checkpoint holds (see DESIGN.md: self-describing)."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state,
            "ema_rate": self.tc.ema_rate,
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "world_size": self.di.world_size,
            "rng": capture_rng_state(),
            "config": {"model": asdict(self.mc), "diffusion": asdict(self.dc), "data": asdict(self.data_cfg),
                       "train": asdict(self.tc)},
            "split": self.split,
        }

    def save(self) -> Path | None:
        path = None
        if self.di.is_main:
            path = save_checkpoint(self.out_dir, self.step, self.payload(), keep=self.tc.keep_checkpoints)
        _dist_barrier()
        return path

    # ----- one step -----------------------------------------------------------------------------------
    def _noise_and_t(self, batch_size: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return step_noise(self.tc.seed, self.step, batch_size, shape, self.diffusion.num_timesteps, self.device,
                          self.di.rank, self.di.world_size)

    def train_step(self, batch: dict) -> dict[str, float]:
        image = batch["image"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        x_start = mask * 2 - 1
        t, noise = self._noise_and_t(mask.shape[0], tuple(mask.shape[1:]))
        x_t = self.diffusion.q_sample(x_start, t, noise)
        if self.memory_format is torch.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        torch.manual_seed(_mix(self.tc.seed, 13, self.step, self.di.rank))  # dropout, step-deterministic
        autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext())
        with autocast:
            out, calib = self.ddp(x_t, self.diffusion.scale_timesteps(t), image=image, return_calib=True)
        losses = self.diffusion.training_losses(out.float(), x_start, x_t, t, noise)
        cal = dice_bce_loss(calib.float(), mask)
        loss = losses["loss"].mean() + self.tc.cal_weight * cal.mean()

        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tc.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        values = torch.stack([loss.detach(), losses["mse"].mean().detach(),
                              losses["vb"].mean().detach() if "vb" in losses else torch.zeros((), device=loss.device),
                              cal.mean().detach()]).float()
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
        return {"loss": values[0], "mse": values[1], "vb": values[2], "cal": values[3]}

    # ----- the loop ----------------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Train until --max_steps, checkpointing every --save_interval steps and at the end."""
        tc, main = self.tc, self.di.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            print(f"training on {self.num_train} images ({self.data_cfg.data_name}, split "
                  f"{self.split.get('source', '?')}); {sum(p.numel() for p in self.model.parameters()):,} "
                  f"parameters; device {self.device}, amp {self.amp or 'off'}; global batch "
                  f"{tc.batch_size * self.di.world_size} = {tc.batch_size} x {self.di.world_size} process(es)"
                  + (f"; resuming at step {self.step}" if self.step else ""), flush=True)
        if self.step >= tc.max_steps:
            if main:
                print(f"already at step {self.step} >= --max_steps {tc.max_steps}: nothing to do")
            return find_latest(self.out_dir)
        logger = RunLogger(self.out_dir, enabled=main)
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not main, desc="train", unit="step",
                   dynamic_ncols=True)
        self.model.train()
        window: list[dict[str, float]] = []
        t_last, seen, waited, hinted = time.perf_counter(), 0, 0.0, False
        path = None
        batches = iter(self.loader)  # infinite (StepSampler)
        try:
            while True:
                t0 = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - t0  # blocked on the loader: the device had nothing to do
                window.append(self.train_step(batch))
                seen += batch["mask"].shape[0] * self.di.world_size
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]['loss']:.4f}")
                if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                    now = time.perf_counter()
                    row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    row.update(step=self.step, lr=self.opt.param_groups[0]["lr"],
                               images_per_s=seen / max(now - t_last, 1e-9),
                               data_wait=waited / max(now - t_last, 1e-9))
                    logger.log(row)
                    gpu_starved = self.device.type == "cuda" and self.step >= 20 and row["data_wait"] > 0.1
                    if main and gpu_starved and not hinted:
                        hinted = True
                        tqdm.write(f"note: training waited for data {100 * row['data_wait']:.0f}% of the time "
                                   f"(--num_workers {tc.num_workers}, --preload {tc.preload}); more workers, or "
                                   f"--preload True, may help (scripts/benchmark_train.py --data loader_only "
                                   f"measures what the loader supplies)")
                    window, t_last, seen, waited = [], now, 0, 0.0
                if self.step % tc.save_interval == 0 or self.step == tc.max_steps:
                    path = self.save()
                if self.step >= tc.max_steps:
                    break
        finally:
            bar.close()
            logger.close()
        if main:
            print(f"done: step {self.step}, checkpoint {path}", flush=True)
        return path


class RunLogger:
    """CSV log (and TensorBoard when installed) written by the main process only."""

    FIELDS = ["step", "loss", "mse", "vb", "cal", "lr", "images_per_s", "data_wait"]

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = Path(out_dir) / LOG_FILE
        fields = self.FIELDS
        if self.path.exists():  # appending on resume: keep the columns the file already has
            with open(self.path, newline="") as fh:
                fields = next(csv.reader(fh), None) or self.FIELDS
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


def _dist_barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def load_configs(ckpt: dict) -> tuple[ModelConfig, DiffusionConfig, DataConfig]:
    """The model, diffusion and data configs a checkpoint was trained with."""
    cfg = ckpt["config"]
    return from_dict(ModelConfig, cfg["model"]), from_dict(DiffusionConfig, cfg["diffusion"]), \
        from_dict(DataConfig, cfg["data"])
