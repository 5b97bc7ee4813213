"""Sample an ensemble of masks per image with a trained checkpoint, fuse them, save masks and uncertainty."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion import distributed  # noqa: E402
from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.sampling.pipeline import SampleConfig, run_sampling  # noqa: E402
from guided_diffusion.config import DiffusionConfig, ModelConfig, add_dataclass_args, from_namespace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(parser, SampleConfig, "sampling")
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
        n = summary.images
        rate = f", {summary.seconds_per_image:.3f} s/image" if n else ""
        parts = " = " + " + ".join(f"{v} {k}" for k, v in summary.nfe_parts.items()) if summary.nfe_parts else ""
        print(f"{summary.sampler} {summary.steps} steps, {summary.nfe} NFE{parts}: {n} images sampled{rate} "
              f"({summary.skipped} already done) -> {summary.out_dir}")

if __name__ == "__main__":
    run_cli(main)
