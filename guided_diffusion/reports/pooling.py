"""Paired Dice differences pooled over benchmark_quality.py runs: several splits, several training seeds each.

A benchmark folder (one --split_seed) holds its seed-0 run at the top and its --extra_seeds runs in seed<k>/; every
run has samples/<model>/<row folder>/eval/evaluation.csv. For two row folders A and B the per-image difference
A − B is taken run by run (the same test images, the same training seed), averaged per test image over the split's
runs, so that each image of a split counts once however many seeds it has, and the images of all splits are pooled
with a percentile-bootstrap 95% CI of the mean. What that CI covers is the choice of test images given these
training runs. A user who trains the recipe again draws a new training run as well, and at 10 CPU minutes the runs
of one split differ by several Dice points, so each difference is also summarised over runs: the mean of the
per-run mean differences with its Student-t 95% interval (mean ± t(0.975, n − 1) s / sqrt(n), s the standard
deviation between runs, ddof 1), and in how many runs it is at or above zero. That interval treats the runs as
independent draws of (training run, test split), which they are across splits and seeds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from guided_diffusion.evaluation.metrics import bootstrap_ci
from guided_diffusion.layout import eval_paths, row_views

MAIN, UNET = "diffusion", "plain_UNet"  # the model folders under samples/ (reports/quality.py's MAIN and UNET)
_ROW = re.compile(r"^(?P<label>.+)-(?P<steps>\d+)-n(?P<members>\d+)(?:-(?P<tag>.+))?$")


@dataclass
class Pooled:
    """One pooled difference: its mean over the pooled test images, CI, counts and each run's own mean."""
    name: str
    mean: float
    low: float
    high: float
    images: int
    runs: int
    per_run: list[float]

    @property
    def over_runs(self) -> tuple[float, float, float]:
        """(mean, low, high) of the per-run means: the Student-t 95% interval over runs (NaN bounds for one run)."""
        return run_interval(self.per_run)

    @property
    def at_or_above(self) -> int:
        """How many runs have a mean difference at or above zero."""
        return sum(v >= 0 for v in self.per_run)


def run_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-run values and its Student-t interval, mean ± t((1 + level) / 2, n − 1) s / sqrt(n)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


def row_title(folder: str, members: bool = False) -> str:
    """'dpm_solver++-10-n5' -> 'dpm_solver++ 10' ('dpm_solver++ 10 × 5' with `members`); a tagged row keeps its tag
    ('dpm_solver++ 10 (seed)'); DDPM over all T steps (steps 0 in the folder name) reads 'ddpm all'."""
    m = _ROW.match(folder)
    if m is None:
        return folder
    steps = "all" if m["steps"] == "0" else m["steps"]
    return (f"{m['label']} {steps}" + (f" × {m['members']}" if members else "")
            + (f" ({m['tag']})" if m["tag"] else ""))


def _members(folder: str) -> str | None:
    m = _ROW.match(folder)
    return m["members"] if m else None


def _views(folder: str) -> int:
    m = _ROW.match(folder)
    return row_views(m["tag"] if m else None)


def _one_view(folder: str) -> str:
    """The row folder of the same sampler without --views ('dpm_solver++-10-n5-seed+views4' -> '...-n5-seed')."""
    m = _ROW.match(folder)
    if m is None or m["tag"] is None:
        return folder
    tag = "+".join(t for t in m["tag"].split("+") if row_views(t) == 1)
    return folder[:m.start("tag") - 1] + (f"-{tag}" if tag else "")


def benchmark_runs(folder: Path) -> list[Path]:
    """The runs of one benchmark folder: the folder itself (seed 0), then seed<k>/ in order of k."""
    folder = Path(folder)
    if not (folder / "samples").is_dir():
        raise FileNotFoundError(f"{folder} is not a benchmark_quality.py folder (it has no samples/)")
    extra = [p for p in folder.glob("seed*") if p.is_dir() and p.name[4:].isdigit() and (p / "samples").is_dir()]
    return [folder] + sorted(extra, key=lambda p: int(p.name[4:]))


def run_dice(run: Path, row: str) -> pd.Series | None:
    """Per-image Dice of one row folder (model/row) of one run, or None where it was not sampled."""
    path = eval_paths(run / "samples" / row)["csv"]
    if not path.is_file():
        return None
    return pd.read_csv(path, index_col="id")["dice"].astype(float)


def pooled(name: str, splits: list[list[pd.Series]], n_boot: int = 2000) -> Pooled | None:
    """The pooled difference of per-run per-image differences grouped by split (None when no run has both)."""
    runs = [d for split in splits for d in split]
    if not runs:
        return None
    per_image = np.concatenate([pd.concat(split, axis=1).mean(axis=1).to_numpy() for split in splits if split])
    per_image = per_image[np.isfinite(per_image)]
    low, high = bootstrap_ci(per_image, n_boot=n_boot, seed=0)
    return Pooled(name, float(per_image.mean()), low, high, per_image.size, len(runs),
                  [float(d.mean()) for d in runs])


def _difference(a: pd.Series | None, b: pd.Series | None) -> pd.Series | None:
    """a − b on the test images both scored (DDPM rows cover only the first --ddpm_images)."""
    if a is None or b is None:
        return None
    ids = a.index.intersection(b.index)
    if ids.empty:
        raise ValueError("two rows of one run scored no common test image")
    return a.loc[ids] - b.loc[ids]


def _rows(run: Path, model: str) -> list[str]:
    """The row folders of `model` in a run that were scored, in name order."""
    root = run / "samples" / model
    return sorted(p.name for p in root.iterdir() if eval_paths(p)["csv"].is_file()) if root.is_dir() else []


def compare(folders: list[Path], against: list[Path] | None = None, n_boot: int = 2000) -> list[Pooled]:
    """Every diffusion row − the plain UNet sampled with the same --views (the one-view UNet where there is none);
    where rows of several views were sampled, each such row (the UNet's too) − the one-view UNet, and each diffusion
    row of several views − its sampler's one-view row; the 10-step solver − the 1-step read-out and − DDPM over all
    steps where sampled; and with `against` (one folder per folder, the same splits and seeds) every diffusion row −
    the other benchmark's same row, run by run."""
    runs = [benchmark_runs(f) for f in folders]
    if against is not None and len(against) != len(folders):
        raise ValueError(f"--against needs one folder per benchmark folder ({len(folders)}), got {len(against)}")
    rows = sorted({r for split in runs for run in split for r in _rows(run, MAIN)})
    unet = sorted({r for split in runs for run in split for r in _rows(run, UNET)})
    if not rows or not unet:
        raise FileNotFoundError(f"no scored rows of both the diffusion model and the plain UNet under "
                                f"{folders[0]}/samples (run benchmark_quality.py to the end first)")
    # rows sampled with several ensemble sizes: the titles say how many members, so no two rows share one
    many = len({_members(r) for r in rows}) > 1
    title = partial(row_title, members=many)
    unet_of: dict[int, str] = {}  # the UNet's row of each --views
    for u in unet:
        unet_of.setdefault(_views(u), u)
    base = unet_of.get(1, unet[0])
    pairs = []
    for r in rows:
        u = unet_of.get(_views(r), base)
        pairs.append((f"{title(r)} − UNet" + (f" with {_views(u)} views" if u != base else ""),
                      f"{MAIN}/{r}", f"{UNET}/{u}"))
    pairs += [(f"UNet with {_views(u)} views − UNet", f"{UNET}/{u}", f"{UNET}/{base}") for u in unet if u != base]
    pairs += [(f"{title(r)} − the one-view UNet", f"{MAIN}/{r}", f"{UNET}/{base}")
              for r in rows if unet_of.get(_views(r), base) != base]
    pairs += [(f"{title(r)} − {title(one)}", f"{MAIN}/{r}", f"{MAIN}/{one}")
              for r in rows if (one := _one_view(r)) != r and one in rows]
    one_step = next((r for r in rows if r.startswith("ddim-1-")), None)
    size = _members(one_step) if one_step else None  # the solver compared at the read-out's ensemble size
    solver = next((r for r in rows if r.startswith("dpm_solver++-10-") and _ROW.match(r)["tag"] is None
                   and size in (None, _members(r))), None)
    ddpm = next((r for r in rows if r.startswith("ddpm-0-") and _members(r) == _members(solver or "")), None)
    for other in (one_step, ddpm):
        if solver and other:
            pairs.append((f"{title(solver)} − {title(other)}", f"{MAIN}/{solver}", f"{MAIN}/{other}"))
    out = []
    for name, a, b in pairs:
        out.append(pooled(name, [[d for run in split if (d := _difference(run_dice(run, a), run_dice(run, b)))
                                  is not None] for split in runs], n_boot))
    if against is not None:
        for r in rows:
            splits = []
            for folder, other, split in zip(folders, against, runs):
                mine = [(run, Path(other) / run.relative_to(folder)) for run in split]
                splits.append([d for run, twin in mine
                               if (d := _difference(run_dice(run, f"{MAIN}/{r}"), run_dice(twin, f"{MAIN}/{r}")))
                               is not None])
            out.append(pooled(f"{title(r)} − the other benchmark's", splits, n_boot))
    return [p for p in out if p is not None]


def _interval(mean: float, low: float, high: float) -> str:
    return f"{mean:+.3f}" + (f" [{low:+.3f}, {high:+.3f}]" if np.isfinite(low) else "")


def to_markdown(results: list[Pooled]) -> str:
    lines = ["| difference | pooled mean [bootstrap 95% CI over images] | test images | runs | "
             "mean over runs [t 95% CI over runs] | runs at or above 0 | per run |",
             "|---|---|---:|---:|---|---:|---|"]
    lines += [f"| {p.name} | {_interval(p.mean, p.low, p.high)} | {p.images} | {p.runs} | "
              f"{_interval(*p.over_runs)} | {p.at_or_above} of {p.runs} | "
              + " / ".join(f"{v:+.3f}" for v in p.per_run) + " |" for p in results]
    return "\n".join(lines) + "\n"
