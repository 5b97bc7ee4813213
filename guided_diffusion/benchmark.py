"""Speed/quality table of the samplers on one model and one set of images, all measured in one run."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import datasets
from .evaluation import EvalOptions, evaluate
from .predict import SampleConfig, run_sampling


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


def parse_configs(spec: str) -> list[tuple[str, int]]:
    """'ddpm:1000,dpm_solver++:20' -> [('ddpm', 1000), ('dpm_solver++', 20)]."""
    out = []
    for item in spec.split(","):
        name, _, steps = item.strip().partition(":")
        if not name or not steps.isdigit():
            raise ValueError(f"--configs entries are sampler:steps, got {item!r}")
        out.append((name, int(steps)))
    return out


def run_one(base: SampleConfig, sampler: str, steps: int, num_ensemble: int, out_root: Path,
            device: torch.device, data: tuple[str, str]) -> BenchRow:
    """Sample into out_root/<sampler>-<steps>-n<members> and score it against the ground truth."""
    out = out_root / f"{sampler}-{steps}-n{num_ensemble}"
    cfg = replace(base, sampler=sampler, steps=steps, num_ensemble=num_ensemble, out_dir=str(out), overwrite=True)
    summary = run_sampling(cfg, {}, device)
    n = max(summary["images"], 1)
    result = evaluate(EvalOptions(inp_pth=out, data_name=data[0], data_dir=Path(data[1]), split=base.split,
                                  split_file=sampled_split(out, data, base), n_boot=200, progress=False,
                                  csv=out / "eval" / "evaluation.csv", json=out / "eval" / "evaluation.json"))
    m = result.summary["metrics"]
    return BenchRow(sampler, steps, num_ensemble, summary["nfe"], summary["seconds"] / n,
                    m["dice"]["mean"], m["iou"]["mean"])


def sampled_split(out: Path, data: tuple[str, str], cfg: SampleConfig) -> Path:
    """A split file whose `cfg.split` part holds only the images sampled (--max_images), for scoring."""
    split = datasets.load_split(out / "split.json")
    if cfg.max_images:
        pairs = datasets.list_pairs(data[0], data[1], cfg.split, split_file=out / "split.json")
        split[cfg.split] = [p.id for p in pairs[:cfg.max_images]]
    path = out / "eval" / "split.json"
    datasets.save_split(split, path)
    return path


def compare(rows: list[BenchRow]) -> list[BenchRow]:
    """Fill Dice difference and speed-up against the reference row (the DDPM row with most steps)."""
    ddpm = [r for r in rows if r.sampler == "ddpm"]
    ref = max(ddpm, key=lambda r: r.steps) if ddpm else rows[0]
    for r in rows:
        r.dice_delta = r.dice - ref.dice
        r.speedup = ref.seconds_per_image / max(r.seconds_per_image, 1e-12)
    return rows


def to_markdown(rows: list[BenchRow]) -> str:
    head = "| sampler | steps | members | NFE | s / image | Dice | IoU | Dice − DDPM ref | speed-up |\n" \
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    body = "".join(f"| {r.sampler} | {r.steps} | {r.num_ensemble} | {r.nfe} | {r.seconds_per_image:.3f} | "
                   f"{r.dice:.4f} | {r.iou:.4f} | {r.dice_delta:+.4f} | {r.speedup:.1f}x |\n" for r in rows)
    return head + body


def to_csv(rows: list[BenchRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(BenchRow.__dataclass_fields__))
    for r in rows:
        w.writerow([getattr(r, k) for k in BenchRow.__dataclass_fields__])
    return buf.getvalue()
