"""Write a synthetic multi-modal MRI data set of NIfTI volumes (BraTS or Decathlon layout) to try the volume path.

    python scripts/make_synthetic_volumes.py --layout brats --out_dir data/syn_brats --cases 8
    python scripts/make_synthetic_volumes.py --layout nifti --out_dir data/syn_msd --cases 8 --channels_layout split

Each case: a head-like nonzero region, four noisy channels (t1, t1ce, t2, flair) and a random ellipsoid tumour
(BraTS labels 1, 2, 4; Decathlon 1, 2, 3), anisotropic voxels and a rotated, flipped affine
(guided_diffusion/data/synthetic_volumes.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.data.synthetic_volumes import DEFAULT_SHAPE, DEFAULT_SPACING, write_volumes  # noqa: E402


def numbers(kind, count: int):
    """argparse type: `count` comma-separated numbers of `kind`."""
    def parse(text: str):
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated {kind.__name__}s, got {text!r}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", required=True, choices=["brats", "nifti"],
                   help="brats: <case>/<case>_<mod>.nii.gz; nifti: imagesTr/ + labelsTr/ + dataset.json")
    p.add_argument("--out_dir", type=Path, required=True, help="a new (or empty) folder")
    p.add_argument("--cases", type=int, default=8, help="number of cases (default: 8)")
    p.add_argument("--shape", type=numbers(int, 3), default=DEFAULT_SHAPE,
                   help=f"voxels X,Y,Z (default: {','.join(map(str, DEFAULT_SHAPE))})")
    p.add_argument("--spacing", type=numbers(float, 3), default=DEFAULT_SPACING,
                   help=f"voxel size in mm (default: {','.join(map(str, DEFAULT_SPACING))})")
    p.add_argument("--channels_layout", default="4d", choices=["4d", "split"],
                   help="nifti: one 4-D image per case (channels last), or one <case>_000k file per channel "
                        "(default: 4d)")
    p.add_argument("--empty_cases", type=int, default=0, help="the last N cases have no tumour (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = write_volumes(args.out_dir, args.layout, args.cases, args.seed, args.shape, args.spacing,
                        args.channels_layout, args.empty_cases)
    print(f"wrote {args.cases} {args.layout} cases of {'x'.join(map(str, args.shape))} voxels "
          f"({'x'.join(f'{s:g}' for s in args.spacing)} mm) to {out}")


if __name__ == "__main__":
    run_cli(main)
