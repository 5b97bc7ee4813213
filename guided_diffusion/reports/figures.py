"""Figures made from a run's own output folders: example grids (image, ground truth, masks, uncertainty) and
the speed/quality plot (Dice against seconds per image, the seed's figure in our numbers).

Everything is read back from what the samplers wrote (`<id>.png`, `uncertainty/<id>.png`), so a figure shows
exactly the files that were scored. matplotlib draws with its file-only Agg backend (no display needed).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from guided_diffusion.data import datasets
from guided_diffusion.fileio import atomic_write

CELL_INCHES = 1.35  # side of one image in a grid
MASK_CMAP, UNCERTAINTY_CMAP = "gray", "magma"


@dataclass(frozen=True)
class Column:
    """One column of an example grid: a title and, per image id, the file to show (mask or uncertainty map)."""
    title: str
    folder: Path
    kind: str = "mask"  # "mask": <folder>/<id>.png; "uncertainty": <folder>/uncertainty/<id>.png

    def path(self, image_id: str) -> Path:
        return self.folder / (f"uncertainty/{image_id}.png" if self.kind == "uncertainty" else f"{image_id}.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # file output only; works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Render the figure to PNG in memory and write it atomically (no half-written figure is ever seen)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def _gray(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (was this image sampled?)")
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def example_grid(pairs: list[datasets.Pair], columns: list[Column], path: Path, title: str = "",
                 cell_titles: dict[tuple[str, str], str] | None = None) -> Path:
    """A grid with one row per image: the image, its ground truth, then `columns` (masks, uncertainty maps).

    `cell_titles[(image_id, column title)]` puts a caption (e.g. that image's Dice) under a cell.
    """
    if not pairs:
        raise ValueError("an example grid needs at least one image")
    plt = _pyplot()
    n_cols = 2 + len(columns)
    fig, axes = plt.subplots(len(pairs), n_cols, figsize=(CELL_INCHES * n_cols, CELL_INCHES * len(pairs) + 0.4),
                             squeeze=False)
    heads = ["image", "ground truth"] + [c.title for c in columns]
    for r, pair in enumerate(pairs):
        cells = [(np.asarray(datasets.load_image(pair.image)), None),
                 (datasets.load_mask(pair.mask).astype(np.uint8) * 255, MASK_CMAP)]
        cells += [(_gray(c.path(pair.id)), UNCERTAINTY_CMAP if c.kind == "uncertainty" else MASK_CMAP)
                  for c in columns]
        for k, (arr, cmap) in enumerate(cells):
            ax = axes[r, k]
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heads[k], fontsize=8)
            caption = (cell_titles or {}).get((pair.id, heads[k]))
            if caption:
                ax.set_xlabel(caption, fontsize=7)
        axes[r, 0].set_ylabel(pair.id, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@dataclass(frozen=True)
class SpeedPoint:
    """One sampler setting on the speed/quality plot."""
    sampler: str
    steps: int
    seconds_per_image: float
    dice: float


def speed_quality_plot(points: list[SpeedPoint], path: Path, title: str = "",
                       reference: SpeedPoint | None = None, tolerance: float = 0.01) -> Path:
    """Dice against seconds per image (log scale), one line per sampler through its step counts; the reference
    (DDPM over all T steps) marked, with a dashed line `tolerance` below its Dice."""
    if not points:
        raise ValueError("nothing to plot")
    fig, ax = _dice_lines(points, group=lambda p: p.sampler, x=lambda p: p.seconds_per_image,
                          note=lambda p: str(p.steps))
    if reference is not None:
        ax.axhline(reference.dice - tolerance, color="gray", linestyle="--", linewidth=0.8,
                   label=f"reference Dice − {tolerance:g}")
        ax.plot([reference.seconds_per_image], [reference.dice], marker="*", markersize=12, color="black",
                linestyle="none", label=f"reference: {reference.sampler} {reference.steps}")
    return _finish_log_plot(fig, ax, "seconds per image (log scale)", title, path)


LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "D", "^")


def line_style(k: int) -> dict:
    """The k-th line's colour, line style and marker: tab10's ten colours, then the same with the next dash and
    marker, so 40 lines differ in at least one of them."""
    return dict(color=f"C{k % 10}", linestyle=LINESTYLES[k // 10 % 4], marker=MARKERS[k // 10 % 4])


def _dice_lines(points, group, x, note, annotate_first_only: bool = False):
    """A figure with Dice against x(p), one line per group(p) in first-seen order, each in its own style, each point
    labelled note(p) (only the first group's with annotate_first_only: many lines, the main one drawn thicker);
    points that coincide (the same sampler reached by two commands) share one label, 'a = b'."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.6) if annotate_first_only else (6.4, 4.2))
    for k, name in enumerate(dict.fromkeys(group(p) for p in points)):
        mine = sorted((p for p in points if group(p) == name), key=x)
        main = annotate_first_only and k == 0
        ax.plot([x(p) for p in mine], [p.dice for p in mine], label=name, linewidth=2.6 if main else 1.2,
                zorder=3 if main else 2, **line_style(k))
        if annotate_first_only and not main:
            continue
        notes: dict[tuple[float, float], list[str]] = {}
        for p in mine:
            notes.setdefault((x(p), p.dice), []).append(note(p))
        for (px, dice), said, lift in zip(notes, notes.values(), label_lifts(list(notes))):
            ax.annotate(" = ".join(said), (px, dice), textcoords="offset points", xytext=(4, 3 + lift), fontsize=6)
    return fig, ax


def label_lifts(spots: list[tuple[float, float]], step: float = 7.0) -> list[float]:
    """Vertical offsets (points) of the labels at (x, y) spots: spots within 25% of each other in x are one
    column, stacked in order of y `step` apart and centred on the column, so near-equal Dice values at 10 and 11 NFE
    do not print over each other."""
    lifts = [0.0] * len(spots)
    order = sorted(range(len(spots)), key=lambda i: (spots[i][0], spots[i][1]))
    column: list[int] = []
    for i in order + [None]:
        if i is not None and column and spots[i][0] <= 1.25 * spots[column[0]][0]:
            column.append(i)
            continue
        for rank, j in enumerate(sorted(column, key=lambda j: spots[j][1])):
            lifts[j] = step * (rank - (len(column) - 1) / 2)
        column = [i] if i is not None else []
    return lifts


def _finish_log_plot(fig, ax, xlabel: str, title: str, path: Path, legend_outside: bool = False) -> Path:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Dice")
    ax.grid(True, which="both", alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@dataclass(frozen=True)
class NfePoint:
    """One (model, sampler) row on the Dice-against-NFE plot."""
    model: str
    sampler: str
    nfe: int
    dice: float


def dice_nfe_plot(points: list[NfePoint], path: Path, baseline: tuple[str, float] | None = None,
                  title: str = "") -> Path:
    """Dice against network evaluations per member (log scale), one line per model through its samplers, and a
    plain baseline (a network read out in one pass) as a horizontal line. With several models the first (the main
    one) is drawn thicker and is the only one whose points are labelled; the legend sits beside the axes."""
    if not points:
        raise ValueError("nothing to plot")
    many = len({p.model for p in points}) > 1
    fig, ax = _dice_lines(points, group=lambda p: p.model, x=lambda p: p.nfe, note=lambda p: p.sampler,
                          annotate_first_only=many)
    nfes = [p.nfe for p in points]
    ax.set_xlim(min(nfes) / 1.5, max(nfes) * 4)  # room right of the last points for their labels
    if baseline is not None:
        ax.axhline(baseline[1], color="black", linestyle="--", linewidth=1.4, zorder=4,
                   label=f"{baseline[0]} ({baseline[1]:.3f})")
    return _finish_log_plot(fig, ax, "network evaluations per member (NFE, log scale)", title, path,
                            legend_outside=many)
