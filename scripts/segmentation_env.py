"""Evaluate predicted masks against ground truth: Dice, IoU, HD95 and more, per image and summarised.

    python scripts/segmentation_env.py --inp_pth PRED_DIR --out_pth GT_DIR
    python scripts/segmentation_env.py --inp_pth PRED_DIR --data_name KVASIR --data_dir DATA [--split test]
    python scripts/segmentation_env.py --inp_pth PRED_DIR --data_name BRATS --data_dir DATA   # per case, in 3-D, mm

Reads the folders only; writes the per-image CSV and the JSON summary (by default
PRED_DIR/evaluation.csv and PRED_DIR/evaluation.json) and nothing else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.evaluation.scoring import (DEFAULT_CSV, DEFAULT_JSON, EvalOptions, evaluate,  # noqa: E402
                                                 format_table)
from guided_diffusion.config import str2bool  # noqa: E402
from guided_diffusion.data.datasets import DATA_NAMES  # noqa: E402


def bounded(kind: type, low: float, high: float, closed_high: bool = True):
    """argparse type: a number of the given kind in [low, high] (or [low, high))."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (low <= value <= high) or (not closed_high and value == high):
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}{']' if closed_high else ')'}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags; the seed's --inp_pth/--out_pth keep their meaning."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inp_pth", type=Path, required=True, help="folder of predicted masks (<id>.png; volumes: "
                                                                "<case>.nii.gz)")
    p.add_argument("--out_pth", type=Path, help="folder of ground-truth masks (the seed's form; or of NIfTI label "
                                                "volumes, scored per case in 3-D)")
    p.add_argument("--data_name", type=str.upper, choices=DATA_NAMES,
                   help="take ground truth from this data set's layout and split instead of --out_pth (BRATS, "
                        "NIFTI: label volumes, scored per case in 3-D with HD95/ASSD in mm)")
    p.add_argument("--data_dir", type=Path, help="data set root for --data_name")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"], help="split to score")
    p.add_argument("--split_file", type=Path,
                   help="split JSON (default: <inp_pth>/split.json for KVASIR/FOLDER/SYNTHETIC/BRATS/NIFTI when "
                        "present)")
    p.add_argument("--split_seed", type=int, default=0, help="seed of the default split when no split file is found")
    p.add_argument("--threshold", type=bounded(int, 0, 254), default=128,
                   help="a prediction pixel > threshold is foreground (ISIC: 128); "
                        "ground truth is read as in training (> 128)")
    p.add_argument("--strict", type=str2bool, nargs="?", const=True, default=False,
                   help="a prediction of another size than its ground truth is an error, not resized")
    p.add_argument("--allow_missing", type=str2bool, nargs="?", const=True, default=False,
                   help="score a ground truth without prediction as an empty mask instead of failing")
    p.add_argument("--unc_threshold", type=bounded(float, 0.0, 1.0, closed_high=False), default=0.5,
                   help="a pixel with uncertainty above this is flagged (0..1 = 0..255 in the PNG; the sampler's "
                        "maps are 2*std or entropy in bits, 1 where the members split evenly)")
    p.add_argument("--n_boot", type=bounded(int, 1, 10**6), default=1000, help="bootstrap resamples for the 95%% CI")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--labels", default=None,
                   help="volumes: the labels that are foreground, e.g. 1,4 (default: those the sampler recorded in "
                        "<inp_pth>/sampling.json, else every label > 0)")
    p.add_argument("--csv", type=Path, help=f"per-image CSV (default <inp_pth>/{DEFAULT_CSV})")
    p.add_argument("--json", type=Path, help=f"JSON summary (default <inp_pth>/{DEFAULT_JSON})")
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse flags, evaluate, print notes and the table (bad input raises EvaluationError/DataError)."""
    args = build_parser().parse_args(argv)
    result = evaluate(EvalOptions(**vars(args)))  # progress: a bar on a terminal, periodic lines in a log
    for note in result.notes:
        print(note, file=sys.stderr)
    print(format_table(result.summary))
    print(f"wrote {result.csv} and {result.json}")


if __name__ == "__main__":
    run_cli(main)  # a user error: one line "error: ..." on stderr, exit status 2
