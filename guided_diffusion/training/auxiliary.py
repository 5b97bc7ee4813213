"""Training of ADDPM's auxiliary networks (pre-segmentation and one-step denoiser) on the diffusion model's data.

Same conventions as the diffusion trainer (training/core.py): the same data sets and split file
(<out_dir>/split.json, or with --split_from the diffusion run's own split, so no image the diffusion model is
tested on is trained on), self-describing atomic checkpoints (checkpoint.py, plus a "kind" key), exact resume
(data order, augmentation and noise are functions of (seed, step): StepSampler, SeededItems), EMA weights
for sampling, AMP, log.csv. One process on one device: these networks are small.

Losses (both Dice + BCE on logits, gaussian_diffusion.dice_bce_loss):
  preseg:   f(image) against the mask.
  denoiser: f(x_t, image, t) against the mask, x_t = sqrt(ab_t) (2 m - 1) + sqrt(1 - ab_t) eps (DDPM eq. 4)
            on the diffusion model's schedule, t uniform over the indices 0..T-1 (DDPM's levels 1..T).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.data import datasets
from guided_diffusion.network.aux_nets import DENOISER, DESCRIBE, KINDS, AuxNetConfig, build_network, checkpoint_kind
from guided_diffusion.checkpoint import (CheckpointError, capture_rng_state, find_latest, load_checkpoint,
                                         save_checkpoint)
from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion, dice_bce_loss, get_named_beta_schedule
from guided_diffusion.config import DataConfig, add_dataclass_args
from guided_diffusion.distributed import DistInfo
from guided_diffusion.training.core import (EMA, SPLIT_FILE, RunLogger, TrainingDiverged, _mix, amp_dtype,
                                            restore_training_state, step_noise, train_loader)


@dataclass
class AuxTrainConfig:
    """The optimisation run of an auxiliary network (defaults: the seed's --batch_size 12 --lr 0.001)."""
    out_dir: str = field(default="", metadata={"help": "checkpoints, log and split (default: runs/preseg or "
                                                       "runs/denoiser)"})
    split_from: str = field(default="", metadata={"help": "diffusion run (folder or checkpoint) whose split, data "
                                                          "set, image size and noise schedule to reuse "
                                                          "(recommended: no test image is trained on)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=12, metadata={"help": "images per step"})
    max_steps: int = field(default=20000, metadata={"help": "training stops after this many steps"})
    save_interval: int = field(default=1000, metadata={"help": "steps between checkpoints"})
    log_interval: int = field(default=100, metadata={"help": "steps between log rows"})
    keep_checkpoints: int = field(default=3, metadata={"help": "how many recent checkpoints to keep (0: all)"})
    ema_rate: float = field(default=0.99, metadata={"help": "EMA decay of the weights used for sampling"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    seed: int = field(default=0, metadata={"help": "random seed of the run"})
    resume: str = field(default="auto", metadata={"help": "auto (latest in --out_dir), none, or a checkpoint path"})
    amp: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA where supported, else off), none, bf16, "
                                                       "fp16"})
    num_workers: int = field(default=2, metadata={"help": "data-loading worker processes"})
    preload: str = field(default="auto", metadata={"help": datasets.PRELOAD_HELP})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    augment: bool = field(default=True, metadata={"help": "joint flips/rotation/crop/colour augmentation"})


@dataclass
class DenoiserConfig:
    """What the denoiser learns: the levels x_1..x_T of the diffusion model's noise schedule."""
    T: int = field(default=0, metadata={"help": "highest noise level (DDPM's 1-based t) trained on; sampling needs "
                                                "--stop_t <= T (default: diffusion_steps / 4, the seed's 250 of 1000)"})
    diffusion_steps: int = field(default=1000, metadata={"help": "the diffusion model's number of noise levels "
                                                                 "(default: the --split_from run's)"})
    noise_schedule: str = field(default="linear", metadata={"help": "the diffusion model's schedule, linear or "
                                                                    "cosine (default: the --split_from run's)"})


# Flags whose unset value is taken from a run; the first four must agree with the --split_from run.
_MUST_MATCH_REFERENCE = ("data_name", "image_size", "diffusion_steps", "noise_schedule")


def add_common_args(parser) -> None:
    """The flag groups both training scripts share: data, network, training."""
    add_dataclass_args(parser, DataConfig, "data (default: the resumed run's, else the --split_from run's, "
                                           "else SYNTHETIC data/synthetic)", use_defaults=False)
    add_dataclass_args(parser, AuxNetConfig, "network (unset: the resumed run's; --image_size: the --split_from "
                                             "run's, else 256; width 32, 1 block per level)", use_defaults=False)
    add_dataclass_args(parser, AuxTrainConfig, "training")


def add_denoiser_args(parser) -> None:
    """The denoiser's own flags (--T and the diffusion model's schedule)."""
    add_dataclass_args(parser, DenoiserConfig, "denoiser (unset: the resumed run's, else the --split_from run's, "
                                               "else T = diffusion_steps/4, 1000 linear)", use_defaults=False)


@dataclass
class AuxRun:
    """Everything one training run of an auxiliary network is set up from."""
    kind: str
    net: AuxNetConfig
    data: DataConfig
    train: AuxTrainConfig
    denoiser: DenoiserConfig | None
    resume: dict | None = field(default=None, repr=False)      # the checkpoint to continue from
    reference: dict | None = field(default=None, repr=False)   # the --split_from diffusion checkpoint


def _load_flagged(path: str, flag: str) -> dict:
    """load_checkpoint with its error messages naming `flag`."""
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace("--model_path", flag)) from None


def _find_resume(kind: str, train: AuxTrainConfig) -> dict | None:
    """The checkpoint --resume points at (auto: the latest in --out_dir), checked to be of this kind."""
    if train.resume == "none":
        return None
    if train.resume == "auto":
        path = find_latest(Path(train.out_dir))
        ckpt = _load_flagged(str(path), "--out_dir") if path is not None else None
    else:
        ckpt = _load_flagged(train.resume, "--resume")
    if ckpt is not None and checkpoint_kind(ckpt) != kind:
        raise CheckpointError(f"{ckpt['path']} is a {DESCRIBE.get(checkpoint_kind(ckpt))} checkpoint, not a "
                              f"{DESCRIBE[kind]}; use another --out_dir (or --resume none)")
    return ckpt


def _reference(split_from: str) -> dict | None:
    """The --split_from diffusion run's checkpoint."""
    if not split_from:
        return None
    ref = _load_flagged(split_from, "--split_from")
    if checkpoint_kind(ref) != "diffusion":
        raise CheckpointError(f"--split_from {ref['path']} is a {DESCRIBE.get(checkpoint_kind(ref))} checkpoint; "
                              f"give the diffusion model's run (scripts/segmentation_train.py)")
    if not ref.get("split"):
        raise CheckpointError(f"--split_from {ref['path']} holds no split")
    return ref


def _values_of(ckpt: dict | None) -> dict:
    """Flag values a checkpoint fixes: its data set, image size, schedule (and for our kinds all the rest)."""
    if ckpt is None:
        return {}
    cfg = ckpt["config"]
    if checkpoint_kind(ckpt) == "diffusion":
        return {**cfg["data"], "image_size": cfg["model"]["image_size"],
                "diffusion_steps": cfg["diffusion"]["diffusion_steps"],
                "noise_schedule": cfg["diffusion"]["noise_schedule"]}
    return {**cfg["data"], **cfg["net"], **cfg.get("denoiser", {})}


def _fill(cls, flags: dict, inherited: dict):
    """The dataclass from the given flags; unset ones from `inherited`, else the field default."""
    return cls(**{f.name: flags[f.name] if flags.get(f.name) is not None else inherited.get(f.name, f.default)
                  for f in fields(cls)})


def _check_given(flags: dict, saved: dict, where: str, keys) -> None:
    """A flag the user gave must agree with the run it continues or reuses."""
    for key in keys:
        if flags.get(key) is not None and key in saved and saved[key] != flags[key]:
            raise ValueError(f"--{key} {flags[key]} contradicts {where} ({saved[key]})")


def plan_run(kind: str, flags: dict) -> AuxRun:
    """The run's configs from parsed flags: a given flag, else the resumed run's value, else the --split_from
    diffusion run's (data set, image size, schedule), else the default."""
    if kind not in KINDS:
        raise ValueError(f"unknown auxiliary network kind {kind!r}")
    train = _fill(AuxTrainConfig, flags, {})
    train.out_dir = train.out_dir or f"runs/{kind}"
    if train.max_steps < 1 or train.batch_size < 1:
        raise ValueError("--max_steps and --batch_size must be >= 1")
    if not 0.0 <= train.ema_rate < 1.0:
        raise ValueError(f"--ema_rate must be in [0, 1), got {train.ema_rate}")
    datasets.preload_choice(train.preload)
    resume, ref = _find_resume(kind, train), _reference(train.split_from)
    if ref is not None:
        _check_given(flags, _values_of(ref), f"the --split_from run {ref['path']}", _MUST_MATCH_REFERENCE)
    if resume is not None:
        saved = _values_of(resume)
        _check_given(flags, saved, f"the checkpoint {resume['path']} being resumed; use the same value or another "
                                   f"--out_dir", [k for k in saved if k not in ("data_dir",)])
    inherited = {**_values_of(ref), **_values_of(resume)}
    data, net = _fill(DataConfig, flags, inherited), _fill(AuxNetConfig, flags, inherited)
    denoiser = _fill(DenoiserConfig, flags, inherited) if kind == DENOISER else None
    if denoiser is not None:
        get_named_beta_schedule(denoiser.noise_schedule, denoiser.diffusion_steps)  # validates both flags
        denoiser.T = denoiser.T or max(1, denoiser.diffusion_steps // 4)
        if not 1 <= denoiser.T <= denoiser.diffusion_steps:
            raise ValueError(f"--T must be in 1..{denoiser.diffusion_steps} (--diffusion_steps), got {denoiser.T}")
    return AuxRun(kind, net, data, train, denoiser, resume, ref)


class AuxLogger(RunLogger):
    """log.csv of an auxiliary network: its one Dice + BCE loss."""
    FIELDS = ["step", "loss", "lr", "images_per_s"]


class AuxTrainer:
    """Owns the network, optimizer, EMA and data stream of one auxiliary training run."""

    def __init__(self, run: AuxRun, device: torch.device):
        self.run_cfg, self.kind, self.tc, self.device = run, run.kind, run.train, device
        self.out_dir = Path(run.train.out_dir)
        self.split = self._resolve_split()
        torch.manual_seed(self.tc.seed)
        self.net = build_network(run.kind, run.net).to(device)
        self.ema = EMA(self.net, self.tc.ema_rate)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay,
                                     fused=device.type == "cuda" or None)
        self.amp = amp_dtype(self.tc.amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.diffusion = None
        if run.denoiser is not None:
            d = run.denoiser
            self.diffusion = create_diffusion(d.diffusion_steps, d.noise_schedule, learn_sigma=False)
        self.step = 0
        if run.resume is not None:
            self._restore(run.resume)
        pairs = datasets.list_pairs(run.data.data_name, run.data.data_dir, "train",
                                    split_file=self.out_dir / SPLIT_FILE)
        self.num_train = len(pairs)
        self.loader = train_loader(pairs, run.net.image_size, self.tc, self.step, DistInfo(0, 1, 0, device))

    def _resolve_split(self) -> dict:
        """The resumed run's split, else the --split_from run's, else <out_dir>/split.json, else a new one;
        written to <out_dir>/split.json. A split file that disagrees with --split_from is an error."""
        run, path = self.run_cfg, self.out_dir / SPLIT_FILE
        datasets.ensure_dataset(run.data.data_name, run.data.data_dir)
        if run.resume is not None and run.resume.get("split"):
            split = run.resume["split"]
        elif run.reference is not None:
            split = run.reference["split"]
            if path.is_file() and any(datasets.load_split(path)[k] != split[k] for k in datasets.SPLITS):
                raise ValueError(f"{path} holds another split than the --split_from run {run.reference['path']}; "
                                 f"use another --out_dir")
        elif path.is_file():
            split = datasets.load_split(path)
        else:
            split = datasets.resolve_split(run.data.data_name, run.data.data_dir, seed=run.data.split_seed)
        datasets.save_split(split, path)
        return split

    def _restore(self, ckpt: dict) -> None:
        self.step = restore_training_state(ckpt, self.net, self.ema, self.opt, self.scaler, self.device)

    def payload(self) -> dict:
        """Everything the checkpoint holds: weights, EMA, optimizer, step, RNG, kind, configs, split."""
        run = self.run_cfg
        config = {"net": asdict(run.net), "data": asdict(run.data), "train": asdict(run.train)}
        if run.denoiser is not None:
            config["denoiser"] = asdict(run.denoiser)
        return {"kind": self.kind, "model": self.net.state_dict(), "ema": self.ema.state,
                "ema_rate": self.tc.ema_rate, "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}, "step": self.step,
                "rng": capture_rng_state(), "config": config, "split": self.split}

    def save(self) -> Path:
        return save_checkpoint(self.out_dir, self.step, self.payload(), keep=self.tc.keep_checkpoints)

    def logits(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The network's mask logits for this step's batch (the denoiser's on a freshly noised mask)."""
        if self.diffusion is None:
            return self.net(image)
        t, noise = step_noise(self.tc.seed, self.step, mask.shape[0], tuple(mask.shape[1:]),  # exact resume
                              self.run_cfg.denoiser.T, self.device)
        x_t = self.diffusion.q_sample(mask * 2 - 1, t, noise)  # DDPM eq. 4; index t is level t + 1
        return self.net(x_t, t.float(), image)

    def train_step(self, batch: dict) -> float:
        image = batch["image"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        torch.manual_seed(_mix(self.tc.seed, 13, self.step))  # dropout, step-deterministic
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        with autocast:
            logits = self.logits(image, mask)
        loss = dice_bce_loss(logits.float(), mask).mean()
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}; stopped before updating the "
                                   f"weights. The last good checkpoint is {find_latest(self.out_dir) or 'none'}; "
                                   f"try a lower --lr or --amp none")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tc.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.tc.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.net)
        self.step += 1
        return loss.item()

    def run(self) -> Path | None:
        """Train until --max_steps, checkpointing every --save_interval steps and at the end."""
        tc = self.tc
        self.out_dir.mkdir(parents=True, exist_ok=True)
        print(f"training the {DESCRIBE[self.kind]} on {self.num_train} images ({self.run_cfg.data.data_name}, split "
              f"{self.split.get('source', '?')}); {sum(p.numel() for p in self.net.parameters()):,} parameters; "
              f"device {self.device}" + (f"; resuming at step {self.step}" if self.step else ""), flush=True)
        if self.step >= tc.max_steps:
            print(f"already at step {self.step} >= --max_steps {tc.max_steps}: nothing to do")
            return find_latest(self.out_dir)
        logger, path = AuxLogger(self.out_dir), None
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=f"train {self.kind}", unit="step", dynamic_ncols=True)
        self.net.train()
        losses, t_last, seen = [], time.perf_counter(), 0
        batches = iter(self.loader)  # infinite (StepSampler)
        try:
            while self.step < tc.max_steps:
                batch = next(batches)
                losses.append(self.train_step(batch))
                seen += batch["mask"].shape[0]
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                    now = time.perf_counter()
                    logger.log({"step": self.step, "loss": float(np.mean(losses)), "lr": tc.lr,
                                "images_per_s": seen / max(now - t_last, 1e-9)})
                    losses, t_last, seen = [], now, 0
                if self.step % tc.save_interval == 0 or self.step == tc.max_steps:
                    path = self.save()
        finally:
            bar.close()
            logger.close()
        print(f"done: step {self.step}, checkpoint {path}", flush=True)
        return path


def train_aux(kind: str, flags: dict) -> Path | None:
    """Plan and run one training of an auxiliary network from parsed flags; the last checkpoint's path."""
    from guided_diffusion.distributed import resolve_device

    run = plan_run(kind, flags)
    return AuxTrainer(run, resolve_device(run.train.device)).run()
