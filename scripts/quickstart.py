"""The whole method in minutes: make the data, train a small model, sample the test images with the 1000-step
DDPM reference (a few) and DPM-Solver++ (all), evaluate, and write runs/quickstart/report.md with figures."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.reports.quickstart import QuickstartConfig, run_quickstart  # noqa: E402
from guided_diffusion.config import add_dataclass_args, from_namespace  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_dataclass_args(parser, QuickstartConfig, "quickstart")
    run_quickstart(from_namespace(QuickstartConfig, parser.parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
