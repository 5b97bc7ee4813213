"""Benchmark the samplers on one model and one set of images: NFE, seconds per image, Dice, speed-up.

Every row is measured in this one run, on the same images and weights; the reference is DDPM over all the
model's training steps. Also measures what a batched ensemble costs against a single member.
ADDPM rows (`addpm-ddpm:0`, `addpm-dpm_solver++:5`, ...) use --pre_t, --stop_t, --preseg, --denoiser_path.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.reports import benchmark  # noqa: E402
from guided_diffusion import distributed  # noqa: E402
from guided_diffusion.checkpoint import load_checkpoint  # noqa: E402
from guided_diffusion.fileio import atomic_write  # noqa: E402
from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.sampling.pipeline import SampleConfig  # noqa: E402
from guided_diffusion.config import str2bool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model_path", required=True, help="checkpoint or training run folder")
    p.add_argument("--data_name", default="", help="data set (default: the checkpoint's)")
    p.add_argument("--data_dir", default="", help="data root (default: the checkpoint's)")
    p.add_argument("--split", default="test")
    p.add_argument("--out_dir", default="runs/benchmark", help="where the masks and the table go")
    p.add_argument("--configs", default="ddpm:1000,ddim:50,dpm_solver:20,dpm_solver++:10,dpm_solver++:20",
                   help="comma-separated sampler:steps (ddpm steps above the model's T are clipped to T); "
                        "addpm-<sampler>:steps for ADDPM with that chain (steps 0: its default, all DDPM steps)")
    p.add_argument("--num_ensemble", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_images", type=int, default=20, help="images of the split to use (0: all)")
    p.add_argument("--ensemble_check", default="dpm_solver++:20",
                   help="sampler:steps timed with 1 member vs --num_ensemble members ('' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--reuse", type=str2bool, default=False,
                   help="keep the masks a row's folder in --out_dir already holds (same model and seed) and read "
                        "their cost from its manifest instead of resampling them")
    p.add_argument("--plot", type=str2bool, default=False,
                   help="also draw quant.png (Dice against seconds per image) and qual.png (example masks and "
                        "uncertainty maps) into --plot_dir")
    p.add_argument("--plot_dir", default="readme", help="folder of the figures (the README shows readme/)")
    p.add_argument("--plot_images", type=int, default=4, help="images in qual.png")
    speed = p.add_argument_group("speed (as in segmentation_sample.py)")
    for name in ("amp", "compile", "channels_last", "warmup"):
        f = SampleConfig.__dataclass_fields__[name]
        speed.add_argument(f"--{name}", type=str2bool if f.type in (bool, "bool") else type(f.default),
                           default=f.default, help=f.metadata["help"])
    a = p.add_argument_group("ADDPM rows (as in segmentation_sample.py)")
    for name in ("pre_t", "stop_t", "preseg", "denoiser_path"):
        f = SampleConfig.__dataclass_fields__[name]
        a.add_argument(f"--{name}", type=type(f.default), default=f.default, help=f.metadata["help"]
                       + ("; comma-separated: each ADDPM row once per pre-segmentation" if name == "preseg" else ""))
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = distributed.resolve_device(args.device)
    ckpt = load_checkpoint(args.model_path)
    T = ckpt["config"]["diffusion"]["diffusion_steps"]
    data = (args.data_name or ckpt["config"]["data"]["data_name"], args.data_dir or ckpt["config"]["data"]["data_dir"])
    base = SampleConfig(model_path=ckpt["path"], data_name=data[0], data_dir=data[1], split=args.split,
                        batch_size=args.batch_size, max_images=args.max_images, seed=args.seed,
                        device=args.device, num_workers=0,
                        **{k: getattr(args, k) for k in ("amp", "compile", "channels_last", "warmup")})
    addpm = {k: getattr(args, k) for k in ("pre_t", "stop_t", "preseg", "denoiser_path")}
    out_root = Path(args.out_dir)
    specs = benchmark.expand_rows(benchmark.parse_configs(args.configs), addpm)
    rows = benchmark.run_rows(base, specs, args.num_ensemble, out_root, device, data, T, args.reuse)
    table = benchmark.to_markdown(rows)
    lines = [f"model {ckpt['path']} (step {ckpt['step']}, T = {T}); {data[0]} {args.split} split, "
             f"{args.max_images or 'all'} images; device {device}; command: python scripts/benchmark_sampling.py "
             + " ".join(sys.argv[1:] if argv is None else argv), "", table]
    note = benchmark.addpm_note(specs, addpm, T)
    lines += [note] if note else []
    if args.ensemble_check:
        check = benchmark.expand_rows(benchmark.parse_configs(args.ensemble_check), addpm)[0]
        lines += ["", benchmark.ensemble_cost(base, check, rows, args.num_ensemble, out_root, device, data,
                                              args.reuse)]
    if args.plot:
        made = benchmark.plot(rows, data, args.split, Path(args.plot_dir), args.plot_images,
                              title=f"{data[0]} {args.split}, {len(rows[0].per_image)} images, "
                                    f"{args.num_ensemble} members, {device.type}")
        lines += ["", "figures: " + ", ".join(str(m) for m in made)]
    text = "\n".join(lines) + "\n"
    out_root.mkdir(parents=True, exist_ok=True)
    atomic_write(out_root / "benchmark.md", text)
    atomic_write(out_root / "benchmark.csv", benchmark.to_csv(rows))
    print(text + f"written: {out_root / 'benchmark.md'}, {out_root / 'benchmark.csv'}")


if __name__ == "__main__":
    run_cli(main)
