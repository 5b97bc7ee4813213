"""Quality benchmark: diffusion models against a plain UNet trained for the same minutes on the same split.

    python scripts/benchmark_quality.py --data_name KVASIR --data_dir ../shared/data/Kvasir-SEG --image_size 64 \
        --minutes 10 --out_dir runs/quality_kvasir --ablations all --device cpu

Trains (each for --minutes), samples the test split with --samplers (and DDPM over all T steps on the first
--ddpm_images), scores every folder, and writes quality.md, quality.csv and quality.png into --out_dir.
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.config import add_dataclass_args, from_namespace  # noqa: E402
from guided_diffusion.reports.quality import QualityConfig, run_quality  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, QualityConfig, "quality benchmark")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    run_quality(from_namespace(QualityConfig, parser.parse_args(argv)),
                command="python scripts/benchmark_quality.py " + " ".join(shlex.quote(a) for a in argv))


if __name__ == "__main__":
    run_cli(main)
