"""Evaluate a folder of predicted masks against ground truth: pairing by id, loading, scoring, reports.

Reads image files only (no model code). Ground truth comes either from a folder (``--out_pth``) or
from a data set's own layout and split through :mod:`guided_diffusion.data.datasets`. The only files ever
written are the two reports (default ``<inp_pth>/evaluation.csv`` and ``evaluation.json``; their names
carry no image id, so the ISIC scorer still accepts the folder):

- CSV, one row per ground truth: id, the metrics of ``metrics.METRIC_NAMES``, ece, unc_error_dice
  (NaN where undefined or no map), height, width, gt_pixels, pred_pixels, resized, missing,
  prediction, ground_truth (paths).
- JSON: inp_pth, ground_truth, n_images, settings, counts (missing/ignored predictions, resized,
  empty ground truths, undefined surface distances), metrics (per metric: mean, std, median,
  ci95_low, ci95_high, n, n_nan; NaN as null), notes.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from guided_diffusion.evaluation import metrics
from guided_diffusion.data.datasets import IMAGE_EXTS, DataError, image_files, list_pairs, load_mask
from guided_diffusion.fileio import atomic_write
from guided_diffusion.layout import EVAL_CSV, EVAL_JSON
from guided_diffusion.progress import progress

ISIC_ID = re.compile(r"ISIC_\d{7}")
MASK_SUFFIX = re.compile(r"_(segmentation|mask)$", re.IGNORECASE)
SPLIT_DATA_SETS = ("KVASIR", "FOLDER", "SYNTHETIC", "BRATS", "NIFTI")  # data sets whose test split is drawn, not given
DEFAULT_CSV, DEFAULT_JSON = EVAL_CSV, EVAL_JSON  # no image id in these names: the ISIC scorer matches ids in names
PROB_DIR, UNC_DIR = "prob", "uncertainty"
PROGRESS_MIN_IMAGES = 20
EXTRA_METRICS = ("ece", "unc_error_dice")
SHOWN_IDS = 10
# A ground truth that is a photo, not a mask: many grey levels, and many pixels neither dark nor bright (masks, even
# JPEG ones with compression noise, have a few percent at most, on their edges; the photos of ISIC and Kvasir-SEG
# 16% and more, taking each pixel's brightest channel so that red or blue masks count as masks).
MIDTONE_RANGE = (16, 239)
PHOTO_MIDTONES = 0.10
PHOTO_LEVELS = 32


class EvaluationError(ValueError):
    """A pairing or input problem, reported to the user as one line."""


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how; mirrors the flags of scripts/segmentation_env.py."""

    inp_pth: Path
    out_pth: Path | None = None
    data_name: str | None = None
    data_dir: Path | None = None
    split: str = "test"
    split_file: Path | None = None
    split_seed: int = 0
    threshold: int = 128
    strict: bool = False
    allow_missing: bool = False
    unc_threshold: float = 0.5  # maps are 2*std or entropy in bits, both 1 at full disagreement
    n_boot: int = 1000
    seed: int = 0
    csv: Path | None = None
    json: Path | None = None
    progress: bool = True
    labels: str | None = None  # BRATS/NIFTI: foreground labels (default: the sampler's, from sampling.json; else > 0)


@dataclass(frozen=True)
class Item:
    """One ground truth with its prediction (None when missing) and optional probability/uncertainty maps."""

    id: str
    gt: Path
    pred: Path | None
    prob: Path | None = None
    unc: Path | None = None


@dataclass
class Pairing:
    """The paired items, and what pairing left aside."""

    items: list[Item]
    ignored: list[str] = field(default_factory=list)  # prediction files with no ground truth
    notes: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    """Per-image table, JSON-ready summary, notes for the user, and where the reports went."""

    per_image: pd.DataFrame
    summary: dict
    notes: list[str]
    csv: Path
    json: Path


# ---------------------------------------------------------------- ids and files


def file_id(name: str, isic: bool) -> str | None:
    """Pairing id of a file name: its ISIC_<7 digits> when isic, else the stem less a mask suffix."""
    if isic:
        m = ISIC_ID.search(name)
        return m.group(0) if m else None
    return MASK_SUFFIX.sub("", Path(name).stem)


def _id_list(ids: list[str]) -> str:
    """The first few ids, comma-separated, with a count of the rest."""
    ids = sorted(ids)
    head = ", ".join(ids[:SHOWN_IDS])
    return head + (f" (+{len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else "")


def _require_dir(path: Path, flag: str) -> Path:
    """The folder, or EvaluationError naming the flag when it does not exist."""
    if not Path(path).is_dir():
        raise EvaluationError(f"{flag}: folder not found: {path}")
    return Path(path)


# ---------------------------------------------------------------- ground truth


def ground_truth_from_folder(gt_dir: Path) -> tuple[dict[str, Path], bool, list[str]]:
    """Ground-truth masks of a folder by id, whether ISIC ids are used, and notes.

    A file whose stem is the id of a mask named with a mask suffix is that mask's image (the ISIC 2016
    layout keeps ISIC_x.jpg beside ISIC_x_Segmentation.png) and is skipped.
    """
    files = image_files(_require_dir(gt_dir, "--out_pth"))
    if not files:
        raise EvaluationError(f"--out_pth: no ground-truth masks ({'/'.join(sorted(IMAGE_EXTS))}) in {gt_dir}")
    notes = []
    masked = {MASK_SUFFIX.sub("", p.stem) for p in files if MASK_SUFFIX.search(p.stem)}
    images = [p for p in files if not MASK_SUFFIX.search(p.stem) and p.stem in masked]
    if images:
        notes.append(f"{len(images)} images beside their masks in {gt_dir} skipped (not ground truth)")
        files = [p for p in files if p not in images]
    isic = all(ISIC_ID.search(p.name) for p in files)
    return _unique_ids([(file_id(p.name, isic), p) for p in files], "ground truths"), isic, notes


def ground_truth_from_dataset(opts: EvalOptions) -> tuple[dict[str, Path], bool, list[str]]:
    """Ground-truth masks by id from the data set's own layout and split (the training loader's code)."""
    if opts.data_dir is None:
        raise EvaluationError("--data_dir is required with --data_name")
    _require_dir(opts.data_dir, "--data_dir")
    if opts.data_name.upper() == "SYNTHETIC" and not (Path(opts.data_dir) / "meta.json").is_file():
        # the loader would generate the set here; evaluation only reads
        raise EvaluationError(f"--data_dir: no generated synthetic set (meta.json) in {opts.data_dir}")
    split_file, notes = resolve_split_file(opts)
    pairs = list_pairs(opts.data_name, opts.data_dir, split=opts.split, split_file=split_file, seed=opts.split_seed)
    if not pairs:
        raise EvaluationError(f"--data_dir: no {opts.data_name} pairs in split '{opts.split}' of {opts.data_dir}")
    isic = all(ISIC_ID.fullmatch(p.id) for p in pairs)
    return _unique_ids([(p.id, p.mask) for p in pairs], "ground truths"), isic, notes


def resolve_split_file(opts: EvalOptions) -> tuple[Path | None, list[str]]:
    """The split to score: --split_file, else the sampler's <inp_pth>/split.json, else the seeded default."""
    if opts.split_file is not None:
        return Path(opts.split_file), []
    if opts.data_name is None or opts.data_name.upper() not in SPLIT_DATA_SETS or opts.split == "all":
        return None, []
    saved = Path(opts.inp_pth) / "split.json"
    if saved.is_file():
        return saved, [f"split from {saved}"]
    return None, [
        f"warning: no --split_file and no split.json in {opts.inp_pth}: using the default split "
        f"(seed {opts.split_seed}); it matches training only if training used that same default"
    ]


def _unique_ids(entries: list[tuple[str | None, Path]], what: str) -> dict[str, Path]:
    """Map id -> path; EvaluationError listing the ids claimed by more than one file."""
    by_id: dict[str, list[Path]] = {}
    for key, path in entries:
        if key is not None:
            by_id.setdefault(key, []).append(path)
    dup = {k: v for k, v in by_id.items() if len(v) > 1}
    if dup:
        shown = "; ".join(f"{k}: {', '.join(p.name for p in dup[k])}" for k in sorted(dup)[:SHOWN_IDS])
        raise EvaluationError(f"several {what} for one id ({len(dup)} ids): {shown}")
    return {k: v[0] for k, v in by_id.items()}


# ---------------------------------------------------------------- pairing


def pair_predictions(pred_dir: Path, gt: dict[str, Path], isic: bool, allow_missing: bool) -> Pairing:
    """Pair every ground truth with the one prediction of its id; errors for duplicates, gaps, or nothing to pair."""
    pred_dir = _require_dir(pred_dir, "--inp_pth")
    files = image_files(pred_dir)
    if not files:
        raise EvaluationError(f"--inp_pth: no prediction masks ({'/'.join(sorted(IMAGE_EXTS))}) in {pred_dir}")
    ids = [(file_id(p.name, isic), p) for p in files]
    preds = _unique_ids([(k, p) for k, p in ids if k in gt], "predictions")
    ignored = sorted(p.name for k, p in ids if k not in gt)
    if not preds:
        raise EvaluationError(
            f"nothing to pair: no prediction in {pred_dir} has a ground-truth id "
            f"(predictions: {_id_list([k or p.name for k, p in ids])}; ground truth: {_id_list(list(gt))})"
        )
    same = sorted(k for k, p in preds.items() if _same_folder(p, gt[k]))
    if same:
        raise EvaluationError(f"--inp_pth {pred_dir} holds the ground truth itself ({gt[same[0]]} is its own "
                              "prediction): give the folder of predicted masks")
    notes = unpaired_notes(gt, preds, ignored, pred_dir, allow_missing)
    items = [_item(pred_dir, k, gt[k], preds.get(k)) for k in sorted(gt)]
    return Pairing(items=items, ignored=ignored, notes=notes)


def _item(pred_dir: Path, key: str, gt: Path, pred: Path | None) -> Item:
    """An Item with the sampler's prob/ and uncertainty/ maps when they exist."""
    prob, unc = pred_dir / PROB_DIR / f"{key}.png", pred_dir / UNC_DIR / f"{key}.png"
    has = pred is not None
    return Item(key, gt, pred, prob if has and prob.is_file() else None, unc if has and unc.is_file() else None)


def pair(opts: EvalOptions) -> Pairing:
    """Pairing for the options: a ground-truth folder, or a data set's split."""
    if (opts.out_pth is None) == (opts.data_name is None):
        raise EvaluationError("give the ground truth as either --out_pth GT_DIR or --data_name NAME --data_dir DIR")
    if opts.data_dir is not None and opts.data_name is None:
        raise EvaluationError("--data_dir needs --data_name")
    check_not_self(opts)
    if opts.out_pth is not None:
        gt, isic, notes = ground_truth_from_folder(opts.out_pth)
    else:
        gt, isic, notes = ground_truth_from_dataset(opts)
    pairing = pair_predictions(opts.inp_pth, gt, isic, opts.allow_missing)
    pairing.notes[:0] = notes
    return pairing


def unpaired_notes(gt: dict, preds: dict, ignored: list, pred_dir: Path, allow_missing: bool) -> list[str]:
    """Ground truths without a prediction (an error unless --allow_missing) and predictions without a ground truth,
    as notes (images or volumes alike)."""
    missing = sorted(set(gt) - set(preds))
    notes = []
    if missing and not allow_missing:
        raise EvaluationError(f"{len(missing)} ground truths have no prediction in {pred_dir}: {_id_list(missing)} "
                              "(--allow_missing scores them as empty masks)")
    if missing:
        notes.append(f"warning: {len(missing)} ground truths have no prediction, scored as empty masks: "
                     f"{_id_list(missing)}")
    if ignored:
        notes.append(f"{len(ignored)} predictions without ground truth ignored: {_id_list(ignored)}")
    return notes


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def check_not_self(opts: EvalOptions) -> None:
    """--inp_pth and --out_pth must be two folders: the masks scored against themselves give Dice 1."""
    if opts.out_pth is not None and _same_folder(opts.inp_pth, opts.out_pth):
        raise EvaluationError(f"--inp_pth and --out_pth are the same folder ({opts.inp_pth}): the predictions would be "
                              "scored against themselves; --out_pth is the folder of ground-truth masks")


# ---------------------------------------------------------------- loading and scoring


def load_gray(path: Path) -> np.ndarray:
    """An 8-bit grayscale map (probability or uncertainty) as uint8; DataError naming the path."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def fit_to(arr: np.ndarray, shape: tuple[int, int], path: Path, strict: bool) -> tuple[np.ndarray, bool]:
    """arr at the ground truth's shape (nearest neighbour) and whether it was resized; error under strict."""
    if arr.shape == shape:
        return arr, False
    if strict:
        raise EvaluationError(f"--strict: {path} is {arr.shape[1]}x{arr.shape[0]}, "
                              f"ground truth is {shape[1]}x{shape[0]}")
    mode_bool = arr.dtype == bool
    im = Image.fromarray(arr.astype(np.uint8) * (255 if mode_bool else 1))
    out = np.asarray(im.resize((shape[1], shape[0]), Image.NEAREST))
    return (out > 0 if mode_bool else out), True


def check_is_mask(path: Path, flag: str) -> None:
    """A ground truth must be a mask: a colour or grey photo (many grey levels, many mid-tone pixels) is an
    EvaluationError naming the file, not a silent score against its thresholded brightness."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith(("I", "F")):  # 16-bit and float files: label maps and masks, not photos
                return
            values = np.asarray(im.convert("RGB")).max(axis=-1)
    except (OSError, ValueError):
        return  # load_mask names an unreadable file
    low, high = MIDTONE_RANGE
    midtones = float(((values >= low) & (values <= high)).mean()) if values.size else 0.0
    levels = len(np.unique(values))
    if midtones > PHOTO_MIDTONES and levels > PHOTO_LEVELS:
        raise EvaluationError(f"ground truth {path} is not a mask ({levels} grey levels, {midtones:.0%} of its pixels "
                              f"mid-tone, as in a photo): {flag} must give the ground-truth masks, not the images")


def score_item(item: Item, opts: EvalOptions) -> dict:
    """One CSV row: every metric of one image, plus areas and what was done to the files."""
    check_is_mask(item.gt, "--out_pth" if opts.out_pth is not None else "--data_dir")
    gt = load_mask(item.gt)
    resized = False
    if item.pred is None:
        pred = np.zeros_like(gt)
    else:
        pred, resized = fit_to(load_mask(item.pred, threshold=opts.threshold), gt.shape, item.pred, opts.strict)
    row = {"id": item.id, **metrics.segmentation_metrics(pred, gt), "ece": math.nan, "unc_error_dice": math.nan}
    if item.prob is not None:
        prob, r = fit_to(load_gray(item.prob), gt.shape, item.prob, opts.strict)
        row["ece"], resized = metrics.expected_calibration_error(prob / 255.0, gt), resized or r
    if item.unc is not None:
        unc, r = fit_to(load_gray(item.unc), gt.shape, item.unc, opts.strict)
        row["unc_error_dice"] = metrics.uncertainty_error_dice(unc / 255.0, pred, gt, opts.unc_threshold)
        resized = resized or r
    row.update(
        height=gt.shape[0], width=gt.shape[1], gt_pixels=int(gt.sum()), pred_pixels=int(pred.sum()),
        resized=resized, missing=item.pred is None,
        prediction="" if item.pred is None else str(item.pred), ground_truth=str(item.gt),
    )
    return row


def score_all(items: list[Item], opts: EvalOptions) -> pd.DataFrame:
    """Per-image table over all items, with a progress bar for large folders."""
    show = opts.progress and len(items) >= PROGRESS_MIN_IMAGES
    rows = [score_item(it, opts) for it in progress(items, desc="evaluating", unit="img", disable=not show)]
    return pd.DataFrame(rows)


def reported_metrics(table: pd.DataFrame) -> list[str]:
    """Metric columns to summarise: the standard ones, plus ECE/uncertainty when any map was found."""
    extra = [m for m in EXTRA_METRICS if table[m].notna().any()]
    return list(metrics.METRIC_NAMES) + extra


def summarize_table(table: pd.DataFrame, opts: EvalOptions) -> dict[str, dict]:
    """Macro summary (over images) of every reported metric."""
    return {m: metrics.summarize(table[m].to_numpy(), n_boot=opts.n_boot, seed=opts.seed)
            for m in reported_metrics(table)}


def table_notes(table: pd.DataFrame) -> list[str]:
    """Warnings about resized files, empty ground truths and undefined surface distances."""
    notes = []
    if table["resized"].any():
        notes.append(f"warning: {int(table['resized'].sum())} images had a prediction or map of another size, "
                     "resized to the ground truth's (nearest neighbour; --strict makes this an error)")
    empty = int((table["gt_pixels"] == 0).sum())
    if empty:
        notes.append(f"{empty} ground-truth masks are empty (foreground is > 128; check that masks are stored 0/255)")
    return notes + coverage_notes(table, "images")


def coverage_notes(table: pd.DataFrame, unit: str) -> list[str]:
    """Notes on the rows (images or cases) left out of a mean: undefined surface distances, missing maps."""
    notes = []
    undefined = int(table["hd95"].isna().sum())
    if undefined:
        notes.append(f"hd95/assd undefined (an empty mask) for {undefined} {unit}: NaN in the CSV, left out of "
                     "their mean")
    for m, what in (("ece", "probability"), ("unc_error_dice", "uncertainty")):
        n = int(table[m].notna().sum())
        if 0 < n < len(table):
            notes.append(f"{what} maps found for {n} of {len(table)} {unit}; {m} is over those only")
    return notes


# ---------------------------------------------------------------- reports


def output_paths(opts: EvalOptions) -> tuple[Path, Path]:
    """Where the CSV and JSON go: the flags, else evaluation.csv/.json in the prediction folder."""
    base = Path(opts.inp_pth)
    return Path(opts.csv or base / DEFAULT_CSV), Path(opts.json or base / DEFAULT_JSON)


def build_summary(table: pd.DataFrame, pairing: Pairing, opts: EvalOptions, notes: list[str]) -> dict:
    """The JSON summary: settings, counts, per-metric statistics and notes."""
    source = {"out_pth": str(opts.out_pth)} if opts.out_pth is not None else {
        "data_name": opts.data_name, "data_dir": str(opts.data_dir), "split": opts.split,
    }
    return {
        "inp_pth": str(opts.inp_pth),
        "ground_truth": source,
        "n_images": int(len(table)),
        "settings": {"threshold": opts.threshold, "unc_threshold": opts.unc_threshold, "n_boot": opts.n_boot,
                     "seed": opts.seed, "ece_bins": metrics.ECE_BINS,
                     "threshold_jaccard": metrics.ISIC_JACCARD_THRESHOLD},
        "counts": {
            "missing_predictions": int(table["missing"].sum()),
            "ignored_predictions": len(pairing.ignored),
            "resized": int(table["resized"].sum()),
            "empty_ground_truth": int((table["gt_pixels"] == 0).sum()),
            "undefined_surface_distance": int(table["hd95"].isna().sum()),
        },
        "metrics": summarize_table(table, opts),
        "notes": notes,
    }


def _json_safe(obj):
    """obj with NaN/inf floats replaced by None, so the JSON is strict."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_reports(table: pd.DataFrame, summary: dict, csv_path: Path, json_path: Path) -> None:
    """The per-image CSV (NaN written as NaN) and the JSON summary (NaN written as null)."""
    for path, text in ((csv_path, table.to_csv(index=False, na_rep="NaN")),
                       (json_path, json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")):
        try:
            atomic_write(path, text)
        except OSError as e:
            raise EvaluationError(f"cannot write {path}: {e.strerror or e}") from None


def format_table(summary: dict) -> str:
    """The terminal table: one row per metric with mean, std, median, bootstrap 95% CI and count."""
    head = f"{'metric':<18}{'mean':>9}{'std':>9}{'median':>9}{'95% CI':>21}{'n':>7}"
    lines = [head, "-" * len(head)]
    unit = summary["settings"].get("surface_unit", "px")  # volumes: mm (evaluation/volumes.py)
    for name, s in summary["metrics"].items():
        px = name in metrics.SURFACE_METRICS
        f = (lambda v: f"{v:.2f}") if px else (lambda v: f"{v:.4f}")
        label = name + (f" ({unit})" if px else "")
        ci = f"[{f(s['ci95_low'])}, {f(s['ci95_high'])}]"
        lines.append(f"{label:<18}{f(s['mean']):>9}{f(s['std']):>9}{f(s['median']):>9}{ci:>21}{s['n']:>7}")
    counted = "cases" if "n_cases" in summary else "images"
    lines.append(f"{summary['n_images']} {counted}, macro average; 95% CI: percentile bootstrap of the mean "
                 f"({summary['settings']['n_boot']} resamples, seed {summary['settings']['seed']})")
    return "\n".join(lines)


def evaluate(opts: EvalOptions) -> EvalResult:
    """Pair, score every image, summarise, and write the CSV and JSON reports (the only files written). BRATS/NIFTI
    (or an --out_pth of NIfTI labels): per case in 3-D (evaluation/volumes.py)."""
    from guided_diffusion.evaluation import volumes as volume_scoring

    if volume_scoring.applies(opts):
        return volume_scoring.evaluate(opts)
    if opts.labels is not None:
        raise EvaluationError("--labels picks the foreground labels of NIfTI label volumes (--data_name BRATS or "
                              "NIFTI, or an --out_pth of .nii.gz labels)")
    pairing = pair(opts)
    table = score_all(pairing.items, opts)
    notes = pairing.notes + table_notes(table)
    summary = build_summary(table, pairing, opts, notes)
    csv_path, json_path = output_paths(opts)
    write_reports(table, summary, csv_path, json_path)
    return EvalResult(per_image=table, summary=summary, notes=notes, csv=csv_path, json=json_path)
