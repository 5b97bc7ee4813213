"""Speed/quality table of the samplers on one model and one set of images, all measured in one run.

Each row samples into its own prediction folder (layout.row_folder) through the sampling pipeline and is scored
in memory (evaluation.scoring.evaluate, whose reports also go to the row's eval/ folder); the rows carry their
SamplingSummary and EvalResult, so the tables, figures and the quickstart's report read no files back.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from guided_diffusion.data import datasets
from guided_diffusion.evaluation.scoring import EvalOptions, EvalResult, evaluate
from guided_diffusion.layout import MANIFEST, SAMPLING_SETTINGS, eval_paths, row_folder
from guided_diffusion.reports import figures
from guided_diffusion.sampling import outputs
from guided_diffusion.sampling.addpm import ADDPM, chain_of
from guided_diffusion.sampling.pipeline import SampleConfig, SamplingSummary, addpm_levels, run_sampling

TABLE_FIELDS = ("sampler", "steps", "num_ensemble", "nfe", "seconds_per_image", "dice", "iou", "dice_delta",
                "speedup", "nfe_parts", "folder")


@dataclass
class BenchRow:
    """One sampler setting: its cost and the Dice of its fused masks, with the evaluation behind them."""
    sampler: str
    steps: int
    num_ensemble: int
    nfe: int
    seconds_per_image: float
    dice: float
    iou: float
    dice_delta: float = float("nan")   # Dice minus the reference's (DDPM over all T steps)
    speedup: float = float("nan")      # reference seconds per image / this one's
    nfe_parts: str = ""                # ADDPM: pre-segmentation + chain + denoiser
    folder: str = ""                   # where its masks and its evaluation reports (eval/) are
    evaluation: EvalResult | None = field(default=None, repr=False)

    @property
    def per_image(self) -> pd.DataFrame:
        """The per-image scores of the images the row sampled (index: image id)."""
        return self.evaluation.per_image.set_index("id")

    @property
    def dice_summary(self) -> dict:
        """Mean, bootstrap 95% CI and count of the row's Dice."""
        return self.evaluation.summary["metrics"]["dice"]


@dataclass(frozen=True)
class RowSpec:
    """What one row samples: its label (the sampler's manifest label, `addpm-<chain>` for ADDPM), its steps, the
    segmentation_sample.py flags that make it (SampleConfig fields, and the seed's model flags such as
    --diffusion_steps beside --dpm_solver True), and a tag that tells rows of one label apart."""
    label: str
    steps: int
    sample_flags: dict = field(default_factory=dict)
    model_flags: dict = field(default_factory=dict)
    tag: str = ""

    @staticmethod
    def sampler(name: str, steps: int, addpm: dict | None = None) -> "RowSpec":
        """The row of `--configs` entry name:steps; ADDPM labels take the ADDPM flags in `addpm`."""
        chain = chain_of(name)
        if chain is None:
            return RowSpec(name, steps, {"sampler": name, "steps": steps})
        addpm = dict(addpm or {})
        preseg = addpm.get("preseg") or "none"
        tag = preseg if preseg in ("head", "none") else Path(preseg).resolve().name.removesuffix(".pt")
        return RowSpec(name, steps, {"sampler": ADDPM, "addpm_inner": chain, "steps": steps, **addpm}, tag=tag)

    @property
    def addpm(self) -> dict:
        """The ADDPM flags of an ADDPM row (empty otherwise)."""
        if self.sample_flags.get("sampler") != ADDPM:
            return {}
        return {k: v for k, v in self.sample_flags.items() if k in ("pre_t", "stop_t", "preseg", "denoiser_path")}

    def clipped(self, num_timesteps: int) -> "RowSpec":
        """The row with its steps clipped to the model's T (ddpm:1000 on a 40-step model is DDPM over all 40)."""
        if self.steps <= num_timesteps:
            return self
        return replace(self, steps=num_timesteps, sample_flags={**self.sample_flags, "steps": num_timesteps})

    def config(self, base: SampleConfig, num_ensemble: int, out: Path, reuse: bool) -> SampleConfig:
        """The sampling settings of the row."""
        return replace(base, num_ensemble=num_ensemble, out_dir=str(out), overwrite=not reuse, **self.sample_flags)


def parse_configs(spec: str, flag: str = "--configs") -> list[tuple[str, int]]:
    """'ddpm:1000,dpm_solver++:20,addpm-ddpm:0' -> [('ddpm', 1000), ('dpm_solver++', 20), ('addpm-ddpm', 0)].

    addpm-<sampler> is ADDPM with that sampler over its truncated chain (steps 0: the default, every DDPM step
    from pre_t down to stop_t)."""
    out = []
    for item in spec.split(","):
        name, _, steps = item.strip().partition(":")
        if not name or not steps.isdigit():
            raise ValueError(f"{flag} entries are sampler:steps, got {item!r}")
        out.append((name, int(steps)))
    return out


def expand_rows(configs: list[tuple[str, int]], addpm: dict) -> list[RowSpec]:
    """The rows of the configs: every ADDPM config once per --preseg entry (comma-separated, e.g.
    'runs/x_preseg,head')."""
    presegs = [p.strip() for p in (addpm.get("preseg") or "").split(",") if p.strip()] or [""]
    rows = []
    for name, steps in configs:
        if chain_of(name):
            rows += [RowSpec.sampler(name, steps, {**addpm, "preseg": p}) for p in presegs]
        else:
            rows.append(RowSpec.sampler(name, steps))
    return rows


def run_one(base: SampleConfig, row: RowSpec, num_ensemble: int, out_root: Path, device: torch.device,
            data: tuple[str, str], reuse: bool = False) -> BenchRow:
    """Sample into the row's folder under out_root and score it against the ground truth. With `reuse`, images
    already in that folder are not resampled: their cost is read back from its manifest."""
    out = row_folder(out_root, row.label, row.steps, num_ensemble, row.tag)
    if reuse and outputs.top_level_images(out) and outputs.read_settings(out) is None:
        # The benchmark owns its row folders: masks with no record of how they were made cannot be reused.
        print(f"{out}: masks without {SAMPLING_SETTINGS} (an older run's); sampling them again", flush=True)
        reuse = False
    summary = run_sampling(row.config(base, num_ensemble, out, reuse), row.model_flags, device)
    paths = eval_paths(out)
    scored = sampled_split(out, data, base, paths["split"])
    if reuse:
        seconds, nfe, parts = manifest_cost(out, datasets.load_split(scored)[base.split], summary)
    else:
        seconds, nfe = summary.seconds_per_image, summary.nfe
        parts = "+".join(str(v) for v in summary.nfe_parts.values())
    result = evaluate(EvalOptions(inp_pth=out, data_name=data[0], data_dir=Path(data[1]), split=base.split,
                                  split_file=scored, n_boot=200, progress=False, csv=paths["csv"], json=paths["json"]))
    m = result.summary["metrics"]
    label = row.label + (f" ({row.tag})" if row.tag else "")
    return BenchRow(label, summary.steps, num_ensemble, nfe, seconds, m["dice"]["mean"], m["iou"]["mean"],
                    nfe_parts=parts, folder=str(out), evaluation=result)


def run_rows(base: SampleConfig, rows: list[RowSpec], num_ensemble: int, out_root: Path, device: torch.device,
             data: tuple[str, str], num_timesteps: int, reuse: bool = False) -> list[BenchRow]:
    """Every row in turn (DDPM steps above the model's T clipped to T), compared with the reference row."""
    done = []
    for row in rows:
        row = row.clipped(num_timesteps)
        print(f"== {row.label} {row.steps} steps, {num_ensemble} members {row.addpm.get('preseg', '')}", flush=True)
        done.append(run_one(base, row, num_ensemble, out_root, device, data, reuse))
    return compare(done)


def ensemble_cost(base: SampleConfig, row: RowSpec, rows: list[BenchRow], num_ensemble: int, out_root: Path,
                  device: torch.device, data: tuple[str, str], reuse: bool = False) -> str:
    """One line: seconds per image of `row` with one member against `num_ensemble` members in one batch."""
    one = run_one(base, row, 1, out_root, device, data, reuse)
    many = next((r for r in rows if (r.sampler, r.steps) == (row.label, row.steps) and r.num_ensemble == num_ensemble),
                None) or run_one(base, row, num_ensemble, out_root, device, data, reuse)
    ratio = many.seconds_per_image / max(one.seconds_per_image, 1e-12)
    return (f"ensemble cost ({row.label} {row.steps} steps): 1 member {one.seconds_per_image:.3f} s/image, "
            f"{num_ensemble} members batched {many.seconds_per_image:.3f} s/image = {ratio:.2f}x one member "
            f"(Dice {one.dice:.4f} -> {many.dice:.4f})")


def manifest_cost(out: Path, ids: list[str], summary: SamplingSummary) -> tuple[float, int, str]:
    """Mean seconds per image, NFE and its ADDPM parts of `ids` from out/manifest.csv, checked to be this row's
    sampler."""
    with open(out / MANIFEST, newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh) if r["id"] in set(ids)}
    want = {"sampler": summary.sampler, "steps": str(summary.steps), "num_ensemble": str(summary.num_ensemble),
            **{k: str(v) for k, v in summary.settings.items()}}
    for r in rows.values():
        found = {k: r.get(k, "") for k in want}
        if found != want:
            raise ValueError(f"--reuse: {out} holds masks sampled with {found}, not {want}; use another --out_dir")
    first = next(iter(rows.values()))
    parts = "+".join(first[k] for k in ("nfe_preseg", "nfe_chain", "nfe_denoiser") if first.get(k))
    return sum(float(r["seconds"]) for r in rows.values()) / len(rows), int(first["nfe"]), parts


def sampled_split(out: Path, data: tuple[str, str], cfg: SampleConfig, path: Path) -> Path:
    """A split file at `path` whose `cfg.split` part holds only the images sampled (--max_images), for scoring."""
    split = datasets.load_split(out / "split.json")
    if cfg.max_images:
        pairs = datasets.list_pairs(data[0], data[1], cfg.split, split_file=out / "split.json")
        split[cfg.split] = [p.id for p in pairs[:cfg.max_images]]
    datasets.save_split(split, path)
    return path


def reference_row(rows: list[BenchRow]) -> BenchRow:
    """The row the others are compared with: the DDPM row with most steps (else the first row)."""
    ddpm = [r for r in rows if r.sampler == "ddpm"]
    return max(ddpm, key=lambda r: r.steps) if ddpm else rows[0]


def compare(rows: list[BenchRow]) -> list[BenchRow]:
    """Fill Dice difference and speed-up against the reference row (the DDPM row with most steps)."""
    ref = reference_row(rows)
    for r in rows:
        r.dice_delta = r.dice - ref.dice
        r.speedup = ref.seconds_per_image / max(r.seconds_per_image, 1e-12)
    return rows


def on_images(rows: list[BenchRow], ids: list[str]) -> list[BenchRow]:
    """Every row re-scored on the given images only, with Dice difference and speed-up against the reference."""
    def restricted(r: BenchRow) -> BenchRow:
        table = r.per_image.loc[ids]
        return replace(r, dice=float(table["dice"].mean()), iou=float(table["iou"].mean()))

    return compare([restricted(r) for r in rows])


def addpm_note(rows: list[RowSpec], addpm: dict, num_timesteps: int) -> str:
    """One line on the ADDPM rows' settings ('' when there are none)."""
    if not any(r.addpm for r in rows):
        return ""
    pre_t, stop_t = addpm_levels(replace(SampleConfig(), **addpm), num_timesteps)
    return (f"ADDPM rows: chain from x_{pre_t} to x_{stop_t} (--pre_t {pre_t} --stop_t {stop_t}), pre-segmentation "
            f"in brackets ({addpm.get('preseg') or 'none'}), denoiser {addpm.get('denoiser_path') or 'none'}; "
            f"NFE = pre-segmentation + chain + denoiser (the head costs 0: it comes with the encoder pass)")


def to_markdown(rows: list[BenchRow]) -> str:
    head = "| sampler | steps | members | NFE | s / image | Dice | IoU | Dice − DDPM ref | speed-up |\n" \
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    body = "".join(f"| {r.sampler} | {r.steps} | {r.num_ensemble} | {r.nfe}"
                   f"{f' = {r.nfe_parts}' if r.nfe_parts else ''} | {r.seconds_per_image:.3f} | "
                   f"{r.dice:.4f} | {r.iou:.4f} | {r.dice_delta:+.4f} | {r.speedup:.1f}x |\n" for r in rows)
    return head + body


def to_csv(rows: list[BenchRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TABLE_FIELDS)
    for r in rows:
        w.writerow([getattr(r, k) for k in TABLE_FIELDS])
    return buf.getvalue()


def row_title(row: BenchRow) -> str:
    return f"{row.sampler} {row.steps}"


def speed_point(row: BenchRow) -> figures.SpeedPoint:
    return figures.SpeedPoint(row.sampler, row.steps, row.seconds_per_image, row.dice)


def pairs_of(row: BenchRow, data: tuple[str, str], split: str, ids: list[str]) -> list[datasets.Pair]:
    """The data set's pairs of the given image ids, from the split the row was scored on."""
    by_id = {p.id: p for p in datasets.list_pairs(data[0], data[1], split, split_file=eval_paths(row.folder)["split"])}
    return [by_id[i] for i in ids]


def plot(rows: list[BenchRow], data: tuple[str, str], split: str, plot_dir: Path, n_images: int = 4,
         title: str = "") -> list[Path]:
    """quant.png: Dice against seconds per image for every row, the reference marked; qual.png: the first
    `n_images` images with their ground truth, every row's fused mask (captioned with that image's Dice) and the
    uncertainty maps of the reference and of the last row."""
    ref = reference_row(rows)
    quant = figures.speed_quality_plot([speed_point(r) for r in rows], plot_dir / "quant.png", title=title,
                                       reference=speed_point(ref))
    pairs = pairs_of(ref, data, split, list(ref.per_image.index)[:n_images])
    columns = [figures.Column(row_title(r), Path(r.folder)) for r in rows]
    columns += [figures.Column(f"uncertainty\n{row_title(r)}", Path(r.folder), "uncertainty")
                for r in ([ref] if rows[-1] is ref else [ref, rows[-1]])]
    captions = {(i, row_title(r)): f"Dice {d:.3f}" for r in rows for i, d in r.per_image["dice"].items()}
    qual = figures.example_grid(pairs, columns, plot_dir / "qual.png", title=title,
                                cell_titles=captions)
    return [quant, qual]
