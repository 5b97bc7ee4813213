"""Train a MedSegDiff-style diffusion segmenter (single process, or one process per GPU under torchrun).

    python scripts/segmentation_train.py --preset cpu --data_name KVASIR --data_dir D --out_dir R --image_size 64 \
        --max_minutes 10 --device cpu                                                  # the small-CPU recipe
    torchrun --nproc_per_node 4 scripts/segmentation_train.py ... --batch_size 8   # global batch 32
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion import distributed  # noqa: E402
from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.config import parse_train_args, train_parser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Each flag's help already ends with its default; the raw description keeps the examples."""
    return train_parser(__doc__)


def main(argv=None) -> None:
    model, diffusion, data, train = parse_train_args(argv, __doc__)
    from guided_diffusion.training.diffusion import DiffusionTrainer

    info = distributed.setup(train.device)
    with distributed.worker(info):  # an error on one rank is recorded for torchrun, which then stops them all
        DiffusionTrainer(model, diffusion, data, train, info).run()


if __name__ == "__main__":
    run_cli(main)
