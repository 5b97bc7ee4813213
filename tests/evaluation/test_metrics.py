"""Per-image metrics: hand-computed cases, the ISIC scorer's conventions, brute-force surface distances."""
from __future__ import annotations

import math

import numpy as np
import pytest

from guided_diffusion.evaluation import metrics as M


def square(shape=(40, 50), top=10, left=10, size=10) -> np.ndarray:
    """A boolean image holding one filled square."""
    m = np.zeros(shape, dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


# ---------------------------------------------------------------- overlap metrics


def test_shifted_squares_known_overlap():
    gt, pred = square(), square(left=13)  # 10x10 squares, 3 px apart: overlap 7x10
    c = M.confusion(pred, gt)
    assert (c.tp, c.fp, c.fn, c.tn) == (70, 30, 30, 2000 - 130)
    r = M.segmentation_metrics(pred, gt)
    assert r["dice"] == pytest.approx(140 / 200)
    assert r["iou"] == pytest.approx(70 / 130)
    assert r["threshold_jaccard"] == 0.0  # 0.538 < 0.65
    assert r["sensitivity"] == pytest.approx(0.7)
    assert r["precision"] == pytest.approx(0.7)
    assert r["specificity"] == pytest.approx(1870 / 1900)
    assert r["accuracy"] == pytest.approx(1940 / 2000)


def test_threshold_jaccard_keeps_iou_from_065():
    r = M.segmentation_metrics(square(left=11), square())  # overlap 9x10: IoU 90/110
    assert r["threshold_jaccard"] == pytest.approx(90 / 110) == r["iou"]
    at = M.Confusion(tp=65, fp=35, fn=0, tn=0)  # IoU exactly 0.65: kept (ISIC uses >=)
    assert M.threshold_jaccard(at) == pytest.approx(0.65)
    assert M.threshold_jaccard(M.Confusion(tp=64, fp=36, fn=0, tn=0)) == 0.0


# Expected values derived by hand from the definitions of the official ISIC scorer
# (isic-challenge-scoring, metrics.py): a zero denominator scores 1.0; threshold Jaccard at 0.65.
ISIC_CASES = [
    # (tp, fp, fn, tn) -> dice, jaccard, threshold_jaccard, sensitivity, specificity, accuracy, ppv
    ((0, 0, 0, 100), (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)),        # both empty
    ((0, 0, 30, 70), (0.0, 0.0, 0.0, 0.0, 1.0, 0.7, 1.0)),        # empty prediction
    ((0, 30, 0, 70), (0.0, 0.0, 0.0, 1.0, 70 / 100, 0.7, 0.0)),   # empty ground truth
    ((100, 0, 0, 0), (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)),        # all foreground, perfect
    ((80, 20, 0, 0), (160 / 180, 0.8, 0.8, 1.0, 0.0, 0.8, 0.8)),  # no true negatives
    ((50, 10, 20, 20), (100 / 130, 50 / 80, 0.0, 50 / 70, 20 / 30, 0.7, 50 / 60)),
]


@pytest.mark.parametrize("counts,expected", ISIC_CASES)
def test_definitions_equal_isic_scorer(counts, expected):
    c = M.Confusion(*counts)
    fns = (M.dice, M.iou, M.threshold_jaccard, M.sensitivity, M.specificity, M.accuracy, M.precision)
    got = tuple(fn(c) for fn in fns)
    assert got == pytest.approx(expected)


def test_both_empty_and_one_empty_masks():
    empty = np.zeros((8, 8), bool)
    both = M.segmentation_metrics(empty, empty)
    assert both["dice"] == both["iou"] == both["sensitivity"] == both["specificity"] == 1.0
    assert math.isnan(both["hd95"]) and math.isnan(both["assd"])
    miss = M.segmentation_metrics(empty, square((8, 8), 2, 2, 3))
    assert miss["dice"] == miss["iou"] == miss["sensitivity"] == 0.0 and miss["specificity"] == 1.0
    assert math.isnan(miss["hd95"]) and math.isnan(miss["assd"])
    extra = M.segmentation_metrics(square((8, 8), 2, 2, 3), empty)
    assert extra["dice"] == 0.0 and extra["sensitivity"] == 1.0 and extra["precision"] == 0.0
    assert extra["specificity"] == pytest.approx(55 / 64) and math.isnan(extra["hd95"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        M.segmentation_metrics(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# ---------------------------------------------------------------- surface distances


def test_boundary_is_4_neighbour_and_image_edge_counts_as_background():
    b = M.boundary(square((7, 7), 2, 2, 3))
    assert b.sum() == 8 and not b[3, 3]  # only the centre of a 3x3 square is interior
    plus = np.zeros((5, 5), bool)
    plus[2, 1:4] = plus[1:4, 2] = True
    assert not M.boundary(plus)[2, 2]  # all 4-neighbours set, although diagonals are not
    full = M.boundary(np.ones((4, 5), bool))
    assert full.sum() == 4 * 5 - 2 * 3 and not full[1:3, 1:4].any()


def test_single_pixels_at_known_distance():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[1, 1], b[4, 5] = True, True  # 3-4-5 triangle
    assert M.hd95(a, b) == pytest.approx(5.0) and M.assd(a, b) == pytest.approx(5.0)


@pytest.mark.parametrize("shift", [1, 3, 6])
def test_shifted_squares_hausdorff_equals_shift(shift):
    d = M.surface_distances(square(left=10 + shift), square())
    assert d.max() == pytest.approx(shift)
    assert M.hd95(square(), square()) == 0.0 and M.assd(square(), square()) == 0.0


def test_concentric_squares_hand_computed():
    outer = square((30, 30), 5, 5, 20)  # boundary: 76 px
    inner = square((30, 30), 7, 7, 16)  # boundary: 60 px, each 2 px from the outer one
    # Outer -> inner: 64 side pixels at 2, 8 corner-adjacent at sqrt(5), 4 corners at sqrt(8).
    d = np.sort(M.surface_distances(outer, inner))
    assert d.size == 136 and d.max() == pytest.approx(math.sqrt(8))
    assert M.hd95(outer, inner) == pytest.approx(math.sqrt(5))  # rank 0.95*135 = 128.25 falls in the sqrt(5) run
    assert M.assd(outer, inner) == pytest.approx((124 * 2 + 8 * math.sqrt(5) + 4 * math.sqrt(8)) / 136)
    assert M.hd95(inner, outer) == M.hd95(outer, inner)  # symmetric


def brute_boundary(mask: np.ndarray) -> list[tuple[int, int]]:
    """Boundary pixels by explicit loops: foreground with a 4-neighbour outside the mask or the image."""
    h, w = mask.shape
    out = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and any(
                not (0 <= y + dy < h and 0 <= x + dx < w) or not mask[y + dy, x + dx]
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
            ):
                out.append((y, x))
    return out


def brute_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pooled symmetric surface distances by point-set loops."""
    pa, pb = brute_boundary(a), brute_boundary(b)
    def directed(src, dst):
        return [min(math.hypot(y - v, x - u) for v, u in dst) for y, x in src]
    return np.array(directed(pa, pb) + directed(pb, pa))


@pytest.mark.parametrize("seed", range(12))
def test_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(6, 20, size=2))
    a, b = rng.random(shape) < rng.uniform(0.1, 0.6), rng.random(shape) < rng.uniform(0.05, 0.5)
    if not a.any() or not b.any():
        pytest.skip("empty draw")
    expected = brute_distances(a, b)
    np.testing.assert_allclose(np.sort(M.surface_distances(a, b)), np.sort(expected))
    assert M.hd95(a, b) == pytest.approx(np.percentile(expected, 95))
    assert M.assd(a, b) == pytest.approx(expected.mean())


def test_distant_small_masks_match_brute_force():
    a, b = np.zeros((30, 40), bool), np.zeros((30, 40), bool)
    a[0:3, 0:2] = True  # corner blobs far apart: checks the cropped distance transform
    b[25:30, 33:40] = True
    b[27, 35] = False
    expected = brute_distances(a, b)
    assert M.hd95(a, b) == pytest.approx(np.percentile(expected, 95))
    assert M.assd(a, b) == pytest.approx(expected.mean())


# ---------------------------------------------------------------- calibration and uncertainty


def test_ece_hand_computed():
    gt = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    assert M.expected_calibration_error(np.full(10, 0.3), gt) == pytest.approx(0.0)  # 30% fg at p=0.3
    assert M.expected_calibration_error(gt.astype(float), gt) == 0.0
    assert M.expected_calibration_error(1.0 - gt, gt) == pytest.approx(1.0)
    # bin [0.9,1]: 5 px at p=0.95, 3 fg -> |0.6-0.95|; bin [0,0.1): 5 px at p=0.05, 0 fg -> 0.05
    prob = np.array([0.95] * 5 + [0.05] * 5)
    gt2 = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    assert M.expected_calibration_error(prob, gt2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.05)


def test_ece_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.expected_calibration_error(np.array([1.5]), np.array([True]))


def test_uncertainty_error_dice_hand_computed():
    gt = square((10, 10), 2, 2, 4)
    pred = square((10, 10), 2, 3, 4)  # errors: column 2 (FN) and column 6 (FP), 4 px each
    unc = np.zeros((10, 10))
    unc[2:6, 2] = 0.9  # finds one error column of two
    unc[0, 0] = 0.9  # one false alarm
    assert M.uncertainty_error_dice(unc, pred, gt, threshold=0.5) == pytest.approx(2 * 4 / (5 + 8))
    assert M.uncertainty_error_dice(np.zeros((10, 10)), gt, gt, threshold=0.5) == 1.0
    assert M.uncertainty_error_dice(unc, pred, gt, threshold=0.95) == 0.0


# ---------------------------------------------------------------- summaries


def test_summary_and_bootstrap():
    v = np.array([0.5, 0.7, 0.9, np.nan])
    s = M.summarize(v, n_boot=500, seed=3)
    assert s["mean"] == pytest.approx(0.7) and s["median"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(0.2) and (s["n"], s["n_nan"]) == (3, 1)
    assert 0.5 <= s["ci95_low"] < 0.7 < s["ci95_high"] <= 0.9
    assert M.summarize(v, n_boot=500, seed=3) == s  # seeded
    assert M.bootstrap_ci(np.full(7, 0.25), n_boot=50) == (0.25, 0.25)


def test_bootstrap_interval_covers_the_mean_at_about_95_percent():
    rng = np.random.default_rng(0)
    hits = sum(lo <= 0.5 <= hi for lo, hi in (M.bootstrap_ci(rng.random(60), n_boot=400, seed=i) for i in range(200)))
    assert 0.88 <= hits / 200 <= 0.99


def test_summary_of_all_nan_and_single_value():
    s = M.summarize(np.array([np.nan, np.nan]))
    assert math.isnan(s["mean"]) and s["n"] == 0 and s["n_nan"] == 2
    one = M.summarize(np.array([0.4]))
    assert one["mean"] == one["median"] == one["ci95_low"] == one["ci95_high"] == 0.4 and one["std"] == 0.0
