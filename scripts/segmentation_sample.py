"""Sample an ensemble of masks per image with a trained checkpoint, fuse them, save masks and uncertainty."""
import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion import distributed  # noqa: E402
from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.sampling.pipeline import SampleConfig, run_sampling  # noqa: E402
from guided_diffusion.config import (DiffusionConfig, ModelConfig, add_dataclass_args, from_namespace,  # noqa: E402
                                     str2bool)

ARG_TYPES = {"bool": str2bool, "int": int, "float": float, "str": str}


def flag_help(f: dataclasses.Field) -> str:
    """A sampling flag's help with its default said once: the help's own wording when it explains the default (or
    the flag has none to show), else "(default: X)" after it."""
    text = f.metadata.get("help", "")
    if "default" in text or f.default == "":
        return text
    return f"{text} (default: {f.default})"


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The flags of SampleConfig, each with its default shown once."""
    group = parser.add_argument_group("sampling")
    for f in dataclasses.fields(SampleConfig):
        kind = ARG_TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        group.add_argument(f"--{f.name}", type=kind, default=f.default, help=flag_help(f),
                           metavar="True|False" if kind is str2bool else f.name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_sampling_args(parser)
    # Model and diffusion flags are optional: the checkpoint holds them; a given one must agree with it.
    add_dataclass_args(parser, ModelConfig, "model (checked against the checkpoint)", use_defaults=False)
    add_dataclass_args(parser, DiffusionConfig, "diffusion (checked against the checkpoint)", use_defaults=False)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    cfg = from_namespace(SampleConfig, args)
    model_flags = {**vars(from_namespace(ModelConfig, args)), **vars(from_namespace(DiffusionConfig, args))}
    info = distributed.setup(cfg.device)
    try:
        summary = run_sampling(cfg, model_flags, info.device, info.rank, info.world_size)
    finally:
        distributed.cleanup()
    if info.is_main:
        n, unit = summary.images, summary.unit
        rate = f", {summary.seconds_per_image:.3f} s/{unit[:-1]}" if n else ""
        if n and summary.slices:
            rate += f" ({summary.slices} slices, {summary.seconds / summary.slices:.3f} s/slice)"
        parts = " = " + " + ".join(f"{v} {k}" for k, v in summary.nfe_parts.items()) if summary.nfe_parts else ""
        print(f"{summary.sampler} {summary.steps} steps, {summary.nfe} NFE{parts}: {n} {unit} sampled{rate} "
              f"({summary.skipped} already done) -> {summary.out_dir}")

if __name__ == "__main__":
    run_cli(main)
