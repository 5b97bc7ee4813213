"""The quality benchmark: diffusion models against a plain UNet trained for the same minutes on the same split.

On one data set it trains, each for --minutes of training time (the trainers' --max_minutes), the diffusion
model of --preset (plus --diffusion_flags), the ablation models of --ablations (the same with one formulation
option changed each), and a plain UNet (train_preseg_network.py: image -> mask, Dice + BCE) on the diffusion run's
split; samples the test images with every sampler of --samplers (the 1-step x0 read-out, the 10-step solvers, the
seed's --dpm_solver True form) and DDPM over all T steps on the first --ddpm_images; writes the UNet's masks
through the same pipeline; scores every folder at the images' original size; and writes quality.md (the table,
with the paired Dice difference to the UNet and its bootstrap CI), quality.csv and quality.png (Dice against NFE,
the UNet as a line). With --extra_seeds the main model and the UNet are trained and sampled again with each seed
(into <out_dir>/seed<k>/), and the report adds a table over the seeds (quality_seeds.csv): each seed's Dice and
paired difference to its own UNet, and the per-image difference averaged over the seeds with its CI. Every model is
trained before any is sampled; --jobs N trains N at a time in subprocesses, the diffusion model and the UNet of a
seed side by side, each with an equal share of the CPU threads (the README's protocol: --jobs 2 on 2 cores, one
thread per model). Re-running continues: finished trainings are not redone and finished masks are kept.
"""
from __future__ import annotations

import csv
import io
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from guided_diffusion import distributed
from guided_diffusion.checkpoint import find_latest
from guided_diffusion.config import parse_int_list, parse_train_args
from guided_diffusion.evaluation.metrics import bootstrap_ci
from guided_diffusion.fileio import atomic_write
from guided_diffusion.layout import VIEWS_TAG
from guided_diffusion.reports import benchmark, figures
from guided_diffusion.reports.benchmark import BenchRow, RowSpec
from guided_diffusion.sampling.pipeline import SampleConfig
from guided_diffusion.sampling.samplers import SAMPLERS, check_views

MAIN, UNET = "diffusion", "plain UNet"
SEED_FORM = "seed"  # --samplers entry seed:K = the seed's `--dpm_solver True --diffusion_steps K`
DDIM_TD = "ddim-td"  # --samplers entry ddim-td<d>:K = DDIM with K steps and the time difference --td d

# Each ablation: the main recipe with the flags that undo or change one option (what each option adds).
ABLATIONS: dict[str, tuple[str, str]] = {
    "seed-eps": ("the seed's network and formulation: MedSegDiff, eps, learned sigma, b = 1, uniform t, no "
                 "self-conditioning, no mask loss", "--network medsegdiff --image_concat False --prediction eps "
                 "--x0_tanh False --learn_sigma True --mask_scale 1 --self_condition False --mask_loss_weight 0 "
                 "--t_power 1"),
    "medsegdiff": ("the MedSegDiff network with the image also concatenated to x_t (the former preset) instead of "
                   "the decoupled one", "--network medsegdiff --image_concat True"),
    "concat-unet": ("a plain UNet denoiser on [x_t, image] (--network unet), the whole network at every step",
                    "--network unet"),
    "no-tanh": ("an unbounded x0 output instead of b tanh(calibration logit / 2 + head): the head predicts x0 "
                "itself, not a correction of the one-pass mask", "--x0_tanh False"),
    "head1": ("a mask head of one residual block instead of two", "--head_blocks 1"),
    "head-full": ("the mask head at full resolution (--head_stride 1, the preset's head before --head_stride 4)",
                  "--head_stride 1"),
    "no-selfcond": ("without self-conditioning", "--self_condition False"),
    "no-maskloss": ("without the Dice + BCE on the x0 estimate", "--mask_loss_weight 0"),
    "b1": ("masks in {-1, 1} (mask scale 1)", "--mask_scale 1"),
    "b0.3": ("mask scale 0.3", "--mask_scale 0.3"),
    "v": ("v prediction instead of x0", "--prediction v --x0_tanh False"),
    "eps": ("eps prediction instead of x0", "--prediction eps --x0_tanh False"),
    "recycle": ("recycling (Fu et al. 2023) instead of self-conditioning", "--self_condition False --recycle True"),
    "recycle-sc": ("recycling as well as self-conditioning", "--recycle True"),
    "tpow1": ("timesteps drawn uniformly (t_power 1)", "--t_power 1"),
    "cosine": ("the cosine schedule", "--noise_schedule cosine"),
    "detach": ("the mask head's losses stop at the backbone: only the calibration loss trains it, as the plain UNet "
               "is trained", "--detach_condition True"),
    "db2": ("the diffusion losses on 2 of the 8 images of each batch (more backbone steps in the minutes)",
            "--diffusion_batch 2"),
    "detach-db2": ("both: the backbone trained as the plain UNet, the head on 2 images of each batch",
                   "--detach_condition True --diffusion_batch 2"),
    "lr2e-3": ("the learning rate doubled (2e-3)", "--lr 2e-3"),
    "batch4": ("batches of 4 (twice the steps in the minutes)", "--batch_size 4"),
    "calib6": ("the mask head trained on a perturbed calibration logit (errors to correct; --calib_noise 6)",
               "--calib_noise 6"),
    "calib12": ("the mask head trained on a more perturbed calibration logit (--calib_noise 12)", "--calib_noise 12"),
    "detach-calib6": ("a perturbed logit with the head's losses stopped at the backbone, so only the head can undo "
                      "the perturbation", "--detach_condition True --calib_noise 6"),
    "detach-calib12": ("the same with --calib_noise 12", "--detach_condition True --calib_noise 12"),
}


@dataclass
class QualityConfig:
    """Flags of scripts/benchmark_quality.py."""
    data_name: str = field(default="KVASIR", metadata={"help": "ISIC, KVASIR, FOLDER or SYNTHETIC"})
    data_dir: str = field(default="../shared/data/Kvasir-SEG", metadata={"help": "data set root"})
    image_size: int = field(default=64, metadata={"help": "side the images are resized to"})
    minutes: float = field(default=10.0, metadata={"help": "training minutes of every model (--max_minutes)"})
    out_dir: str = field(default="runs/quality", metadata={"help": "models, masks and the report"})
    preset: str = field(default="cpu", metadata={"help": "the main diffusion model's --preset"})
    diffusion_flags: str = field(default="", metadata={"help": "more segmentation_train.py flags for every diffusion "
                                                               "model (quoted)"})
    ablations: str = field(default="", metadata={"help": "comma-separated ablation models ('all': every one): "
                                                         + ", ".join(ABLATIONS)})
    unet_flags: str = field(default="--num_channels 16 --batch_size 8 --lr 1e-3 --ema_rate 0.995",
                            metadata={"help": "train_preseg_network.py flags of the plain UNet (quoted)"})
    samplers: str = field(default="ddim:1,ddim:10,dpm_solver++:10,seed:10,sde-dpm_solver++:10",
                          metadata={"help": "rows of the main model, sampler:steps (seed:K is the seed's "
                                            "--dpm_solver True --diffusion_steps K; ddim:1 the one-step x0 read-out)"})
    ablation_samplers: str = field(default="ddim:1,dpm_solver++:10", metadata={"help": "rows of every ablation model"})
    ddpm_images: int = field(default=4, metadata={"help": "test images also sampled with DDPM over all T steps "
                                                          "(0: none)"})
    num_ensemble: int = field(default=5, metadata={"help": "masks sampled per image"})
    views: int = field(default=1, metadata={"help": "every row, the plain UNet's included, sampled with "
                                                    "segmentation_sample.py --views N (1, 2 or 4 mirrored copies "
                                                    "of each image); each row's Dice - UNet is against the UNet "
                                                    "with the same views"})
    max_images: int = field(default=0, metadata={"help": "test images to sample (0: all)"})
    seed: int = field(default=0, metadata={"help": "training and sampling seed"})
    extra_seeds: str = field(default="", metadata={"help": "more training seeds, comma-separated (e.g. 1,2): the main "
                                                           "model and the plain UNet are trained again with each, "
                                                           "into <out_dir>/seed<k>/, and sampled with --samplers; the "
                                                           "report adds a table over all seeds (10-minute runs on "
                                                           "20 test images differ by several Dice points from seed "
                                                           "to seed)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val/test split"})
    folds: int = field(default=0, metadata={"help": "k-fold cross-validation (segmentation_train.py's --folds): "
                                                    "run the benchmark once per --fold 0..k-1, each into its own "
                                                    "--out_dir, and pool them with pool_quality.py; the k test sets "
                                                    "cover every image once (default 0: one seeded split)"})
    fold: int = field(default=0, metadata={"help": "with --folds k: the test fold of this benchmark, 0 to k - 1"})
    jobs: int = field(default=1, metadata={"help": "models trained at a time, each in its own process with an equal "
                                                   "share of the CPU threads (default 1: one after the other, in "
                                                   "this process); the diffusion model and the UNet of a seed start "
                                                   "together, so both train under the same machine load"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    plot_dir: str = field(default="", metadata={"help": "also write the figure here (e.g. readme)"})


@dataclass
class QualityRow:
    """One model and sampler: its BenchRow, the images it is summarised over (None: all it sampled) and the paired
    comparison with the plain UNet on them."""
    model: str
    row: BenchRow
    ids: list[str] | None = None
    delta: float = float("nan")
    delta_low: float = float("nan")
    delta_high: float = float("nan")

    @property
    def scores(self):
        """The per-image scores the row is summarised over."""
        table = self.row.per_image
        return table if self.ids is None else table.loc[self.ids]


def parse_samplers(spec: str, flag: str) -> list[RowSpec]:
    """'ddim:1,seed:10' -> rows; seed:K is the seed's fast command --dpm_solver True --diffusion_steps K, and
    ddim-td<d>:K DDIM with K steps and --td d."""
    rows = []
    for name, steps in benchmark.parse_configs(spec, flag):
        if name.startswith(DDIM_TD):
            try:
                td = float(name[len(DDIM_TD):])
            except ValueError:
                raise ValueError(f"{flag}: {name!r} needs a number after {DDIM_TD}, e.g. {DDIM_TD}1:10") from None
            rows.append(RowSpec("ddim", steps, {"sampler": "ddim", "steps": steps, "td": td}, tag=f"td{td:g}"))
        elif name == SEED_FORM:
            rows.append(RowSpec("dpm_solver++", steps, {"dpm_solver": True}, {"diffusion_steps": steps}, tag="seed"))
        elif name in SAMPLERS:
            rows.append(RowSpec.sampler(name, steps))
        else:
            raise ValueError(f"{flag}: unknown sampler {name!r} (one of {', '.join((*SAMPLERS, SEED_FORM))})")
    return rows


def extra_seeds(cfg: QualityConfig) -> list[int]:
    """--extra_seeds as integers, none repeating --seed."""
    seeds = list(parse_int_list(cfg.extra_seeds, "--extra_seeds"))
    if len(set(seeds)) != len(seeds) or cfg.seed in seeds:
        raise ValueError(f"--extra_seeds {cfg.extra_seeds} repeats a seed (--seed is {cfg.seed})")
    return seeds


def ablation_names(spec: str) -> list[str]:
    names = list(ABLATIONS) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"--ablations: unknown {unknown[0]!r} (one of {', '.join(ABLATIONS)}, or all)")
    return names


def validate(cfg: QualityConfig) -> None:
    """Every flag checked before the first minute of training."""
    if not cfg.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {cfg.minutes}")
    if cfg.ddpm_images < 0 or cfg.max_images < 0 or cfg.num_ensemble < 1:
        raise ValueError("--ddpm_images and --max_images must be >= 0, --num_ensemble >= 1")
    if cfg.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {cfg.jobs}")
    check_views(cfg.views)
    parse_samplers(cfg.samplers, "--samplers")
    parse_samplers(cfg.ablation_samplers, "--ablation_samplers")
    ablation_names(cfg.ablations)
    extra_seeds(cfg)
    diffusion_argv(cfg, "check", "")


def fold_flags(cfg: QualityConfig) -> list[str]:
    """The trainers' --folds/--fold flags (none without cross-validation, so earlier argv stay as they were)."""
    return ["--folds", str(cfg.folds), "--fold", str(cfg.fold)] if cfg.folds else []


def diffusion_argv(cfg: QualityConfig, name: str, variant_flags: str) -> list[str]:
    """segmentation_train.py's command line of one diffusion model; parsed here, so a bad flag fails at once."""
    argv = ["--preset", cfg.preset, "--data_name", cfg.data_name, "--data_dir", cfg.data_dir,
            "--image_size", str(cfg.image_size), "--out_dir", str(Path(cfg.out_dir) / "models" / name),
            "--max_minutes", str(cfg.minutes), "--max_steps", str(10 ** 9), "--seed", str(cfg.seed),
            "--split_seed", str(cfg.split_seed), *fold_flags(cfg), "--device", cfg.device,
            *shlex.split(cfg.diffusion_flags), *shlex.split(variant_flags)]
    parse_train_args(argv)
    return argv


@dataclass(frozen=True)
class TrainJob:
    """One model to train: its name, the training script and its command line (parsed before any training)."""
    name: str
    script: str
    argv: tuple[str, ...]

    @property
    def out_dir(self) -> Path:
        return Path(self.argv[self.argv.index("--out_dir") + 1])


def diffusion_job(cfg: QualityConfig, name: str, variant_flags: str) -> TrainJob:
    return TrainJob(name, "segmentation_train.py", tuple(diffusion_argv(cfg, name, variant_flags)))


def unet_job(cfg: QualityConfig) -> TrainJob:
    """train_preseg_network.py on the split the diffusion run draws (the same data flags and --split_seed; the
    splits are compared once both are trained), so the two can train at the same time."""
    from guided_diffusion.training import auxiliary

    argv = ["--data_name", cfg.data_name, "--data_dir", cfg.data_dir, "--image_size", str(cfg.image_size),
            "--split_seed", str(cfg.split_seed), *fold_flags(cfg),
            "--out_dir", str(Path(cfg.out_dir) / "models" / "unet"),
            "--max_minutes", str(cfg.minutes), "--max_steps", str(10 ** 9), "--seed", str(cfg.seed),
            "--num_workers", "0", "--device", cfg.device, *shlex.split(cfg.unet_flags)]
    auxiliary.aux_parser("preseg").parse_args(argv)
    return TrainJob(UNET, "train_preseg_network.py", tuple(argv))


def train_in_process(job: TrainJob, info: distributed.DistInfo) -> None:
    from guided_diffusion.training import auxiliary
    from guided_diffusion.training.diffusion import DiffusionTrainer

    print(f"== training {job.name}: {job.script} {shlex.join(job.argv)}", flush=True)
    if job.script == "train_preseg_network.py":
        auxiliary.train_aux("preseg", vars(auxiliary.aux_parser("preseg").parse_args(list(job.argv))))
    else:
        DiffusionTrainer(*parse_train_args(list(job.argv)), info).run()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train_all(cfg: QualityConfig, jobs: list[TrainJob], info: distributed.DistInfo) -> None:
    """Train every job: in this process one after the other (--jobs 1), else --jobs at a time in subprocesses,
    each with usable CPUs / --jobs threads and its output in <out_dir>.log, in list order."""
    if cfg.jobs == 1:
        for job in jobs:
            train_in_process(job, info)
        return
    threads = max(1, usable_cpus() // cfg.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    scripts = Path(__file__).resolve().parents[2] / "scripts"
    waiting, running, failed = list(jobs), [], []
    while waiting or running:
        while waiting and len(running) < cfg.jobs:
            job = waiting.pop(0)
            log = job.out_dir.with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"== training {job.name} ({threads} thread(s), output in {log}): {job.script} "
                  f"{shlex.join(job.argv)}", flush=True)
            with open(log, "w") as handle:
                proc = subprocess.Popen([sys.executable, str(scripts / job.script), *job.argv], env=env,
                                        stdout=handle, stderr=subprocess.STDOUT)
            running.append((job, proc, log))
        time.sleep(0.5)
        for entry in [r for r in running if r[1].poll() is not None]:
            running.remove(entry)
            job, proc, log = entry
            if proc.returncode:
                last = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
                failed.append(f"{job.name} in {job.out_dir} (exit {proc.returncode}: {last})")
    if failed:
        raise RuntimeError("training failed: " + "; ".join(failed))


def check_same_split(main: Path, unet: Path) -> None:
    """The plain UNet and the diffusion model must have trained on the same split (they draw it from the same
    data flags and --split_seed)."""
    from guided_diffusion.data.datasets import SPLITS, load_split
    from guided_diffusion.layout import SPLIT_FILE

    a, b = load_split(main / SPLIT_FILE), load_split(unet / SPLIT_FILE)
    if any(a[k] != b[k] for k in SPLITS):
        raise ValueError(f"{unet} trained on another split than {main}; remove {unet} and run again")


def sample_rows(cfg: QualityConfig, model: str, run: Path, rows: list[RowSpec], device: torch.device,
                max_images: int) -> list[QualityRow]:
    base = SampleConfig(model_path=str(find_latest(run)), data_name=cfg.data_name, data_dir=cfg.data_dir,
                        split="test", batch_size=4, max_images=max_images, seed=cfg.seed, device=str(device),
                        num_workers=0)
    out = Path(cfg.out_dir) / "samples" / model.replace(" ", "_")  # "plain UNet" -> plain_UNet: no space in paths
    data = (cfg.data_name, cfg.data_dir)
    return [QualityRow(model, benchmark.run_one(base, with_views(r, cfg.views), cfg.num_ensemble, out, device, data,
                                                reuse=True)) for r in rows]


def with_views(row: RowSpec, views: int) -> RowSpec:
    """The row sampled with --views `views`: its folder and label tagged views<N> (a row of 1 view is unchanged)."""
    if views == 1:
        return row
    return replace(row, sample_flags={**row.sample_flags, "views": views},
                   tag="+".join(t for t in (row.tag, f"{VIEWS_TAG}{views}") if t))


def paired_delta(row: QualityRow, unet: BenchRow, seed: int = 0) -> QualityRow:
    """Mean Dice difference to the UNet over the row's images, with a percentile-bootstrap 95% CI."""
    ids = list(row.scores.index)
    diff = row.scores["dice"].to_numpy() - unet.per_image.loc[ids, "dice"].to_numpy()
    lo, hi = bootstrap_ci(diff, n_boot=2000, seed=seed)
    return replace(row, delta=float(np.nanmean(diff)), delta_low=lo, delta_high=hi)


def _mean(q: QualityRow, name: str) -> float:
    values = q.scores[name] if name in q.scores else []
    return float(np.nanmean(values)) if len(values) and np.isfinite(values).any() else float("nan")


COLUMNS = ("model", "sampler", "steps", "NFE", "s / image", "images", "Dice [95% CI]", "Dice − UNet [95% CI]", "IoU",
           "HD95 (px)", "ECE")


def table_rows(rows: list[QualityRow]) -> list[list[str]]:
    out = []
    for q in rows:
        r, dice = q.row, q.scores["dice"].to_numpy()
        lo, hi = bootstrap_ci(dice, n_boot=2000)
        delta = "" if q.model == UNET else f"{q.delta:+.4f} [{q.delta_low:+.4f}, {q.delta_high:+.4f}]"
        out.append([q.model, r.sampler, str(r.steps), str(r.nfe), f"{r.seconds_per_image:.3f}", str(len(dice)),
                    f"{np.nanmean(dice):.4f} [{lo:.4f}, {hi:.4f}]", delta, f"{_mean(q, 'iou'):.4f}",
                    f"{_mean(q, 'hd95'):.2f}", f"{_mean(q, 'ece'):.4f}"])
    return out


def to_markdown(rows: list[QualityRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * 4 + "---|---|" + "---:|" * 3]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[QualityRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(table_rows(rows))
    return buf.getvalue()


SEED_COLUMNS = ("model", "sampler", "steps", "NFE", "Dice per seed", "mean Dice", "Dice − UNet per seed",
                "Dice − UNet over seeds [95% CI]")


def seeds_rows(by_seed: dict[int, list[QualityRow]]) -> list[list[str]]:
    """One row per model and sampler: the Dice of each seed's run, their mean, the paired difference to the same seed's
    UNet, and that difference averaged over the seeds per image, with its bootstrap CI over the images."""
    out = []
    for i, q in enumerate(next(iter(by_seed.values()))):
        runs = [rows[i] for rows in by_seed.values()]
        dice = [float(np.nanmean(r.scores["dice"].to_numpy())) for r in runs]
        cells = [q.model, q.row.sampler, str(q.row.steps), str(q.row.nfe), " / ".join(f"{d:.4f}" for d in dice),
                 f"{np.mean(dice):.4f}"]
        if q.model == UNET:
            out.append(cells + ["", ""])
            continue
        per_image = [r.scores["dice"] - rows[0].row.per_image["dice"].loc[r.scores.index]
                     for r, rows in zip(runs, by_seed.values())]
        pooled = np.nanmean(np.stack([d.loc[per_image[0].index].to_numpy() for d in per_image]), axis=0)
        lo, hi = bootstrap_ci(pooled, n_boot=2000)
        out.append(cells + [" / ".join(f"{r.delta:+.4f}" for r in runs),
                            f"{np.nanmean(pooled):+.4f} [{lo:+.4f}, {hi:+.4f}]"])
    return out


def seeds_markdown(by_seed: dict[int, list[QualityRow]]) -> str:
    lines = ["| " + " | ".join(SEED_COLUMNS) + " |", "|---|---|---:|---:|---|---:|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in seeds_rows(by_seed)]) + "\n"


def seeds_csv(by_seed: dict[int, list[QualityRow]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SEED_COLUMNS)
    w.writerows(seeds_rows(by_seed))
    return buf.getvalue()


def run_quality(cfg: QualityConfig, command: str = "") -> Path:
    """Train, sample, score and report; the path of quality.md."""
    t0 = time.perf_counter()
    validate(cfg)
    info = distributed.setup(cfg.device)
    if info.distributed:
        raise ValueError("the quality benchmark runs as one process")
    out = Path(cfg.out_dir)
    seeds = {k: seed_config(cfg, k) for k in extra_seeds(cfg)}
    pair = [diffusion_job(cfg, MAIN, ""), unet_job(cfg)]  # trained side by side under --jobs 2
    ablations = {name: diffusion_job(cfg, name, ABLATIONS[name][1]) for name in ablation_names(cfg.ablations)}
    train_all(cfg, [*pair, *ablations.values(),
                    *[job for ck in seeds.values() for job in (diffusion_job(ck, MAIN, ""), unet_job(ck))]], info)
    models = {MAIN: pair[0].out_dir, **{name: job.out_dir for name, job in ablations.items()}}
    unet_run = pair[1].out_dir
    check_same_split(models[MAIN], unet_run)

    rows = main_rows(cfg, models[MAIN], unet_run, info.device)
    unet = rows[0].row
    by_seed = {cfg.seed: list(rows)}
    ddpm = [paired_delta(q, unet) for q in sample_rows(cfg, MAIN, models[MAIN], [RowSpec.sampler("ddpm", 0)],
                                                       info.device, cfg.ddpm_images)] if cfg.ddpm_images else []
    ddpm_ids = list(ddpm[0].scores.index) if ddpm else []
    ddpm_on_all = bool(ddpm) and len(ddpm_ids) == len(unet.per_image)
    if ddpm_on_all:  # DDPM on every test image: a row of the main table, not a second table
        rows += ddpm
    for name in ablation_names(cfg.ablations):
        rows += [paired_delta(q, unet) for q in sample_rows(
            cfg, name, models[name], parse_samplers(cfg.ablation_samplers, "--ablation_samplers"), info.device,
            cfg.max_images)]
    runs = [(name, name, run) for name, run in models.items()] + [(UNET, UNET, unet_run)]
    for k, ck in seeds.items():
        by_seed[k], seed_runs = another_seed(ck, info)
        runs += seed_runs
    lines = [f"# Quality: {cfg.data_name} ({cfg.data_dir}), {cfg.image_size} px, {cfg.minutes:g} training minutes "
             f"per model" + (f"; every row with {cfg.views} mirrored views (--views)" if cfg.views > 1 else ""), "",
             f"command: {command}" if command else "", "",
             to_markdown(rows)]
    if ddpm and not ddpm_on_all:
        subset = [QualityRow(q.model, q.row, ddpm_ids) for q in rows if q.model in (UNET, MAIN)]
        subset = [subset[0]] + [paired_delta(q, unet) for q in subset[1:]] + ddpm
        lines += [f"On the first {len(ddpm_ids)} test images, with DDPM over all T steps:", "", to_markdown(subset)]
    if len(by_seed) > 1:
        lines += [f"Over the training seeds {', '.join(map(str, by_seed))} (the main model and the plain UNet "
                  f"trained once per seed, the same test images):", "", seeds_markdown(by_seed)]
        atomic_write(out / "quality_seeds.csv", seeds_csv(by_seed))
    lines += ["(seed): the seed's fast command, `--dpm_solver True --diffusion_steps K`; ddim 1: the one-step x0 "
              "read-out from pure noise; preseg: the plain UNet's masks written by the same pipeline.",
              note_lines(cfg, runs, time.perf_counter() - t0)]
    points = [figures.NfePoint(q.model, f"{q.row.sampler} {q.row.steps}", q.row.nfe, q.row.dice) for q in rows[1:]]
    # (every row of `rows` covers all sampled test images, so its BenchRow Dice is the table's)
    made = [figures.dice_nfe_plot(points, out / "quality.png", baseline=(UNET, unet.dice),
                                  title=f"{cfg.data_name}, {cfg.image_size} px, {cfg.minutes:g} min per model, "
                                        f"{unet.dice_summary['n']} test images, {cfg.num_ensemble} members"
                                        + (f" x {cfg.views} views" if cfg.views > 1 else ""))]
    if cfg.plot_dir:
        made.append(atomic_write(Path(cfg.plot_dir) / f"quality_{cfg.data_name.lower()}.png",
                                 (out / "quality.png").read_bytes()))
    atomic_write(out / "quality.csv", to_csv(rows))
    report = atomic_write(out / "quality.md", "\n".join(lines) + "\n")
    print("\n" + report.read_text() + "written: " + ", ".join(str(p) for p in [report, out / "quality.csv", *made]))
    return report


def seed_config(cfg: QualityConfig, seed: int) -> QualityConfig:
    """The benchmark of another training seed: the main model and the plain UNet only, in <out_dir>/seed<k>/."""
    return replace(cfg, seed=seed, out_dir=str(Path(cfg.out_dir) / f"seed{seed}"), ablations="", extra_seeds="")


def another_seed(ck: QualityConfig, info: distributed.DistInfo):
    """Another seed's trained main model and plain UNet (seed_config) sampled with --samplers: their rows (UNet
    first, deltas to this seed's UNet) and (label, name, run) of the two runs."""
    main, unet = Path(ck.out_dir) / "models" / MAIN, Path(ck.out_dir) / "models" / "unet"
    check_same_split(main, unet)
    return main_rows(ck, main, unet, info.device), [(f"{MAIN} (seed {ck.seed})", MAIN, main),
                                                    (f"{UNET} (seed {ck.seed})", UNET, unet)]


def main_rows(cfg: QualityConfig, main: Path, unet: Path, device: torch.device) -> list[QualityRow]:
    """The plain UNet's row, then the main model's with every sampler of --samplers, each with its paired
    difference to that UNet."""
    rows = sample_rows(cfg, UNET, unet, [RowSpec("preseg", 1)], device, cfg.max_images)
    rows += sample_rows(cfg, MAIN, main, parse_samplers(cfg.samplers, "--samplers"), device, cfg.max_images)
    return [rows[0]] + [paired_delta(q, rows[0].row) for q in rows[1:]]


def note_lines(cfg: QualityConfig, runs: list[tuple[str, str, Path]], seconds: float) -> str:
    """What each model (label, its MAIN/UNET/ablation name, run folder) is and how long it trained."""
    from guided_diffusion.checkpoint import load_checkpoint

    lines = ["", "| model | what | steps | minutes | images seen |", "|---|---|---:|---:|---:|"]
    for label, name, run in runs:
        ckpt = load_checkpoint(run)
        what = {MAIN: f"--preset {cfg.preset} {cfg.diffusion_flags}".strip(),
                UNET: f"train_preseg_network.py {cfg.unet_flags}"}.get(name) or ABLATIONS[name][0]
        batch = ckpt["config"]["train"]["batch_size"]
        lines.append(f"| {label} | {what} | {ckpt['step']} | {ckpt.get('train_seconds', 0) / 60:.1f} | "
                     f"{ckpt['step'] * batch} |")
    lines += ["", f"Dice − UNet: mean per-image difference to the plain UNet on the same images, percentile "
                  f"bootstrap 95% CI (2000 resamples). The whole benchmark took {seconds / 60:.1f} minutes "
                  f"({sys.platform}, torch {torch.__version__}, {torch.get_num_threads()} threads)."]
    return "\n".join(lines)
