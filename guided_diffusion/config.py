"""Configuration dataclasses and their round trip through argparse and checkpoints.

Flag names keep the seed's spelling (`--num_channels`, `--learn_sigma True`, ...). One model factory and
one diffusion factory build everything from these configs, for training and for sampling alike.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from guided_diffusion.data.datasets import PRELOAD_HELP


def str2bool(value: str | bool) -> bool:
    """Parse the seed's boolean spelling (True/False; also true/false/1/0/yes/no)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("true", "1", "yes", "y", "t"):
        return True
    if v in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


@dataclass
class ModelConfig:
    """The network (MedSegDiff-style UNet). Defaults are the seed's ISIC command."""
    image_size: int = field(default=256, metadata={"help": "side of the square the images and masks are resized to"})
    num_channels: int = field(default=128, metadata={"help": "base width of the UNet"})
    num_res_blocks: int = field(default=2, metadata={"help": "residual blocks per resolution level"})
    num_heads: int = field(default=1, metadata={"help": "attention heads"})
    num_head_channels: int = field(default=-1, metadata={"help": "channels per head (overrides --num_heads when > 0)"})
    attention_resolutions: str = field(default="16", metadata={"help": "comma-separated feature-map sizes with self-attention"})
    channel_mult: str = field(default="", metadata={"help": "comma-separated width multipliers per level; empty: by image size"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the residual blocks"})
    class_cond: bool = field(default=False, metadata={"help": "class-conditional model (not supported: masks carry no class)"})
    use_scale_shift_norm: bool = field(default=False, metadata={"help": "FiLM-style timestep conditioning in the residual blocks"})
    use_checkpoint: bool = field(default=False, metadata={"help": "gradient checkpointing (less memory, slower)"})


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion the model is trained with (sampling always reuses it)."""
    diffusion_steps: int = field(default=1000, metadata={"help": "number of training noise levels T"})
    noise_schedule: str = field(default="linear", metadata={"help": "linear or cosine"})
    learn_sigma: bool = field(default=True, metadata={"help": "learn the reverse variance (hybrid loss)"})
    rescale_learned_sigmas: bool = field(default=False, metadata={"help": "scale the VLB term by T/1000"})
    rescale_timesteps: bool = field(default=False, metadata={"help": "feed the network t*1000/T instead of t"})


@dataclass
class DataConfig:
    """Which images, and how the split is drawn when the data set has no official one."""
    data_name: str = field(default="SYNTHETIC", metadata={"help": "ISIC, KVASIR, FOLDER or SYNTHETIC"})
    data_dir: str = field(default="data/synthetic", metadata={"help": "data set root"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val/test split (KVASIR, FOLDER, SYNTHETIC)"})


@dataclass
class RunConfig:
    """The optimisation run, as every trainer has it (training/core.py); the defaults are the diffusion model's."""
    out_dir: str = field(default="runs/train", metadata={"help": "where checkpoints, logs and the split go"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=16, metadata={"help": "images per step (per process under torchrun)"})
    max_steps: int = field(default=50000, metadata={"help": "training stops after this many steps"})
    max_minutes: float = field(default=0.0, metadata={"help": "training also stops, with a final checkpoint, once it "
                                                              "has trained this many minutes in all (resumed runs "
                                                              "add up; 0: no time limit)"})
    save_interval: int = field(default=5000, metadata={"help": "steps between checkpoints"})
    log_interval: int = field(default=100, metadata={"help": "steps between log rows"})
    keep_checkpoints: int = field(default=3, metadata={"help": "how many recent checkpoints to keep (0: all)"})
    ema_rate: float = field(default=0.9999, metadata={"help": "EMA decay of the weights used for sampling"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    seed: int = field(default=0, metadata={"help": "random seed of the run"})
    resume: str = field(default="auto", metadata={"help": "auto (latest in --out_dir), none, or a checkpoint path"})
    amp: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA where supported, else off), none, bf16, fp16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the network (slow first steps, faster after)"})
    channels_last: bool = field(default=False, metadata={"help": "NHWC memory layout (faster convolutions on tensor cores)"})
    num_workers: int = field(default=2, metadata={"help": "data-loading worker processes"})
    preload: str = field(default="auto", metadata={"help": PRELOAD_HELP})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    augment: bool = field(default=True, metadata={"help": "joint flips/rotation/crop/colour augmentation"})

    def validate(self) -> None:
        """Impossible settings are a one-line error naming the flag, before anything is written."""
        from guided_diffusion.data.datasets import preload_choice

        for name in ("max_steps", "batch_size", "save_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_minutes", "grad_clip", "weight_decay", "keep_checkpoints", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"--ema_rate must be in [0, 1), got {self.ema_rate}")
        preload_choice(self.preload)


def with_default(base, name: str, default):
    """A dataclass field that re-declares `base`'s field `name` with another default and the same help."""
    return field(default=default, metadata=dict(base.__dataclass_fields__[name].metadata))


@dataclass
class TrainConfig(RunConfig):
    """The diffusion model's optimisation run: the common run settings and the calibration-head weight."""
    cal_weight: float = field(default=1.0, metadata={"help": "weight of the image-encoder Dice+BCE head loss"})


def _arg_type(f: dataclasses.Field):
    return {bool: str2bool, int: int, float: float, str: str}[
        {"bool": bool, "int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type]


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str, use_defaults: bool = True) -> None:
    """One flag per dataclass field, in a group; use_defaults=False leaves unset flags as None."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        default = f.default if use_defaults else None
        shown = f" (default: {f.default})" if use_defaults else ""
        group.add_argument(f"--{f.name}", type=_arg_type(f), default=default,
                           metavar=f.name.upper() if _arg_type(f) is not str2bool else "True|False",
                           help=f.metadata.get("help", "") + shown)


def from_namespace(cls, ns: argparse.Namespace):
    """The dataclass built from the parsed flags of its fields."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


def from_dict(cls, d: dict[str, Any]):
    """The dataclass from a checkpoint's dict; unknown keys are an error, missing keys take defaults."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown} (checkpoint from a newer version?)")
    return cls(**d)


def parse_int_list(spec: str, flag: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); a clear error naming the flag otherwise."""
    spec = spec.strip()
    if not spec:
        return ()
    try:
        return tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {spec!r}") from None


def validate(model: ModelConfig, diffusion: DiffusionConfig) -> None:
    """Catch impossible settings before any work starts."""
    if model.class_cond:
        raise ValueError("--class_cond True is not supported: segmentation data sets here carry no class labels")
    if model.image_size < 8:
        raise ValueError(f"--image_size must be >= 8, got {model.image_size}")
    if model.num_channels < 1 or model.num_res_blocks < 1:
        raise ValueError("--num_channels and --num_res_blocks must be >= 1")
    if diffusion.noise_schedule not in ("linear", "cosine"):
        raise ValueError(f"--noise_schedule must be linear or cosine, got {diffusion.noise_schedule!r}")
    if diffusion.diffusion_steps < 2:
        raise ValueError(f"--diffusion_steps must be >= 2, got {diffusion.diffusion_steps}")


def create_model(model: ModelConfig, diffusion: DiffusionConfig):
    """The one model factory: a MedSegDiffUNet from the configs."""
    from guided_diffusion.network.unet import MedSegDiffUNet, default_channel_mult, parse_attention_resolutions

    validate(model, diffusion)
    mult = parse_int_list(model.channel_mult, "--channel_mult") or default_channel_mult(model.image_size)
    return MedSegDiffUNet(
        image_size=model.image_size,
        model_channels=model.num_channels,
        num_res_blocks=model.num_res_blocks,
        attention_ds=parse_attention_resolutions(model.attention_resolutions, model.image_size),
        channel_mult=mult,
        num_heads=model.num_heads,
        num_head_channels=model.num_head_channels,
        use_scale_shift_norm=model.use_scale_shift_norm,
        learn_sigma=diffusion.learn_sigma,
        dropout=model.dropout,
        use_checkpoint=model.use_checkpoint,
    )


def create_gaussian_diffusion(cfg: DiffusionConfig):
    """The one diffusion factory."""
    from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion

    return create_diffusion(cfg.diffusion_steps, cfg.noise_schedule, cfg.learn_sigma,
                            cfg.rescale_learned_sigmas, cfg.rescale_timesteps)
