"""Pool benchmark_quality.py runs: paired Dice differences over several splits and training seeds.

    python scripts/pool_quality.py runs/q_kvasir_split0 runs/q_kvasir_split1 runs/q_kvasir_split2
    python scripts/pool_quality.py runs/new_split1 runs/new_split2 --against runs/old_split1 runs/old_split2

Each folder is one benchmark (one --split_seed, with its --extra_seeds runs in seed<k>/). For every diffusion row
against the plain UNet (and the 10-step solver against the 1-step read-out and DDPM over all steps, and with
--against every diffusion row against the other benchmark's same row, run by run), the per-image difference is
averaged over each split's runs and pooled over the splits' test images, with a bootstrap 95% CI over those
images; and each run's mean difference, summarised over the runs by their mean, its Student-t 95% interval (what
a new training run of the recipe may give, not only new test images) and how many runs are at or above zero.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.fileio import atomic_write  # noqa: E402
from guided_diffusion.reports.pooling import compare, to_markdown  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="benchmark_quality.py --out_dir folders")
    parser.add_argument("--against", nargs="+", type=Path, default=None,
                        help="another model's benchmark folders, one per folder, the same splits and seeds")
    parser.add_argument("--out", default="", help="also write the table to this file (markdown)")
    args = parser.parse_args(argv)
    table = to_markdown(compare(args.folders, args.against))
    print(table, end="")
    if args.out:
        atomic_write(Path(args.out), table)


if __name__ == "__main__":
    run_cli(main)
