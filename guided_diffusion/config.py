"""Configuration dataclasses and their round trip through argparse and checkpoints.

Flag names keep the seed's spelling (`--num_channels`, `--learn_sigma True`, ...). One model factory and
one diffusion factory build everything from these configs, for training and for sampling alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
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
    image_channels: int = field(default=0, metadata={"help": "input image channels (default 0: from the data, 3 for "
                                                             "RGB images, one per --modalities entry for volumes)"})
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
    image_concat: bool = field(default=False, metadata={"help": "also give the mask path the image itself, beside x_t "
                                                                "(besides the image encoder's fused features)"})
    network: str = field(default="medsegdiff", metadata={"help": "medsegdiff (MedSegDiff's UNet: image encoder, "
                                                                 "dynamic conditional fusion, FF-Parser), unet (a "
                                                                 "plain UNet on [x_t, image], the baseline's "
                                                                 "backbone) or decoupled (the baseline's UNet on the "
                                                                 "image, once per image, and a light mask head run "
                                                                 "at every step)"})
    head_blocks: int = field(default=2, metadata={"help": "--network decoupled: residual blocks of the mask head"})
    head_channels: int = field(default=0, metadata={"help": "--network decoupled: width of the mask head (default 0: "
                                                            "the backbone's first-level width)"})
    head_stride: int = field(default=1, metadata={"help": "--network decoupled: the mask head runs at 1/s of the "
                                                          "mask's resolution (inputs pixel-unshuffled, output "
                                                          "pixel-shuffled back, so it costs less; default 1: full "
                                                          "resolution)"})


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion the model is trained with (sampling always reuses it)."""
    diffusion_steps: int = field(default=1000, metadata={"help": "number of training noise levels T"})
    noise_schedule: str = field(default="linear", metadata={"help": "linear or cosine"})
    learn_sigma: bool = field(default=True, metadata={"help": "learn the reverse variance (hybrid loss)"})
    rescale_learned_sigmas: bool = field(default=False, metadata={"help": "scale the VLB term by T/1000"})
    rescale_timesteps: bool = field(default=False, metadata={"help": "feed the network t*1000/T instead of t"})
    prediction: str = field(default="eps", metadata={"help": "what the network predicts: eps (the noise), x0 (the "
                                                             "clean mask) or v (Salimans & Ho 2022)"})
    predict_xstart: bool = field(default=False, metadata={"help": "guided-diffusion's flag: True is --prediction x0"})
    mask_scale: float = field(default=1.0, metadata={"help": "masks are diffused as {-b, b} with b this value (Chen "
                                                             "2023: a smaller b hides the mask at lower noise levels)"})
    self_condition: bool = field(default=False, metadata={"help": "feed the previous x0 estimate back to the network "
                                                                  "(Analog Bits self-conditioning)"})
    x0_tanh: bool = field(default=False, metadata={"help": "with --prediction x0: the network's x0 is b tanh(output), "
                                                           "bounded to the mask range (foreground probability "
                                                           "sigmoid(2 output))"})

    def __post_init__(self):
        """--predict_xstart True is --prediction x0; any other prediction beside it is a contradiction."""
        if self.predict_xstart:
            if self.prediction not in (None, "eps", "x0"):
                raise ValueError(f"--predict_xstart True contradicts --prediction {self.prediction}")
            self.prediction = "x0"
        elif self.predict_xstart is not None and self.prediction is not None:
            self.predict_xstart = self.prediction == "x0"  # kept in step, so the checkpoint never disagrees


@dataclass
class DataConfig:
    """Which images, and how the split is drawn when the data set has no official one."""
    data_name: str = field(default="SYNTHETIC", metadata={"help": "ISIC, KVASIR, FOLDER, SYNTHETIC, or the NIfTI "
                                                                  "volumes BRATS and NIFTI (Decathlon / nnU-Net)"})
    data_dir: str = field(default="data/synthetic", metadata={"help": "data set root"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val/test split (KVASIR, FOLDER, SYNTHETIC; "
                                                         "BRATS and NIFTI, by case)"})
    folds: int = field(default=0, metadata={"help": "k-fold cross-validation of a seeded split: the ids, shuffled "
                                                    "by --split_seed, fall into this many disjoint test folds and "
                                                    "--fold picks the test fold, so k runs test every image once "
                                                    "(default 0: one seeded 70/10/20 split)"})
    fold: int = field(default=0, metadata={"help": "with --folds k: the test fold, 0 to k - 1; val is 10% of the "
                                                   "other ids, train the rest"})
    modalities: str = field(default="", metadata={"help": "BRATS/NIFTI: the input channels, comma-separated (BRATS: "
                                                          "file suffixes, default t1,t1ce,t2,flair; NIFTI: names of "
                                                          "dataset.json or channel numbers, default all)"})
    labels: str = field(default="", metadata={"help": "BRATS/NIFTI: the labels that are foreground, e.g. 1,4 "
                                                      "(default: every label > 0, BraTS's whole tumour)"})
    slice_axis: int = field(default=2, metadata={"help": "BRATS/NIFTI: the volume axis the 2-D slices are taken "
                                                         "along, 0, 1 or 2 (default 2: axial)"})
    skip_empty_slices: str = field(default="0", metadata={"help": "BRATS/NIFTI: leave out this fraction of the "
                                                                  "training slices with an empty mask (True: all; "
                                                                  "default 0: keep all)"})
    norm_percentiles: str = field(default="0.5,99.5", metadata={"help": "BRATS/NIFTI: each channel is clipped to "
                                                                        "these percentiles of its nonzero voxels, then "
                                                                        "z-scored on them (default 0.5,99.5)"})

    def __post_init__(self) -> None:
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"--folds must be 0 (no cross-validation) or >= 2, got {self.folds}")
        if not 0 <= self.fold < max(self.folds, 1):
            raise ValueError(f"--fold must be in [0, {max(self.folds - 1, 0)}] for --folds {self.folds}, "
                             f"got {self.fold}")


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class RunConfig:
    """The optimisation run, as every trainer has it (training/core.py); the defaults are the diffusion model's."""
    out_dir: str = field(default="runs/train", metadata={"help": "where checkpoints, logs and the split go"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant (--lr throughout), cosine or linear: "
                                                                   "the rate falls from --lr to 0 over the run, "
                                                                   "that is over --max_steps, or over --max_minutes "
                                                                   "of training time when that budget ends the run "
                                                                   "first (default constant)"})
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
    overwrite: bool = field(default=False, metadata={"help": "replace the run already in --out_dir (its checkpoints, "
                                                             "log and split) instead of stopping with an error"})
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
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr_schedule must be {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"--ema_rate must be in [0, 1), got {self.ema_rate}")
        preload_choice(self.preload)


def with_default(base, name: str, default):
    """A dataclass field that re-declares `base`'s field `name` with another default and the same help."""
    return field(default=default, metadata=dict(base.__dataclass_fields__[name].metadata))


@dataclass
class TrainConfig(RunConfig):
    """The diffusion model's optimisation run: the common run settings and the loss (training/diffusion.py)."""
    cal_weight: float = field(default=1.0, metadata={"help": "weight of the image-encoder Dice+BCE head loss"})
    mse_weight: float = field(default=1.0, metadata={"help": "weight of the MSE on the prediction target (eps, x0 or "
                                                             "v)"})
    mask_loss_weight: float = field(default=0.0, metadata={"help": "weight of Dice + BCE on the x0 estimate, read as "
                                                                   "a foreground probability"})
    self_condition_rate: float = field(default=0.5, metadata={"help": "with --self_condition True: the fraction of "
                                                                      "steps that first estimate x0 and feed it back"})
    recycle: bool = field(default=False, metadata={"help": "recycling (Fu et al. 2023): noise the model's own x0 "
                                                           "estimate from pure noise, not the ground truth, to x_t"})
    t_power: float = field(default=1.0, metadata={"help": "training timesteps floor(T u^(1/p)) for uniform u: 1 is "
                                                          "uniform, > 1 draws the noisy levels more often"})
    detach_condition: bool = field(default=False, metadata={"help": "the image encoding enters the denoiser "
                                                                     "detached: only the calibration loss trains the "
                                                                     "image encoder (with --network decoupled the "
                                                                     "backbone then trains as the plain UNet does, "
                                                                     "up to the shared --grad_clip norm)"})
    diffusion_batch: int = field(default=0, metadata={"help": "images of each batch (per process) that the diffusion "
                                                              "losses train on, the first ones; the calibration loss "
                                                              "trains on all (0: all). With --network decoupled the "
                                                              "mask head's share of a step's cost"})
    calib_noise: float = field(default=0.0, metadata={"help": "--network decoupled: the mask head trains on its "
                                                              "calibration logit plus a smooth random field of up "
                                                              "to this many logits (errors to correct, as a "
                                                              "refiner's coarse masks; 0: the logit as it is)"})
    preset: str = field(default="none", metadata={"help": "cpu: the small-CPU recipe measured best (README, "
                                                          "'Quality'); every flag given explicitly wins over it"})

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.self_condition_rate <= 1.0:
            raise ValueError(f"--self_condition_rate must be in [0, 1], got {self.self_condition_rate}")
        if not self.t_power > 0:
            raise ValueError(f"--t_power must be > 0, got {self.t_power}")
        if not 0 <= self.diffusion_batch <= self.batch_size:
            raise ValueError(f"--diffusion_batch must be in 0..--batch_size ({self.batch_size}), got "
                             f"{self.diffusion_batch}")
        if not self.calib_noise >= 0:
            raise ValueError(f"--calib_noise must be >= 0, got {self.calib_noise}")


# The recipes behind --preset: values for flags the user did not give (measured in the README's "Quality" section).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(network="decoupled", head_stride=4, image_concat=False, num_channels=16, num_res_blocks=1,
                attention_resolutions="", learn_sigma=False, prediction="x0", x0_tanh=True, mask_scale=0.1,
                self_condition=True, mask_loss_weight=1.0, t_power=0.5, batch_size=8, lr=1e-3, ema_rate=0.995,
                num_workers=0, save_interval=1000, log_interval=50),
}


def _arg_type(f: dataclasses.Field):
    return {bool: str2bool, int: int, float: float, str: str}[
        {"bool": bool, "int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type]


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str, use_defaults: bool = True) -> None:
    """One flag per dataclass field, in a group; use_defaults=False leaves unset flags as None."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        default = f.default if use_defaults else None
        helptext = f.metadata.get("help", "")
        said = f.default == "" or "default" in helptext  # no "(default: )", and never the default twice
        shown = f" (default: {f.default})" if use_defaults and not said else ""
        group.add_argument(f"--{f.name}", type=_arg_type(f), default=default,
                           metavar=f.name.upper() if _arg_type(f) is not str2bool else "True|False",
                           help=helptext + shown)


def parse_with_preset(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv with the defaults of its --preset (none: the plain defaults); flags given explicitly win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="none")
    name = pre.parse_known_args(argv)[0].preset
    if name != "none":
        if name not in PRESETS:
            parser.error(f"--preset must be none or {', '.join(PRESETS)}, got {name!r}")
        parser.set_defaults(**PRESETS[name])
    ns = parser.parse_args(argv)
    # the preset's mask-head stride on an image size it does not divide: name the preset, not a flag never given
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    stride, size = PRESETS.get(name, {}).get("head_stride", 1), getattr(ns, "image_size", 0)
    from_preset = not any(a == "--head_stride" or a.startswith("--head_stride=") for a in given)
    if stride > 1 and from_preset and size % stride:
        parser.error(f"--preset {name} sets --head_stride {stride}, which must divide --image_size {size}: "
                     f"give --head_stride 1 (or an --image_size divisible by {stride})")
    return ns


def train_parser(description: str = "") -> argparse.ArgumentParser:
    """The flags of scripts/segmentation_train.py: data, model, diffusion and training groups."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, DataConfig, "data")
    add_dataclass_args(parser, ModelConfig, "model")
    add_dataclass_args(parser, DiffusionConfig, "diffusion")
    add_dataclass_args(parser, TrainConfig, "training")
    return parser


def parse_train_args(argv=None, description: str = "") -> tuple[ModelConfig, DiffusionConfig, DataConfig,
                                                                 TrainConfig]:
    """segmentation_train.py's configs from its command line (with --preset)."""
    ns = parse_with_preset(train_parser(description), argv)
    return (from_namespace(ModelConfig, ns), from_namespace(DiffusionConfig, ns), from_namespace(DataConfig, ns),
            from_namespace(TrainConfig, ns))


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


NETWORKS = ("medsegdiff", "unet", "decoupled")


def validate(model: ModelConfig, diffusion: DiffusionConfig) -> None:
    """Catch impossible settings before any work starts."""
    if model.class_cond:
        raise ValueError("--class_cond True is not supported: segmentation data sets here carry no class labels")
    if model.image_size < 8:
        raise ValueError(f"--image_size must be >= 8, got {model.image_size}")
    if model.image_channels < 0:
        raise ValueError(f"--image_channels must be >= 1 (or 0: from the data), got {model.image_channels}")
    if model.num_channels < 1 or model.num_res_blocks < 1:
        raise ValueError("--num_channels and --num_res_blocks must be >= 1")
    if diffusion.noise_schedule not in ("linear", "cosine"):
        raise ValueError(f"--noise_schedule must be linear or cosine, got {diffusion.noise_schedule!r}")
    if diffusion.diffusion_steps < 2:
        raise ValueError(f"--diffusion_steps must be >= 2, got {diffusion.diffusion_steps}")
    if model.network not in NETWORKS:
        raise ValueError(f"--network must be {', '.join(NETWORKS[:-1])} or {NETWORKS[-1]}, got {model.network!r}")
    if model.network != "medsegdiff" and model.image_concat:
        raise ValueError(f"--image_concat is for --network medsegdiff: --network {model.network} always gives the "
                         f"image to its first layer")
    if model.head_blocks < 1:
        raise ValueError(f"--head_blocks must be >= 1, got {model.head_blocks}")
    if model.head_channels < 0:
        raise ValueError(f"--head_channels must be >= 1 (or 0: the backbone's width), got {model.head_channels}")
    if model.head_stride < 1 or model.image_size % model.head_stride:
        raise ValueError(f"--head_stride must be >= 1 and divide --image_size {model.image_size}, got "
                         f"{model.head_stride}")
    if diffusion.prediction not in ("eps", "x0", "v"):
        raise ValueError(f"--prediction must be eps, x0 or v, got {diffusion.prediction!r}")
    if diffusion.x0_tanh and diffusion.prediction != "x0":
        raise ValueError(f"--x0_tanh True bounds an x0 prediction: it needs --prediction x0, got {diffusion.prediction}")
    if not diffusion.mask_scale > 0:
        raise ValueError(f"--mask_scale must be > 0, got {diffusion.mask_scale}")


def unused_model_flags(model: ModelConfig, preset: str = "none") -> list[str]:
    """The model flags whose values the chosen --network does not use (unet and decoupled have no attention and
    plain residual blocks; only decoupled has a mask head; only medsegdiff concatenates the image); a mask-head value
    that is the default or the --preset's is not named."""
    unused, usual = [], PRESETS.get(preset, {})
    if model.network != "medsegdiff":
        if model.attention_resolutions.strip():
            unused.append(f"--attention_resolutions {model.attention_resolutions}")
        unused += [f"--{name} True" for name in ("use_scale_shift_norm", "use_checkpoint") if getattr(model, name)]
    if model.network != "decoupled":
        unused += [f"--{name} {getattr(model, name)}" for name in ("head_blocks", "head_channels", "head_stride")
                   if getattr(model, name) not in (getattr(ModelConfig, name), usual.get(name))]
    return unused


def check_attention_resolutions(model: ModelConfig) -> None:
    """At training time every --attention_resolutions entry must be a feature-map size the network has (the parser
    itself is lenient so one value serves several sizes, and old checkpoints keep loading)."""
    from guided_diffusion.network.unet import default_channel_mult, parse_attention_resolutions

    mult = parse_int_list(model.channel_mult, "--channel_mult") or default_channel_mult(model.image_size)
    sizes = [model.image_size // 2 ** k for k in range(len(mult))]
    for token in [t for t in model.attention_resolutions.replace(";", ",").split(",") if t.strip()]:
        try:
            ok = int(token) in sizes
        except ValueError:
            ok = False
        if not ok:
            parse_attention_resolutions(token, model.image_size)  # malformed: its own message
            raise ValueError(f"--attention_resolutions {model.attention_resolutions}: {token.strip()} is not a "
                             f"feature-map size of a {model.image_size} px network (those are "
                             f"{', '.join(map(str, sizes))}; empty: attention only in the middle block)")


def create_model(model: ModelConfig, diffusion: DiffusionConfig):
    """The one model factory: a MedSegDiffUNet (--network unet: a ConcatUNet; decoupled: a DecoupledUNet)."""
    from guided_diffusion.network.decoupled import DecoupledUNet
    from guided_diffusion.network.unet import (ConcatUNet, MedSegDiffUNet, default_channel_mult,
                                               parse_attention_resolutions)

    validate(model, diffusion)
    mult = parse_int_list(model.channel_mult, "--channel_mult") or default_channel_mult(model.image_size)
    x0_tanh = diffusion.mask_scale if diffusion.x0_tanh else None
    image_channels = model.image_channels or 3  # 0: not resolved from data (configs made in code), RGB
    if model.network == "unet":
        return ConcatUNet(image_size=model.image_size, model_channels=model.num_channels, image_channels=image_channels,
                          num_res_blocks=model.num_res_blocks, channel_mult=mult, dropout=model.dropout,
                          learn_sigma=diffusion.learn_sigma, self_condition=diffusion.self_condition,
                          x0_tanh_scale=x0_tanh)
    if model.network == "decoupled":
        return DecoupledUNet(image_size=model.image_size, model_channels=model.num_channels,
                             image_channels=image_channels, num_res_blocks=model.num_res_blocks, channel_mult=mult,
                             dropout=model.dropout, learn_sigma=diffusion.learn_sigma,
                             self_condition=diffusion.self_condition, x0_tanh_scale=x0_tanh,
                             head_blocks=model.head_blocks, head_channels=model.head_channels,
                             head_stride=model.head_stride)
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
        self_condition=diffusion.self_condition,
        image_concat=model.image_concat,
        x0_tanh_scale=x0_tanh,
        image_channels=image_channels,
    )


def create_gaussian_diffusion(cfg: DiffusionConfig):
    """The one diffusion factory."""
    from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion

    return create_diffusion(cfg.diffusion_steps, cfg.noise_schedule, cfg.learn_sigma,
                            cfg.rescale_learned_sigmas, cfg.rescale_timesteps, cfg.prediction, cfg.mask_scale)
