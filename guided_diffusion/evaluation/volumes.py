"""Scoring BRATS/NIFTI prediction folders per case, in 3-D, with distances in millimetres.

A case's predicted mask (<inp_pth>/<case>.nii.gz, foreground: value > 0.5) is scored against its label volume
(foreground: label > 0, or the labels of --labels, by default those the sampler recorded in sampling.json) over the
whole volume: Dice, IoU and the other overlap metrics from one confusion matrix of voxels, and HD95 and ASSD in mm
from the voxel sizes of the label file's header (its zooms), on 6-connected surfaces (a foreground voxel with a
face-neighbour in the background) and exact Euclidean distance transforms with that spacing. The pooled conventions
are the 2-D scorer's (metrics.py); ECE and the uncertainty-error Dice from prob/ and uncertainty/ when present.
The CSV, JSON and terminal table are scoring.py's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from guided_diffusion.data import volumes
from guided_diffusion.data.datasets import list_pairs
from guided_diffusion.evaluation import metrics
from guided_diffusion.layout import SAMPLING_SETTINGS
from guided_diffusion.progress import progress

PROGRESS_MIN_CASES = 5
AFFINE_TOLERANCE = 1e-3  # mm: a prediction whose affine differs more from its label's is noted


def applies(opts) -> bool:
    """Whether the options ask for volume scoring: --data_name BRATS/NIFTI, or an --out_pth of NIfTI labels."""
    if opts.data_name is not None:
        return volumes.is_volume_data(opts.data_name)
    gt = Path(opts.out_pth) if opts.out_pth is not None else None
    return gt is not None and gt.is_dir() and bool(volumes.nifti_files(gt))


# ---------------------------------------------------------------- surface distances in mm


def surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face-neighbour (6-connectivity in 3-D, 4 in 2-D) in the background; voxels outside
    the volume count as background."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances_mm(pred: np.ndarray, gt: np.ndarray, spacing) -> np.ndarray:
    """Pooled symmetric surface distances in mm: for every surface voxel of pred the distance to the nearest surface
    voxel of gt, then the same from gt to pred; the distance between voxel centres with ``spacing`` (mm per axis).
    Empty when either mask is empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {pred.shape} vs {gt.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} does not match a {pred.ndim}-D mask")
    if not pred.any() or not gt.any():
        return np.empty(0, dtype=np.float64)
    sp, sg = surface(pred), surface(gt)
    window = tuple(ndimage.find_objects((sp | sg).astype(np.int8))[0])  # exact: every point and target inside
    sp, sg = sp[window], sg[window]
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return np.concatenate([to_gt[sp], to_pred[sg]]).astype(np.float64)


def volume_metrics(pred: np.ndarray, gt: np.ndarray, spacing) -> dict[str, float]:
    """metrics.METRIC_NAMES of one case: overlaps from its voxel counts, hd95/assd in mm."""
    c = metrics.confusion(pred, gt)
    out = {name: fn(c) for name, fn in metrics.OVERLAP_METRICS.items()}
    d = surface_distances_mm(pred, gt, spacing)
    out["hd95"] = float(np.percentile(d, 95)) if d.size else math.nan
    out["assd"] = float(d.mean()) if d.size else math.nan
    return out


# ---------------------------------------------------------------- pairing


def _ground_truth(opts) -> tuple[dict[str, Path], list[str]]:
    from guided_diffusion.evaluation.scoring import EvaluationError, resolve_split_file

    if opts.out_pth is not None:
        folder = Path(opts.out_pth)
        files = volumes.nifti_files(folder)
        if not files:
            raise EvaluationError(f"--out_pth: no NIfTI label volumes (.nii.gz, .nii) in {folder}")
        return {volumes.nifti_stem(p): p for p in files}, []
    if opts.data_dir is None:
        raise EvaluationError("--data_dir is required with --data_name")
    if not Path(opts.data_dir).is_dir():
        raise EvaluationError(f"--data_dir: folder not found: {opts.data_dir}")
    split_file, notes = resolve_split_file(opts)
    cases = list_pairs(opts.data_name, opts.data_dir, split=opts.split, split_file=split_file, seed=opts.split_seed)
    return {c.id: c.mask for c in cases}, notes


def recorded_labels(inp_pth: Path) -> str | None:
    """The --labels the sampler recorded in <inp_pth>/sampling.json (None when there is no record)."""
    path = Path(inp_pth) / SAMPLING_SETTINGS
    try:
        settings = json.loads(path.read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return None
    return settings.get("labels") if isinstance(settings, dict) else None


def pair_cases(opts) -> tuple[list[tuple[str, Path, Path | None]], list[str], list[str]]:
    """(case, label file, prediction or None) for every ground truth, the ignored prediction names, notes."""
    from guided_diffusion.evaluation.scoring import EvaluationError, _id_list, _same_folder, unpaired_notes

    pred_dir = Path(opts.inp_pth)
    if not pred_dir.is_dir():
        raise EvaluationError(f"--inp_pth: folder not found: {pred_dir}")
    gt, notes = _ground_truth(opts)
    preds = {volumes.nifti_stem(p): p for p in volumes.nifti_files(pred_dir)}
    if not preds:
        raise EvaluationError(f"--inp_pth: no predicted volumes (<case>.nii.gz) in {pred_dir}")
    same = [k for k in preds if k in gt and _same_folder(preds[k], gt[k])]
    if same:
        raise EvaluationError(f"--inp_pth {pred_dir} holds the ground truth itself ({gt[same[0]]} is its own "
                              "prediction): give the folder of predicted masks")
    ignored = sorted(preds[k].name for k in preds if k not in gt)
    if len(ignored) == len(preds):
        raise EvaluationError(f"nothing to pair: no prediction in {pred_dir} has a ground-truth case id "
                              f"(predictions: {_id_list(list(preds))}; ground truth: {_id_list(list(gt))})")
    notes += unpaired_notes(gt, preds, ignored, pred_dir, opts.allow_missing)
    return [(k, gt[k], preds.get(k)) for k in sorted(gt)], ignored, notes


# ---------------------------------------------------------------- scoring


def _read(path: Path) -> tuple[object, np.ndarray]:
    img = volumes.open_nifti(path)
    volumes.spatial_shape(img, path)
    data = volumes.read_array(img, path)
    if data.ndim != 3:
        from guided_diffusion.evaluation.scoring import EvaluationError

        raise EvaluationError(f"{path}: a mask volume must be 3-D, got shape {'x'.join(map(str, data.shape))}")
    return img, np.asarray(data, dtype=np.float32)


def _fmt(values) -> str:
    return "x".join(f"{float(v):g}" for v in values)


def score_case(case: str, gt_path: Path, pred_path: Path | None, labels: tuple[int, ...], opts) -> dict:
    """One CSV row: the case's metrics in 3-D, its shape, spacing, voxel counts and files."""
    from guided_diffusion.evaluation.scoring import EvaluationError

    gt_img = volumes.open_nifti(gt_path)
    shape = volumes.spatial_shape(gt_img, gt_path)
    gt = volumes.load_label(gt_path, labels)
    spacing = tuple(float(z) for z in gt_img.header.get_zooms()[:3])
    affine_ok = True
    if pred_path is None:
        pred = np.zeros(shape, dtype=bool)
    else:
        pred_img, values = _read(pred_path)
        if values.shape != shape:
            raise EvaluationError(f"{pred_path} is {'x'.join(map(str, values.shape))} but its ground truth {gt_path} "
                                  f"is {'x'.join(map(str, shape))}: a predicted volume must have its label's grid")
        pred = values > 0.5
        affine_ok = bool(np.allclose(pred_img.affine, gt_img.affine, atol=AFFINE_TOLERANCE))
    row = {"id": case, **volume_metrics(pred, gt, spacing), "ece": math.nan, "unc_error_dice": math.nan}
    if pred_path is not None:
        prob_path = pred_path.parent / "prob" / pred_path.name
        unc_path = pred_path.parent / "uncertainty" / pred_path.name
        if prob_path.is_file():
            prob = np.clip(_read(prob_path)[1], 0.0, 1.0)
            if prob.shape == shape:
                row["ece"] = metrics.expected_calibration_error(prob, gt)
        if unc_path.is_file():
            unc = _read(unc_path)[1]
            if unc.shape == shape:
                row["unc_error_dice"] = metrics.uncertainty_error_dice(unc, pred, gt, opts.unc_threshold)
    row.update(shape=_fmt(shape), spacing_mm=_fmt(spacing), gt_voxels=int(gt.sum()), pred_voxels=int(pred.sum()),
               resized=False, affine_matches=affine_ok, missing=pred_path is None,
               prediction="" if pred_path is None else str(pred_path), ground_truth=str(gt_path))
    return row


def evaluate(opts):
    """scoring.evaluate for volumes: pair cases, score each in 3-D, summarise, write the CSV and JSON."""
    from guided_diffusion.evaluation.scoring import (EvalResult, EvaluationError, Pairing, _same_folder,
                                                     build_summary, output_paths, write_reports)

    if (opts.out_pth is None) == (opts.data_name is None):
        raise EvaluationError("give the ground truth as either --out_pth LABEL_DIR or --data_name NAME --data_dir DIR")
    if opts.out_pth is not None and _same_folder(opts.inp_pth, opts.out_pth):
        raise EvaluationError(f"--inp_pth and --out_pth are the same folder ({opts.inp_pth}): the predictions would be "
                              "scored against themselves; --out_pth is the folder of label volumes")
    items, ignored, notes = pair_cases(opts)
    spec = opts.labels if opts.labels is not None else recorded_labels(opts.inp_pth)
    labels = volumes.parse_labels(spec or "")
    foreground = volumes.foreground_text(labels)
    notes.insert(0, f"foreground: {foreground}" + (" (--labels)" if opts.labels is not None else
                                                   " (as sampled, sampling.json)" if spec is not None else ""))
    show = opts.progress and len(items) >= PROGRESS_MIN_CASES
    rows = [score_case(case, gt, pred, labels, opts)
            for case, gt, pred in progress(items, desc="evaluating", unit="case", disable=not show)]
    table = pd.DataFrame(rows)
    notes += volume_notes(table)
    summary = build_summary(table.rename(columns={"gt_voxels": "gt_pixels"}), Pairing([], ignored, []), opts, notes)
    summary["n_cases"] = summary["n_images"]
    summary["settings"].update(surface_unit="mm", foreground=foreground, mask_threshold=0.5,
                               scored_in="3-D, per case")
    summary["settings"].pop("threshold", None)  # the 8-bit PNG threshold does not apply
    csv_path, json_path = output_paths(opts)
    write_reports(table, summary, csv_path, json_path)
    return EvalResult(per_image=table, summary=summary, notes=notes, csv=csv_path, json=json_path)


def volume_notes(table: pd.DataFrame) -> list[str]:
    """Warnings about empty ground truths, undefined surface distances and affines that differ."""
    from guided_diffusion.evaluation.scoring import coverage_notes

    notes = []
    empty = int((table["gt_voxels"] == 0).sum())
    if empty:
        notes.append(f"{empty} label volumes have no foreground voxel (check --labels)")
    moved = int((~table["affine_matches"]).sum())
    if moved:
        notes.append(f"warning: {moved} predictions have another affine than their label volume (scored voxel by "
                     "voxel; distances use the label's spacing)")
    return notes + coverage_notes(table, "cases")
