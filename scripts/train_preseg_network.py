"""Train ADDPM's pre-segmentation network: a small UNet, image -> mask (Dice + BCE), on the diffusion model's data.

    python scripts/train_preseg_network.py --batch_size 12 --lr 0.001                       # the seed's command
    python scripts/train_preseg_network.py --split_from runs/isic --out_dir runs/isic_preseg # the diffusion run's split
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.training import auxiliary  # noqa: E402
from guided_diffusion.cli import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    auxiliary.add_common_args(parser)
    return parser


def main(argv=None) -> None:
    auxiliary.train_aux("preseg", vars(build_parser().parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
