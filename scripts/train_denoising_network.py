"""Train ADDPM's one-step denoising network: noisy mask x_t + image + t -> clean mask (Dice + BCE), on the
diffusion model's noise schedule, for every level t <= --T (so sampling may stop at any --stop_t <= T).

    python scripts/train_denoising_network.py --batch_size 12 --lr 0.001 --T 250                  # the seed's command
    python scripts/train_denoising_network.py --split_from runs/isic --out_dir runs/isic_denoiser --T 250
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.training import auxiliary  # noqa: E402


def build_parser():
    return auxiliary.aux_parser("denoiser", __doc__)


def main(argv=None) -> None:
    auxiliary.train_aux("denoiser", vars(build_parser().parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
