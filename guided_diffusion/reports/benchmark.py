"""Speed/quality table of the samplers on one model and one set of images, all measured in one run."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from guided_diffusion.data import datasets
from guided_diffusion.reports import figures
from guided_diffusion.evaluation.scoring import EvalOptions, evaluate
from guided_diffusion.sampling.outputs import MANIFEST
from guided_diffusion.sampling.pipeline import SampleConfig, addpm_levels, run_sampling


@dataclass
class BenchRow:
    """One sampler setting: its cost and the Dice of its fused masks."""
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
    folder: str = ""                   # where its masks and its evaluation (eval/) are


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


def preseg_tag(addpm: dict | None) -> str:
    """A short name of an ADDPM row's pre-segmentation: 'head', or its run folder's name."""
    preseg = (addpm or {}).get("preseg") or "none"
    return preseg if preseg in ("head", "none") else Path(preseg).resolve().name.removesuffix(".pt")


def expand_rows(configs: list[tuple[str, int]], addpm: dict) -> list[tuple[str, int, dict]]:
    """(sampler, steps, ADDPM flags) per row: every addpm-<sampler> config once per --preseg entry
    (comma-separated, e.g. 'runs/x_preseg,head')."""
    presegs = [p.strip() for p in (addpm.get("preseg") or "").split(",") if p.strip()] or [""]
    rows = []
    for name, steps in configs:
        if name.startswith("addpm-"):
            rows += [(name, steps, {**addpm, "preseg": p}) for p in presegs]
        else:
            rows.append((name, steps, {}))
    return rows


def row_config(base: SampleConfig, name: str, steps: int, num_ensemble: int, out: Path,
               addpm: dict | None = None, reuse: bool = False) -> SampleConfig:
    """The sampling settings of one row; `addpm-<sampler>` rows get the ADDPM flags in `addpm`."""
    cfg = replace(base, sampler=name, steps=steps, num_ensemble=num_ensemble, out_dir=str(out), overwrite=not reuse)
    if name.startswith("addpm-"):
        cfg = replace(cfg, sampler="addpm", addpm_inner=name[len("addpm-"):], **(addpm or {}))
    return cfg


def run_one(base: SampleConfig, sampler: str, steps: int, num_ensemble: int, out_root: Path,
            device: torch.device, data: tuple[str, str], addpm: dict | None = None, reuse: bool = False) -> BenchRow:
    """Sample into out_root/<sampler>-<steps>-n<members> and score it against the ground truth. With `reuse`,
    images already in that folder are not resampled: their cost is read back from its manifest."""
    tag = f"-{preseg_tag(addpm)}" if sampler.startswith("addpm-") else ""
    out = out_root / f"{sampler}-{steps}-n{num_ensemble}{tag}"
    summary = run_sampling(row_config(base, sampler, steps, num_ensemble, out, addpm, reuse), {}, device)
    split_file = sampled_split(out, data, base)
    if reuse:
        seconds, nfe, parts = manifest_cost(out, datasets.load_split(split_file)[base.split], summary, num_ensemble)
    else:
        seconds, nfe = summary["seconds"] / max(summary["images"], 1), summary["nfe"]
        parts = "+".join(str(v) for v in summary["nfe_parts"].values())
    result = evaluate(EvalOptions(inp_pth=out, data_name=data[0], data_dir=Path(data[1]), split=base.split,
                                  split_file=split_file, n_boot=200, progress=False,
                                  csv=out / "eval" / "evaluation.csv", json=out / "eval" / "evaluation.json"))
    m = result.summary["metrics"]
    label = summary["sampler"] + (f" ({tag[1:]})" if tag else "")
    return BenchRow(label, summary["steps"], num_ensemble, nfe, seconds, m["dice"]["mean"],
                    m["iou"]["mean"], nfe_parts=parts, folder=str(out))


def manifest_cost(out: Path, ids: list[str], summary: dict, num_ensemble: int) -> tuple[float, int, str]:
    """Mean seconds per image, NFE and its ADDPM parts of `ids` from out/manifest.csv, checked to be this row's
    sampler."""
    with open(out / MANIFEST, newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh) if r["id"] in set(ids)}
    want = {"sampler": summary["sampler"], "steps": str(summary["steps"]), "num_ensemble": str(num_ensemble),
            **{k: str(v) for k, v in summary["addpm"].items()}}
    for r in rows.values():
        found = {k: r.get(k, "") for k in want}
        if found != want:
            raise ValueError(f"--reuse: {out} holds masks sampled with {found}, not {want}; use another --out_dir")
    first = next(iter(rows.values()))
    parts = "+".join(first[k] for k in ("nfe_preseg", "nfe_chain", "nfe_denoiser") if first.get(k))
    return sum(float(r["seconds"]) for r in rows.values()) / len(rows), int(first["nfe"]), parts


def sampled_split(out: Path, data: tuple[str, str], cfg: SampleConfig) -> Path:
    """A split file whose `cfg.split` part holds only the images sampled (--max_images), for scoring."""
    split = datasets.load_split(out / "split.json")
    if cfg.max_images:
        pairs = datasets.list_pairs(data[0], data[1], cfg.split, split_file=out / "split.json")
        split[cfg.split] = [p.id for p in pairs[:cfg.max_images]]
    path = out / "eval" / "split.json"
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


def addpm_note(rows: list[BenchRow], addpm: dict, num_timesteps: int) -> str:
    """One line on the ADDPM rows' settings ('' when there are none)."""
    if not any(r.sampler.startswith("addpm") for r in rows):
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
    w.writerow(list(BenchRow.__dataclass_fields__))
    for r in rows:
        w.writerow([getattr(r, k) for k in BenchRow.__dataclass_fields__])
    return buf.getvalue()


def per_image(row: BenchRow) -> pd.DataFrame:
    """The per-image scores of the images a row sampled, from its evaluation CSV (index: image id)."""
    return pd.read_csv(Path(row.folder) / "eval" / "evaluation.csv", dtype={"id": str}).set_index("id")


def row_title(row: BenchRow) -> str:
    return f"{row.sampler} {row.steps}"


def speed_point(row: BenchRow) -> figures.SpeedPoint:
    return figures.SpeedPoint(row.sampler, row.steps, row.seconds_per_image, row.dice)


def plot(rows: list[BenchRow], data: tuple[str, str], split: str, plot_dir: Path, n_images: int = 4,
         title: str = "") -> list[Path]:
    """quant.png: Dice against seconds per image for every row, the reference marked; qual.png: the first
    `n_images` images with their ground truth, every row's fused mask (captioned with that image's Dice) and the
    uncertainty maps of the reference and of the last row."""
    ref = reference_row(rows)
    quant = figures.speed_quality_plot([speed_point(r) for r in rows], plot_dir / "quant.png", title=title,
                                       reference=speed_point(ref))
    ids = list(per_image(ref).index)[:n_images]
    split_file = Path(ref.folder) / "eval" / "split.json"
    by_id = {p.id: p for p in datasets.list_pairs(data[0], data[1], split, split_file=split_file)}
    columns = [figures.Column(row_title(r), Path(r.folder)) for r in rows]
    columns += [figures.Column(f"uncertainty\n{row_title(r)}", Path(r.folder), "uncertainty")
                for r in ([ref] if rows[-1] is ref else [ref, rows[-1]])]
    captions = {(i, row_title(r)): f"Dice {d:.3f}" for r in rows for i, d in per_image(r)["dice"].items()}
    qual = figures.example_grid([by_id[i] for i in ids], columns, plot_dir / "qual.png", title=title,
                                cell_titles=captions)
    return [quant, qual]
