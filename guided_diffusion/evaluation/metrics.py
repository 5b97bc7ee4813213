"""Per-image segmentation metrics on binary masks, with the ISIC challenge scorer's conventions.

Overlap metrics come from one confusion matrix and treat the undefined cases as the official
ISIC scorer (isic-challenge-scoring, ``metrics.py``) does: a ratio whose denominator is zero scores 1.
Surface distances are in pixels and computed with Euclidean distance transforms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

ISIC_JACCARD_THRESHOLD = 0.65  # ISIC 2018 Task 1 ranks by Jaccard set to 0 below this value
ECE_BINS = 10

# 4-neighbourhood (cross) footprint: a foreground pixel is on the boundary when one of its
# 4-neighbours is background (the convention of medpy and MONAI).
_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class Confusion:
    """Pixel counts of one prediction against its ground truth."""

    tp: int
    fp: int
    fn: int
    tn: int


def confusion(pred: np.ndarray, gt: np.ndarray) -> Confusion:
    """Count TP/FP/FN/TN of two boolean masks of the same shape."""
    pred, gt = _check_pair(pred, gt)
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(gt)) - tp
    return Confusion(tp=tp, fp=fp, fn=fn, tn=int(pred.size) - tp - fp - fn)


def _ratio(num: float, den: float) -> float:
    """num / den, or 1 when den is 0 (the ISIC scorer's 'freebie' for an undefined ratio)."""
    return 1.0 if den == 0 else float(num) / float(den)


def dice(c: Confusion) -> float:
    """Dice = 2TP / (2TP + FP + FN); 1 when both masks are empty."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def iou(c: Confusion) -> float:
    """Jaccard index (IoU) = TP / (TP + FP + FN); 1 when both masks are empty."""
    return _ratio(c.tp, c.tp + c.fp + c.fn)


def threshold_jaccard(c: Confusion, threshold: float = ISIC_JACCARD_THRESHOLD) -> float:
    """IoU when it is >= threshold, else 0: the ISIC 2018 Task 1 ranking metric."""
    j = iou(c)
    return j if j >= threshold else 0.0


def sensitivity(c: Confusion) -> float:
    """Recall = TP / (TP + FN); 1 when the ground truth is empty (ISIC)."""
    return _ratio(c.tp, c.tp + c.fn)


def specificity(c: Confusion) -> float:
    """TN / (TN + FP); 1 when the ground truth covers the whole image (ISIC)."""
    return _ratio(c.tn, c.tn + c.fp)


def accuracy(c: Confusion) -> float:
    """(TP + TN) / all pixels."""
    return _ratio(c.tp + c.tn, c.tp + c.tn + c.fp + c.fn)


def precision(c: Confusion) -> float:
    """Positive predictive value TP / (TP + FP); 1 when the prediction is empty (ISIC's binary_ppv)."""
    return _ratio(c.tp, c.tp + c.fp)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour in the background; pixels outside the image count as background."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Pooled symmetric surface distances in pixels: d(a, ∂gt) for a in ∂pred, then d(b, ∂pred) for b in ∂gt.

    ``∂`` is :func:`boundary`, ``d`` the Euclidean distance to the nearest pixel of the other boundary.
    Returns an empty array when either mask is empty (the distances are undefined).
    """
    pred, gt = _check_pair(pred, gt)
    if not pred.any() or not gt.any():
        return np.empty(0, dtype=np.float64)
    bp, bg = boundary(pred), boundary(gt)
    window = _bounding_box(bp | bg)  # exact: every query point and every target lies inside it
    bp, bg = bp[window], bg[window]
    to_gt = ndimage.distance_transform_edt(~bg)
    to_pred = ndimage.distance_transform_edt(~bp)
    return np.concatenate([to_gt[bp], to_pred[bg]]).astype(np.float64)


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """95th percentile (linear interpolation) of the pooled symmetric surface distances; NaN if a mask is empty."""
    return _percentile95(surface_distances(pred, gt))


def assd(pred: np.ndarray, gt: np.ndarray) -> float:
    """Average symmetric surface distance: mean of the pooled distances (Heimann et al. 2009); NaN if a mask is empty.

    medpy's ``assd`` averages the two directed means instead; the two agree when both boundaries have
    the same number of pixels.
    """
    return _mean(surface_distances(pred, gt))


def expected_calibration_error(prob: np.ndarray, gt: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of per-pixel foreground probabilities: sum over equal-width bins of (share of pixels) * |freq - conf|.

    Bins split [0, 1] into ``n_bins`` intervals [k/n, (k+1)/n), the last one closed; ``freq`` is the
    ground-truth foreground rate in the bin and ``conf`` the mean predicted probability.
    """
    prob = np.asarray(prob, dtype=np.float64).ravel()
    gt = np.asarray(gt, dtype=bool).ravel()
    if prob.shape != gt.shape:
        raise ValueError(f"probability map and ground truth differ in size: {prob.size} vs {gt.size}")
    if prob.size == 0:
        return float("nan")
    if prob.min() < 0 or prob.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    idx = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    conf = np.bincount(idx, weights=prob, minlength=n_bins)
    freq = np.bincount(idx, weights=gt.astype(np.float64), minlength=n_bins)
    return float(np.abs(freq - conf).sum() / prob.size)


def uncertainty_error_dice(uncertainty: np.ndarray, pred: np.ndarray, gt: np.ndarray, threshold: float) -> float:
    """Dice between the uncertain pixels (uncertainty > threshold) and the error map (pred XOR gt).

    1 when there is neither error nor uncertainty: uncertainty then found every error and raised no alarm.
    """
    pred, gt = _check_pair(pred, gt)
    flagged = np.asarray(uncertainty) > threshold
    if flagged.shape != pred.shape:
        raise ValueError(f"uncertainty map and masks differ in shape: {flagged.shape} vs {pred.shape}")
    return dice(confusion(flagged, pred ^ gt))


OVERLAP_METRICS = {
    "dice": dice,
    "iou": iou,
    "threshold_jaccard": threshold_jaccard,
    "sensitivity": sensitivity,
    "specificity": specificity,
    "accuracy": accuracy,
    "precision": precision,
}
SURFACE_METRICS = ("hd95", "assd")
METRIC_NAMES = tuple(OVERLAP_METRICS) + SURFACE_METRICS


def segmentation_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """All per-image metrics of METRIC_NAMES for one boolean prediction against its ground truth."""
    c = confusion(pred, gt)
    out = {name: fn(c) for name, fn in OVERLAP_METRICS.items()}
    d = surface_distances(pred, gt)
    out["hd95"], out["assd"] = _percentile95(d), _mean(d)
    return out


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling images with replacement; NaN values are dropped."""
    v = _finite(values)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def summarize(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float | int]:
    """Macro summary over images: mean, sample std (ddof=1), median, bootstrap 95% CI, counts; NaNs left out."""
    raw = np.asarray(values, dtype=np.float64)
    v = _finite(raw)
    nan = float("nan")
    lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    return {
        "mean": float(v.mean()) if v.size else nan,
        "std": float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else nan),
        "median": float(np.median(v)) if v.size else nan,
        "ci95_low": lo,
        "ci95_high": hi,
        "n": int(v.size),
        "n_nan": int(raw.size - v.size),
    }


def _percentile95(d: np.ndarray) -> float:
    """95th percentile (numpy's linear interpolation) of distances, NaN for none."""
    return float(np.percentile(d, 95)) if d.size else float("nan")


def _mean(d: np.ndarray) -> float:
    """Mean of distances, NaN for none."""
    return float(d.mean()) if d.size else float("nan")


def _finite(values: np.ndarray) -> np.ndarray:
    """The non-NaN entries of values as float64."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return v[~np.isnan(v)]


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays; ValueError when their shapes differ."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {pred.shape} vs {gt.shape}")
    return pred, gt


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True pixel of a non-empty mask."""
    slices = ndimage.find_objects(mask.astype(np.int8))[0]
    return tuple(slices)
