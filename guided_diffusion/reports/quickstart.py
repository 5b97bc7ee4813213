"""The quickstart: the whole method on one data set in minutes, with its speed/quality report.

It builds the data set (the built-in synthetic one by default), trains a small diffusion segmenter, samples the
test images with the 1000-step ancestral reference on a few of them and with the fast solvers on all of them,
scores every folder against the ground truth, and writes `report.md` (the tables), `quant.png` (Dice against
seconds per image) and one example panel per sampler (image, ground truth, fused mask, uncertainty map).
Re-running it continues the training from its checkpoint and samples afresh.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from guided_diffusion.reports import benchmark, figures
from guided_diffusion import distributed
from guided_diffusion.checkpoint import find_latest
from guided_diffusion.fileio import atomic_write
from guided_diffusion.layout import QUICKSTART_MODEL, QUICKSTART_REPORT, QUICKSTART_SAMPLES
from guided_diffusion.sampling.pipeline import SampleConfig
from guided_diffusion.sampling.samplers import SAMPLERS
from guided_diffusion.config import DataConfig, DiffusionConfig, ModelConfig, TrainConfig, parse_train_args


@dataclass
class QuickstartConfig:
    """Flags of scripts/quickstart.py. The defaults take under 7 minutes on a 2-core CPU (README, measured)."""
    data_name: str = field(default="SYNTHETIC", metadata={"help": "ISIC, KVASIR, FOLDER or SYNTHETIC"})
    data_dir: str = field(default="data/synthetic", metadata={"help": "data set root (SYNTHETIC: made when absent)"})
    out_dir: str = field(default="runs/quickstart", metadata={"help": "where the model, masks and report go"})
    image_size: int = field(default=32, metadata={"help": "side the images are resized to"})
    preset: str = field(default="cpu", metadata={"help": "the training recipe (segmentation_train.py --preset)"})
    train_flags: str = field(default="", metadata={"help": "more segmentation_train.py flags (quoted), over the "
                                                           "preset"})
    train_steps: int = field(default=1500, metadata={"help": "training steps"})
    diffusion_steps: int = field(default=1000, metadata={"help": "noise levels T; the reference is DDPM over all T"})
    samplers: str = field(default="ddim:1,dpm_solver++:10,sde-dpm_solver++:10",
                          metadata={"help": "fast samplers run on every test image, comma-separated sampler:steps "
                                            "(ddim:1 is the one-step x0 read-out)"})
    ddpm_images: int = field(default=4, metadata={"help": "test images sampled with the 1000-step DDPM reference "
                                                          "(0: skip it)"})
    max_images: int = field(default=0, metadata={"help": "test images for the fast samplers (0: all)"})
    num_ensemble: int = field(default=5, metadata={"help": "masks sampled per image"})
    panel_images: int = field(default=4, metadata={"help": "images in each example panel"})
    seed: int = field(default=0, metadata={"help": "random seed (training and sampling)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    num_workers: int = field(default=0, metadata={"help": "data-loading workers for training"})


def train_configs(cfg: QuickstartConfig) -> tuple[ModelConfig, DiffusionConfig, DataConfig, TrainConfig]:
    """The model's configs: segmentation_train.py's flags with --preset, the quickstart's own on top."""
    return parse_train_args(["--preset", cfg.preset, "--data_name", cfg.data_name, "--data_dir", cfg.data_dir,
                             "--image_size", str(cfg.image_size), "--diffusion_steps", str(cfg.diffusion_steps),
                             "--out_dir", str(Path(cfg.out_dir) / QUICKSTART_MODEL), "--max_steps",
                             str(cfg.train_steps), "--save_interval", str(cfg.train_steps), "--log_interval", "50",
                             "--seed", str(cfg.seed), "--num_workers", str(cfg.num_workers), "--device", cfg.device,
                             *shlex.split(cfg.train_flags)])


def train_model(cfg: QuickstartConfig, info: distributed.DistInfo) -> Path:
    """Train (or finish training) the quickstart's model in <out_dir>/model; returns its checkpoint."""
    from guided_diffusion.training.diffusion import DiffusionTrainer

    model_dir = Path(cfg.out_dir) / QUICKSTART_MODEL
    DiffusionTrainer(*train_configs(cfg), info).run()
    path = find_latest(model_dir)
    if path is None:  # pragma: no cover - run() always saves at max_steps
        raise RuntimeError(f"training wrote no checkpoint to {model_dir}")
    return path


def dice_with_ci(row: benchmark.BenchRow) -> tuple[str, int]:
    """('0.8123 [0.7712, 0.8490]', number of images) of the row's evaluation."""
    d = row.dice_summary
    return f"{d['mean']:.4f} [{d['ci95_low']:.4f}, {d['ci95_high']:.4f}]", int(row.evaluation.summary["n_images"])


def row_tag(row: benchmark.BenchRow) -> str:
    return f"{row.sampler}-{row.steps}"


def report_text(cfg: QuickstartConfig, ckpt: Path, rows: list[benchmark.BenchRow], head: list[benchmark.BenchRow],
                ids: list[str], made: list[Path], minutes: float) -> str:
    """report.md: what ran, the table against the reference on its images, the table over every sampled image."""
    out = Path(cfg.out_dir)
    mc, dc, _, tc = train_configs(cfg)
    lines = [f"# Quickstart report: {cfg.data_name} ({cfg.data_dir})", "",
             f"Model `{ckpt}` (--preset {cfg.preset} {cfg.train_flags}".rstrip() + f"): {mc.image_size}x{mc.image_size} "
             f"px, the {mc.network} network, {mc.num_channels} channels, {cfg.train_steps} training steps of batch "
             f"{tc.batch_size}; {dc.prediction} prediction, masks scaled to ±{dc.mask_scale:g}, self-conditioning "
             f"{'on' if dc.self_condition else 'off'}, recycling {'on' if tc.recycle else 'off'}, "
             f"T = {dc.diffusion_steps} ({dc.noise_schedule} schedule). "
             f"{cfg.num_ensemble} masks per image, fused by their mean and thresholded at 0.5; Dice at each "
             f"image's original size. The whole run took {minutes:.1f} minutes.", ""]
    if head:
        lines += [f"## Against DDPM over all {cfg.diffusion_steps} steps, on the same {len(ids)} test images", "",
                  benchmark.to_markdown(head).rstrip("\n"), ""]
    lines += ["## Every sampled test image", "",
              "| sampler | steps | NFE | s / image | images | Dice [95% CI] | IoU |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        dice, n = dice_with_ci(r)
        lines.append(f"| {r.sampler} | {r.steps} | {r.nfe} | {r.seconds_per_image:.3f} | {n} | {dice} | "
                     f"{r.iou:.4f} |")
    lines += ["", "NFE: network evaluations per member (all members run as one batch). Seconds per image cover "
                  "every member and the fusion. 95% CI: percentile bootstrap of the mean Dice.", "",
              "## Figures", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in made]
    return "\n".join(lines) + "\n"


def make_figures(cfg: QuickstartConfig, rows: list[benchmark.BenchRow], ids: list[str],
                 head: list[benchmark.BenchRow]) -> list[Path]:
    """quant.png (Dice against seconds per image; on the reference's images when there is one) and one panel
    per sampler over the first --panel_images of those images."""
    out = Path(cfg.out_dir)
    pairs = benchmark.pairs_of(rows[0], (cfg.data_name, cfg.data_dir), "test", ids[:cfg.panel_images])
    made = []
    for r in rows:
        dice = r.per_image["dice"]
        made.append(figures.example_grid(
            pairs, [figures.Column("fused mask", Path(r.folder)),
                    figures.Column("uncertainty", Path(r.folder), "uncertainty")],
            out / f"panel_{row_tag(r)}.png",
            title=f"{r.sampler}, {r.steps} steps, {r.nfe} NFE, {r.num_ensemble} members",
            cell_titles={(p.id, "fused mask"): f"Dice {dice.loc[p.id]:.3f}" for p in pairs}))
    ref = benchmark.speed_point(benchmark.reference_row(head)) if head else None
    where = f"the same {len(ids)} test images" if head else "all sampled test images"
    made.insert(0, figures.speed_quality_plot(
        [benchmark.speed_point(r) for r in head or rows], out / "quant.png", reference=ref,
        title=f"{cfg.data_name}: Dice on {where}, {cfg.num_ensemble} members"))
    return made


def _validate(cfg: QuickstartConfig) -> list[tuple[str, int]]:
    if cfg.ddpm_images < 0 or cfg.max_images < 0:
        raise ValueError("--ddpm_images and --max_images must be >= 0")
    if cfg.panel_images < 1 or cfg.num_ensemble < 1:
        raise ValueError("--panel_images and --num_ensemble must be >= 1")
    configs = benchmark.parse_configs(cfg.samplers, "--samplers") if cfg.samplers.strip() else []
    if not configs and not cfg.ddpm_images:
        raise ValueError("nothing to sample: give --samplers or --ddpm_images > 0")
    unknown = [name for name, _ in configs if name not in SAMPLERS]
    if unknown:  # checked now, not after the training
        raise ValueError(f"--samplers: unknown sampler {unknown[0]!r} (one of {', '.join(SAMPLERS)})")
    return configs


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Path]:
    """Train, sample, evaluate, report; returns the paths it wrote (model, report, figures, sample folders)."""
    t0 = time.perf_counter()
    configs = _validate(cfg)
    info = distributed.setup(cfg.device)
    if info.distributed:
        raise ValueError("the quickstart runs as one process; use segmentation_train.py under torchrun")
    out = Path(cfg.out_dir)
    print(f"[1/3] training a {cfg.image_size}x{cfg.image_size} model on {cfg.data_name} ({cfg.data_dir}) "
          f"for {cfg.train_steps} steps", flush=True)
    ckpt = train_model(cfg, info)
    base = SampleConfig(model_path=str(ckpt), data_name=cfg.data_name, data_dir=cfg.data_dir, split="test",
                        batch_size=4, seed=cfg.seed, device=cfg.device, num_workers=0)
    data, samples = (cfg.data_name, cfg.data_dir), out / QUICKSTART_SAMPLES
    plan = [("ddpm", cfg.diffusion_steps, cfg.ddpm_images)] if cfg.ddpm_images else []
    plan += [(name, steps, cfg.max_images) for name, steps in configs]
    print("[2/3] sampling the test images: " + ", ".join(
        f"{n} {k} steps on {m or 'all'}" for n, k, m in plan), flush=True)
    rows = [benchmark.run_one(replace(base, max_images=m), benchmark.RowSpec.sampler(n, k), cfg.num_ensemble, samples,
                              info.device, data) for n, k, m in plan]
    ids = list(rows[0].per_image.index)
    head = benchmark.on_images(rows, ids) if cfg.ddpm_images else []
    print("[3/3] figures and report", flush=True)
    made = make_figures(cfg, rows, ids, head)
    text = report_text(cfg, ckpt, rows, head, ids, made, (time.perf_counter() - t0) / 60)
    report = atomic_write(out / QUICKSTART_REPORT, text)
    print("\n" + text)
    paths = {"model": ckpt, "report": report, **{p.stem: p for p in made},
             **{f"masks {row_tag(r)}": Path(r.folder) for r in rows}}
    print("written:\n" + "\n".join(f"  {k:<28} {v}" for k, v in paths.items()), flush=True)
    return paths
