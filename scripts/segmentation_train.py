"""Train a MedSegDiff-style diffusion segmenter (single process, or one process per GPU under torchrun).

    torchrun --nproc_per_node 4 scripts/segmentation_train.py ... --batch_size 8   # global batch 32
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion import distributed  # noqa: E402
from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.config import (DataConfig, DiffusionConfig, ModelConfig, TrainConfig, add_dataclass_args,
                                     from_namespace)


def build_parser() -> argparse.ArgumentParser:
    # Each flag's help already ends with its default; the raw description keeps the torchrun example.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, DataConfig, "data")
    add_dataclass_args(parser, ModelConfig, "model")
    add_dataclass_args(parser, DiffusionConfig, "diffusion")
    add_dataclass_args(parser, TrainConfig, "training")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from guided_diffusion.training.diffusion import DiffusionTrainer

    info = distributed.setup(args.device)
    with distributed.worker(info):  # an error on one rank is recorded for torchrun, which then stops them all
        DiffusionTrainer(from_namespace(ModelConfig, args), from_namespace(DiffusionConfig, args),
                from_namespace(DataConfig, args), from_namespace(TrainConfig, args), info).run()


if __name__ == "__main__":
    run_cli(main)
