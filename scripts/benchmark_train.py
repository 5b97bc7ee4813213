"""Training speed of one configuration with and without each speed option: images/s, peak memory, and the
fraction of step time spent waiting for data. Writes <out_dir>/benchmark_train.md and .csv.

    python scripts/benchmark_train.py --image_size 64 --num_channels 32 --num_res_blocks 1 --batch_size 8 \
        --device cpu --variants fp32,channels_last,bf16
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.data import datasets  # noqa: E402
from guided_diffusion import distributed  # noqa: E402
from guided_diffusion.reports import train_speed  # noqa: E402
from guided_diffusion.fileio import atomic_write  # noqa: E402
from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.config import (DataConfig, DiffusionConfig, ModelConfig, TrainConfig, add_dataclass_args,
                                     from_namespace)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, DataConfig, "data")
    add_dataclass_args(p, ModelConfig, "model")
    add_dataclass_args(p, DiffusionConfig, "diffusion")
    g = p.add_argument_group("training (as in segmentation_train.py)")
    g.add_argument("--batch_size", type=int, default=TrainConfig.batch_size, help="images per step")
    g.add_argument("--lr", type=float, default=TrainConfig.lr)
    g.add_argument("--num_workers", type=int, default=TrainConfig.num_workers, help="data-loading workers")
    g.add_argument("--preload", default=TrainConfig.preload, help=datasets.PRELOAD_HELP)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b = p.add_argument_group("benchmark")
    b.add_argument("--variants", default="",
                   help="comma-separated option sets joined with +, from fp32 (none), "
                        + ", ".join(train_speed.OPTIONS) + f"; default on CPU: {train_speed.DEFAULT_VARIANTS['cpu']}; "
                        f"on CUDA: {train_speed.DEFAULT_VARIANTS['cuda']}")
    b.add_argument("--data", default="memory,loader",
                   help="comma-separated: memory (one batch kept on the device), loader (the training DataLoader), "
                        "loader_only (the DataLoader with no model, --preload False and True)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per variant and data mode")
    b.add_argument("--out_dir", default="runs/benchmark_train", help="where the table goes")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = distributed.resolve_device(args.device)
    train = TrainConfig(batch_size=args.batch_size, lr=args.lr, num_workers=args.num_workers, seed=args.seed,
                        preload=args.preload)
    cfg = train_speed.BenchConfig(
        model=from_namespace(ModelConfig, args), diffusion=from_namespace(DiffusionConfig, args),
        data=from_namespace(DataConfig, args), train=train, warmup=args.warmup, steps=args.steps,
        variants=train_speed.parse_variants(args.variants or train_speed.DEFAULT_VARIANTS[device.type]),
        data_modes=train_speed.parse_data_modes(args.data))
    rows = train_speed.run(cfg, device, log=lambda s: print(s, flush=True))
    command = "python scripts/benchmark_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"{train_speed.describe(cfg, device)}\ncommand: {command}\n\n{train_speed.to_markdown(rows)}\n"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "benchmark_train.md", text)
    atomic_write(out / "benchmark_train.csv", train_speed.to_csv(rows))
    print("\n" + text + f"written: {out / 'benchmark_train.md'}, {out / 'benchmark_train.csv'}")


if __name__ == "__main__":
    run_cli(main)
