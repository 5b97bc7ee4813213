"""Training of ADDPM's auxiliary networks (pre-segmentation and one-step denoiser) on the diffusion model's data,
on the one training core (core.py): the same data stream, exact resume, EMA, AMP, checkpoints and log.

With --split_from the diffusion run's own split, data set, image size and noise schedule are reused, so no image
the diffusion model is tested on is trained on. A flag left unset takes the value of the run being resumed, else
of the --split_from run, else its default; a given flag must agree with both.

Losses (both Dice + BCE on logits, gaussian_diffusion.dice_bce_loss):
  preseg:   f(image) against the mask.
  denoiser: f(x_t, image, t) against the mask, x_t = sqrt(ab_t) b (2 m - 1) + sqrt(1 - ab_t) eps (DDPM eq. 4)
            on the diffusion model's schedule and mask scale b, t uniform over the indices 0..T-1 (DDPM's levels 1..T).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields

import torch

from guided_diffusion.checkpoint import DIFFUSION, CheckpointError, check_flags, load_checkpoint
from guided_diffusion.config import DataConfig, RunConfig, add_dataclass_args, with_default
from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion, dice_bce_loss, get_named_beta_schedule
from guided_diffusion.distributed import DistInfo
from guided_diffusion.network.aux_nets import DENOISER, KINDS, AuxNetConfig, build_network
from guided_diffusion.training.core import Trainer, find_resume


@dataclass
class AuxTrainConfig(RunConfig):
    """The optimisation run of an auxiliary network (defaults: the seed's --batch_size 12 --lr 0.001)."""
    out_dir: str = field(default="", metadata={"help": "checkpoints, log and split (default: runs/preseg or "
                                                       "runs/denoiser)"})
    lr: float = with_default(RunConfig, "lr", 1e-3)
    batch_size: int = with_default(RunConfig, "batch_size", 12)
    max_steps: int = with_default(RunConfig, "max_steps", 20000)
    save_interval: int = with_default(RunConfig, "save_interval", 1000)
    ema_rate: float = with_default(RunConfig, "ema_rate", 0.99)
    split_from: str = field(default="", metadata={"help": "diffusion run (folder or checkpoint) whose split, data "
                                                          "set, image size and noise schedule to reuse "
                                                          "(recommended: no test image is trained on)"})


@dataclass
class DenoiserConfig:
    """What the denoiser learns: the levels x_1..x_T of the diffusion model's noise schedule."""
    T: int = field(default=0, metadata={"help": "highest noise level (DDPM's 1-based t) trained on; sampling needs "
                                                "--stop_t <= T (default: diffusion_steps / 4, the seed's 250 of 1000)"})
    diffusion_steps: int = field(default=1000, metadata={"help": "the diffusion model's number of noise levels "
                                                                 "(default: the --split_from run's)"})
    noise_schedule: str = field(default="linear", metadata={"help": "the diffusion model's schedule, linear or "
                                                                    "cosine (default: the --split_from run's)"})
    mask_scale: float = field(default=1.0, metadata={"help": "the diffusion model's --mask_scale b: masks in {-b, b} "
                                                             "(default: the --split_from run's)"})


# Flags whose unset value is taken from a run; these must agree with the --split_from run.
_MUST_MATCH_REFERENCE = ("data_name", "image_size", "diffusion_steps", "noise_schedule", "mask_scale")


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


def aux_parser(kind: str, description: str = "") -> argparse.ArgumentParser:
    """The flags of train_preseg_network.py (kind preseg) or train_denoising_network.py (denoiser)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    if kind == DENOISER:
        add_denoiser_args(parser)
    return parser


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


def _reference(split_from: str) -> dict | None:
    """The --split_from diffusion run's checkpoint."""
    if not split_from:
        return None
    ref = load_checkpoint(split_from, "--split_from", kind=DIFFUSION,
                          hint="give the diffusion model's run (scripts/segmentation_train.py)")
    if not ref.get("split"):
        raise CheckpointError(f"--split_from {ref['path']} holds no split")
    return ref


def _values_of(ckpt: dict | None) -> dict:
    """Flag values a checkpoint fixes: its data set, image size, schedule (and for our kinds all the rest)."""
    if ckpt is None:
        return {}
    cfg = ckpt["config"]
    if "diffusion" in cfg:
        return {**cfg["data"], "image_size": cfg["model"]["image_size"],
                "diffusion_steps": cfg["diffusion"]["diffusion_steps"],
                "noise_schedule": cfg["diffusion"]["noise_schedule"],
                "mask_scale": cfg["diffusion"].get("mask_scale", 1.0)}
    return {**cfg["data"], **cfg["net"], **cfg.get("denoiser", {})}


def _fill(cls, flags: dict, inherited: dict):
    """The dataclass from the given flags; unset ones from `inherited`, else the field default."""
    return cls(**{f.name: flags[f.name] if flags.get(f.name) is not None else inherited.get(f.name, f.default)
                  for f in fields(cls)})


def plan_run(kind: str, flags: dict, dist_info: DistInfo | None = None) -> AuxRun:
    """The run's configs from parsed flags: a given flag, else the resumed run's value, else the --split_from
    diffusion run's (data set, image size, schedule), else the default."""
    if kind not in KINDS:
        raise ValueError(f"unknown auxiliary network kind {kind!r}")
    train = _fill(AuxTrainConfig, flags, {})
    train.out_dir = train.out_dir or f"runs/{kind}"
    train.validate()
    resume = find_resume(train, kind, dist_info or DistInfo(0, 1, 0, torch.device("cpu")))
    ref = _reference(train.split_from)
    if ref is not None:
        check_flags({k: flags.get(k) for k in _MUST_MATCH_REFERENCE}, _values_of(ref),
                    f"the --split_from run {ref['path']}")
    if resume is not None:
        check_flags(flags, _values_of(resume), f"the checkpoint {resume['path']} being resumed",
                    hint="use the same value or another --out_dir", skip=("data_dir",))
    inherited = {**_values_of(ref), **_values_of(resume)}
    data, net = _fill(DataConfig, flags, inherited), _fill(AuxNetConfig, flags, inherited)
    denoiser = _fill(DenoiserConfig, flags, inherited) if kind == DENOISER else None
    if denoiser is not None:
        get_named_beta_schedule(denoiser.noise_schedule, denoiser.diffusion_steps)  # validates both flags
        denoiser.T = denoiser.T or max(1, denoiser.diffusion_steps // 4)
        if not 1 <= denoiser.T <= denoiser.diffusion_steps:
            raise ValueError(f"--T must be in 1..{denoiser.diffusion_steps} (--diffusion_steps), got {denoiser.T}")
    return AuxRun(kind, net, data, train, denoiser, resume, ref)


class AuxTrainer(Trainer):
    """Trains the pre-segmentation network or the one-step denoiser of one planned run (plan_run)."""

    def __init__(self, run: AuxRun, dist_info: DistInfo):
        self.run_cfg, self.kind, self.image_size = run, run.kind, run.net.image_size
        self.diffusion = None
        if run.denoiser is not None:
            d = run.denoiser
            self.diffusion = create_diffusion(d.diffusion_steps, d.noise_schedule, learn_sigma=False,
                                              mask_scale=d.mask_scale)
        super().__init__(run.data, run.train, dist_info, run.resume, run.reference)

    def build_network(self) -> torch.nn.Module:
        return build_network(self.kind, self.run_cfg.net)

    def network_config(self) -> dict:
        config = {"net": asdict(self.run_cfg.net)}
        if self.run_cfg.denoiser is not None:
            config["denoiser"] = asdict(self.run_cfg.denoiser)
        return config

    def compute_loss(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Dice + BCE of the network's mask logits (the denoiser's on a freshly noised mask)."""
        with self.autocast():
            if self.diffusion is None:
                logits = self.wrapped(image)
            else:
                t, noise = self.noise_and_t(mask.shape[0], tuple(mask.shape[1:]), self.run_cfg.denoiser.T)
                x_t = self.diffusion.q_sample(self.diffusion.mask_to_x0(mask), t, noise)  # DDPM eq. 4; index t: level t+1
                logits = self.wrapped(x_t, t.float(), image)
        return dice_bce_loss(logits.float(), mask).mean(), {}


def train_aux(kind: str, flags: dict):
    """Plan and run one training of an auxiliary network from parsed flags; the last checkpoint's path."""
    from guided_diffusion.distributed import resolve_device

    run = plan_run(kind, flags)
    return AuxTrainer(run, DistInfo(0, 1, 0, resolve_device(run.train.device))).run()
