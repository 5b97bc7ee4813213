"""Tests of guided_diffusion.sampling.ensemble: fusion (mean, vote, STAPLE), thresholding, uncertainty."""
import math

import numpy as np
import pytest
import torch

from guided_diffusion.sampling.ensemble import (STAPLE_EPS, STAPLE_INIT, fuse, fuse_mean, fuse_vote, staple,
                                                threshold, uncertainty)


# ---------------------------------------------------------------- an independent STAPLE reference
def reference_staple(d: np.ndarray, max_iter: int = 50, tol: float = 1e-6, prior=None):
    """Plain-loop binary STAPLE EM for one image; d is (N, P) of 0/1 (Warfield et al. 2004)."""
    n, npix = d.shape
    eps = STAPLE_EPS
    f = d.mean() if prior is None else prior
    f = min(max(f, eps), 1 - eps)
    p = [STAPLE_INIT] * n
    q = [STAPLE_INIT] * n

    def e_step(p, q):
        w = np.zeros(npix)
        for i in range(npix):
            a, b = f, 1 - f
            for j in range(n):
                if d[j, i]:
                    a *= p[j]
                    b *= 1 - q[j]
                else:
                    a *= 1 - p[j]
                    b *= q[j]
            w[i] = a / (a + b)
        return w

    for _ in range(max_iter):
        w = e_step(p, q)
        p_new, q_new = [], []
        for j in range(n):
            tp = sum(w[i] for i in range(npix) if d[j, i])
            tn = sum(1 - w[i] for i in range(npix) if not d[j, i])
            p_new.append(min(max(tp / w.sum(), eps), 1 - eps))
            q_new.append(min(max(tn / (1 - w).sum(), eps), 1 - eps))
        step = max(max(abs(a - b) for a, b in zip(p_new, p)), max(abs(a - b) for a, b in zip(q_new, q)))
        p, q = p_new, q_new
        if step < tol:
            break
    return e_step(p, q), np.array(p), np.array(q)


def disk(size: int, radius: float, center=None) -> np.ndarray:
    """A boolean disk of `radius` in a size x size image."""
    cy, cx = center if center is not None else (size / 2, size / 2)
    yy, xx = np.mgrid[:size, :size]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 < radius**2


def noisy_raters(truth: np.ndarray, sens, spec, rng) -> np.ndarray:
    """Raters that keep a foreground pixel with prob sens_j and a background pixel with prob spec_j."""
    u = rng.random((len(sens),) + truth.shape)
    keep = np.where(truth[None], u < np.asarray(sens)[:, None, None], u < np.asarray(spec)[:, None, None])
    return np.where(keep, truth[None], ~truth[None])


# ---------------------------------------------------------------- STAPLE
def test_staple_matches_plain_numpy_reference():
    rng = np.random.default_rng(0)
    truth = np.stack([disk(12, 4.0), disk(12, 3.0, (4, 7)), disk(12, 5.5)])
    members = np.stack([noisy_raters(t, [0.9, 0.8, 0.95, 0.7], [0.9, 0.95, 0.85, 0.8], rng) for t in truth])
    w, p, q = staple(torch.from_numpy(members))
    assert w.shape == (3, 12, 12) and p.shape == (3, 4) and q.shape == (3, 4)
    for b in range(3):
        w_ref, p_ref, q_ref = reference_staple(members[b].reshape(4, -1).astype(int))
        np.testing.assert_allclose(w[b].numpy().ravel(), w_ref, atol=1e-5)
        np.testing.assert_allclose(p[b].numpy(), p_ref, atol=1e-5)
        np.testing.assert_allclose(q[b].numpy(), q_ref, atol=1e-5)


def test_staple_reference_with_given_prior_and_float_members():
    rng = np.random.default_rng(1)
    members = noisy_raters(disk(10, 3.5), [0.85, 0.9, 0.8], [0.9, 0.9, 0.95], rng)
    soft = torch.from_numpy(np.where(members, 0.8, 0.1).astype(np.float32))  # binarised at > 0.5
    w, p, q = staple(soft, prior=0.3, max_iter=7)
    w_ref, p_ref, q_ref = reference_staple(members.reshape(3, -1).astype(int), max_iter=7, prior=0.3)
    np.testing.assert_allclose(w.numpy().ravel(), w_ref, atol=1e-5)
    np.testing.assert_allclose(p.numpy(), p_ref, atol=1e-5)
    np.testing.assert_allclose(q.numpy(), q_ref, atol=1e-5)


def test_staple_recovers_known_rater_quality_and_beats_vote():
    rng = np.random.default_rng(2)
    truth = disk(200, 60.0)
    sens = [0.95, 0.90, 0.85, 0.92, 0.55]
    spec = [0.98, 0.97, 0.99, 0.95, 0.60]  # the last rater is bad
    members = torch.from_numpy(noisy_raters(truth, sens, spec, rng))
    w, p, q = staple(members)
    np.testing.assert_allclose(p.numpy(), sens, atol=0.02)
    np.testing.assert_allclose(q.numpy(), spec, atol=0.02)
    truth_t = torch.from_numpy(truth)
    staple_errors = (threshold(w) != truth_t).sum().item()
    vote_errors = (threshold(fuse_vote(members)) != truth_t).sum().item()
    assert staple_errors < vote_errors, (staple_errors, vote_errors)


def test_staple_identical_raters_return_their_mask():
    mask = torch.from_numpy(disk(32, 9.0))
    w, p, q = staple(mask[None].repeat(4, 1, 1))
    torch.testing.assert_close(w, mask.float(), atol=1e-6, rtol=0)
    assert torch.all(p > 0.999) and torch.all(q > 0.999)


def test_staple_all_empty_and_all_full_members():
    empty = torch.zeros(2, 5, 16, 16)
    w, p, q = staple(empty)
    assert torch.equal(w, torch.zeros(2, 16, 16))
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    w, p, q = staple(torch.ones(5, 16, 16, dtype=torch.bool))
    assert torch.equal(w, torch.ones(16, 16)) and torch.isfinite(p).all() and torch.isfinite(q).all()


def test_staple_degenerate_image_does_not_disturb_its_batch():
    rng = np.random.default_rng(3)
    good = torch.from_numpy(noisy_raters(disk(20, 6.0), [0.9, 0.8, 0.85], [0.95, 0.9, 0.9], rng))
    batch = torch.stack([good, torch.zeros_like(good), torch.ones_like(good)])
    w, p, q = staple(batch)
    w1, p1, q1 = staple(good)
    torch.testing.assert_close(w[0], w1)
    torch.testing.assert_close(p[0], p1)
    torch.testing.assert_close(q[0], q1)
    assert torch.equal(w[1], torch.zeros(20, 20)) and torch.equal(w[2], torch.ones(20, 20))
    assert not torch.isnan(w).any()


def test_staple_is_not_the_square_of_the_mean():
    # The public MedSegDiff "staple" returns mean(members)**2: a 2-of-3 majority gives 0.44 < 0.5,
    # erasing a pixel that the raters (all reliable elsewhere) put in the foreground.
    rng = np.random.default_rng(4)
    truth = disk(64, 20.0)
    members = noisy_raters(truth, [0.9, 0.9, 0.9], [0.97, 0.97, 0.97], rng)
    m = torch.from_numpy(members).float()
    w, _, _ = staple(m)
    mean_sq = m.mean(0) ** 2
    two_of_three = m.sum(0) == 2
    assert two_of_three.any()
    assert torch.allclose(mean_sq[two_of_three], torch.tensor(4 / 9))
    assert torch.all(w[two_of_three] > 0.5)
    assert (w - mean_sq).abs().max() > 0.4
    truth_t = torch.from_numpy(truth)
    assert (threshold(w) != truth_t).sum() < (threshold(mean_sq) != truth_t).sum()


# ---------------------------------------------------------------- mean, vote, fuse, threshold
def test_mean_and_vote_closed_forms():
    members = torch.tensor([[[0.2, 0.9]], [[0.6, 0.4]], [[0.7, 0.5]], [[0.1, 1.0]]])  # (N=4, 1, 2)
    torch.testing.assert_close(fuse_mean(members), torch.tensor([[0.4, 0.7]]))
    torch.testing.assert_close(fuse_vote(members), torch.tensor([[0.5, 0.5]]))  # 0.5 itself is not > 0.5
    torch.testing.assert_close(fuse(members, "vote"), fuse_vote(members))
    torch.testing.assert_close(fuse(members), fuse_mean(members))
    assert fuse_mean(torch.ones(3, 2, 2, dtype=torch.bool)).dtype == torch.float32


def test_fuse_rejects_unknown_method_naming_the_flag():
    with pytest.raises(ValueError, match="--fusion"):
        fuse(torch.zeros(2, 3, 4, 4), "median")


def test_fuse_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fuse(torch.zeros(4, 4))


@pytest.mark.parametrize("method", ["mean", "vote", "staple"])
def test_fuse_batched_equals_unbatched_and_in_unit_range(method):
    torch.manual_seed(0)
    members = torch.rand(3, 5, 9, 11)
    batched = fuse(members, method)
    assert batched.shape == (3, 9, 11)
    assert batched.min() >= 0 and batched.max() <= 1
    for b in range(3):
        torch.testing.assert_close(batched[b], fuse(members[b], method))


def test_threshold_is_strict_at_half():
    prob = torch.tensor([0.0, 0.4999, 0.5, 0.5001, 1.0])
    assert threshold(prob).tolist() == [False, False, False, True, True]
    assert threshold(prob, 0.3).tolist() == [False, True, True, True, True]
    assert threshold(prob).dtype == torch.bool


# ---------------------------------------------------------------- uncertainty
def test_uncertainty_std_closed_forms():
    members = torch.tensor([0.0, 1.0]).reshape(2, 1, 1)
    assert uncertainty(members, "std").item() == pytest.approx(1.0)  # raw std 0.5, scaled by 2
    members = torch.tensor([0.2, 0.4, 0.9]).reshape(3, 1, 1)
    assert uncertainty(members).item() == pytest.approx(2 * np.std([0.2, 0.4, 0.9]), abs=1e-6)
    assert uncertainty(torch.full((4, 3, 3), 0.7)).abs().max().item() < 1e-6


def test_uncertainty_entropy_closed_forms():
    assert uncertainty(torch.tensor([0.0, 1.0]).reshape(2, 1, 1), "entropy").item() == pytest.approx(1.0)
    assert uncertainty(torch.zeros(3, 2, 2), "entropy").abs().max().item() == 0.0
    assert uncertainty(torch.ones(3, 2, 2), "entropy").abs().max().item() == 0.0
    m = 0.2
    expected = -(m * math.log2(m) + (1 - m) * math.log2(1 - m))
    assert uncertainty(torch.full((2, 1, 1), m), "entropy").item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["std", "entropy"])
def test_uncertainty_batched_equals_unbatched_and_in_unit_range(kind):
    torch.manual_seed(1)
    members = torch.rand(2, 6, 7, 5)
    u = uncertainty(members, kind)
    assert u.shape == (2, 7, 5) and u.min() >= 0 and u.max() <= 1
    for b in range(2):
        torch.testing.assert_close(u[b], uncertainty(members[b], kind))


def test_uncertainty_rejects_unknown_kind_naming_the_flag():
    with pytest.raises(ValueError, match="--uncertainty"):
        uncertainty(torch.zeros(2, 3, 3), "variance")
