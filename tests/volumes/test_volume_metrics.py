"""evaluation/volumes.py: 3-D metrics in mm against brute force, and Dice of a volume against its slices."""
import math

import numpy as np
import pytest
from scipy import ndimage

from guided_diffusion.evaluation import metrics
from guided_diffusion.evaluation.volumes import surface, surface_distances_mm, volume_metrics

SPACING = (1.0, 1.2, 2.5)


def blob(shape, seed, fill=0.35):
    """A random lumpy 3-D mask (thresholded smoothed noise)."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 1.5) > np.quantile(ndimage.gaussian_filter(rng.random(shape), 1.5),
                                                                          1 - fill)


def brute_force(pred, gt, spacing):
    """Every surface voxel's distance (mm, between voxel centres) to the nearest surface voxel of the other mask,
    from all pairwise distances, both ways pooled; the surface found by checking the 6 face-neighbours by hand."""
    def faces(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    a, b = faces(pred), faces(gt)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return np.concatenate([d.min(1), d.min(0)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_and_assd_in_mm_match_brute_force(seed):
    shape = (14, 12, 9)
    pred, gt = blob(shape, seed), blob(shape, seed + 100, fill=0.25)
    d = brute_force(pred, gt, SPACING)
    got = surface_distances_mm(pred, gt, SPACING)
    np.testing.assert_allclose(np.sort(got), np.sort(d), rtol=1e-12, atol=1e-12)
    m = volume_metrics(pred, gt, SPACING)
    assert m["hd95"] == pytest.approx(np.percentile(d, 95), rel=1e-12)
    assert m["assd"] == pytest.approx(d.mean(), rel=1e-12)
    iso = volume_metrics(pred, gt, (1.0, 1.0, 1.0))  # the spacing matters: not the voxel distances
    assert iso["hd95"] != pytest.approx(m["hd95"])


def test_surface_distances_of_known_shapes():
    a = np.zeros((5, 5, 9), bool)
    b = np.zeros_like(a)
    a[2, 2, 2], b[2, 2, 6] = True, True  # one voxel each, 4 slices apart along z: 4 x 2.5 mm
    assert surface_distances_mm(a, b, SPACING).tolist() == [10.0, 10.0]
    assert math.isnan(volume_metrics(a, np.zeros_like(a), SPACING)["hd95"])  # undefined with an empty mask
    cube = np.zeros((6, 6, 6), bool)
    cube[1:5, 1:5, 1:5] = True
    assert surface(cube).sum() == 4 ** 3 - 2 ** 3  # the interior 2x2x2 is not surface


def test_dice_of_a_volume_equals_its_slices_voxel_counts():
    shape = (16, 14, 10)
    pred, gt = blob(shape, 5), blob(shape, 6)
    tp = fp = fn = 0
    for z in range(shape[2]):  # the stacked slices' counts
        c = metrics.confusion(pred[:, :, z], gt[:, :, z])
        tp, fp, fn = tp + c.tp, fp + c.fp, fn + c.fn
    m = volume_metrics(pred, gt, SPACING)
    assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    assert m["iou"] == pytest.approx(tp / (tp + fp + fn), rel=1e-12)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn), rel=1e-12)
    slice_dice = [metrics.dice(metrics.confusion(pred[:, :, z], gt[:, :, z])) for z in range(shape[2])]
    assert m["dice"] != pytest.approx(np.mean(slice_dice))  # a volume's Dice is not the mean of its slices'
