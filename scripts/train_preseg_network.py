"""Train ADDPM's pre-segmentation network: a small UNet, image -> mask (Dice + BCE), on the diffusion model's data.
It is also the plain-UNet baseline: segmentation_sample.py --model_path <its run> writes its masks.

    python scripts/train_preseg_network.py --batch_size 12 --lr 0.001                       # the seed's command
    python scripts/train_preseg_network.py --split_from runs/isic --out_dir runs/isic_preseg # the diffusion run's split
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.training import auxiliary  # noqa: E402


def build_parser():
    return auxiliary.aux_parser("preseg", __doc__)


def main(argv=None) -> None:
    auxiliary.train_aux("preseg", vars(build_parser().parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
