"""Fusing the N sampled masks of one image into one probability map, and their uncertainty.

Members are per-member foreground probabilities in [0, 1] (a diffusion sample mapped from
[-1, 1] to [0, 1] and clamped) or binary masks, shaped (N, H, W) for one image or
(B, N, H, W) for a batch of images. Every function works on the batched form; an unbatched
input gives an unbatched output (the leading B axis dropped).

Conventions (shared with `outputs.py`, which imports `threshold`):
- A pixel is foreground when its probability is strictly greater than 0.5 (`threshold`), so a
  tie (e.g. a 2-of-4 vote) is background.
- Uncertainty maps are in [0, 1] so that `outputs.to_uint8` spends the full 0..255 range on them.
"""
from __future__ import annotations

import torch
from torch import Tensor

FUSIONS = ("mean", "vote", "staple")
UNCERTAINTIES = ("std", "entropy")

STAPLE_INIT = 0.99  # initial sensitivity and specificity of every member (raters assumed good)
STAPLE_EPS = 1e-6  # p, q and the prior are kept in (eps, 1 - eps) so no log(0) appears


def _as_batched(members: Tensor) -> tuple[Tensor, bool]:
    """Return members as (B, N, H, W) and whether the input lacked the batch axis."""
    if not torch.is_tensor(members):
        members = torch.as_tensor(members)
    if members.dim() == 3:
        return members.unsqueeze(0), True
    if members.dim() == 4:
        return members, False
    raise ValueError(f"members must be (N, H, W) or (B, N, H, W), got shape {tuple(members.shape)}")


def _unbatch(x: Tensor, unbatched: bool) -> Tensor:
    """Drop the batch axis again when the caller passed a single image."""
    return x[0] if unbatched else x


def _float(members: Tensor) -> Tensor:
    """Members as a floating tensor (bool/integer masks become 0.0/1.0)."""
    return members if members.is_floating_point() else members.float()


def threshold(prob: Tensor, level: float = 0.5) -> Tensor:
    """Binary mask `prob > level` (strict, so an exact tie at 0.5 is background)."""
    if not torch.is_tensor(prob):
        prob = torch.as_tensor(prob)
    if prob.dtype == torch.bool:
        return prob
    return prob > level


def fuse_mean(members: Tensor) -> Tensor:
    """Per-pixel mean of the member probabilities: the Monte-Carlo estimate of p(foreground)."""
    m, unbatched = _as_batched(members)
    return _unbatch(_float(m).mean(dim=1).clamp(0.0, 1.0), unbatched)


def fuse_vote(members: Tensor) -> Tensor:
    """Fraction of members whose own mask (member > 0.5) is foreground (majority vote when > 0.5)."""
    m, unbatched = _as_batched(members)
    return _unbatch(threshold(m).float().mean(dim=1), unbatched)


def _staple_log_odds(d: Tensor, log_prior_odds: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """log(a_i / b_i) of the STAPLE E-step (Warfield et al. 2004) for d (B,N,P), p, q (B,N).

    log a_i = log f + sum_j D_ij log p_j + (1 - D_ij) log(1 - p_j)
    log b_i = log(1 - f) + sum_j (1 - D_ij) log q_j + D_ij log(1 - q_j)
    so log a_i - log b_i = log f/(1-f) + sum_j w_bg_j + sum_j D_ij (w_fg_j - w_bg_j): one contraction.
    """
    w_fg = torch.log(p) - torch.log1p(-q)  # weight of D_ij = 1 in log a - log b
    w_bg = torch.log1p(-p) - torch.log(q)  # weight of D_ij = 0 in log a - log b
    const = log_prior_odds + w_bg.sum(dim=1)
    return const[:, None] + torch.einsum("bnp,bn->bp", d, w_fg - w_bg)


def _staple_m_step(d: Tensor, d_sum: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """STAPLE M-step (Warfield et al. 2004): p_j = sum W D / sum W, q_j = sum (1-W)(1-D) / sum (1-W).

    sum_i (1-W_i)(1-D_ij) is expanded as sum(1-W) - sum_i D_ij + sum_i W_i D_ij (d_sum = sum_i D_ij).
    """
    tp = torch.einsum("bnp,bp->bn", d, w)
    w_sum = w.sum(dim=1, keepdim=True)
    bg_sum = d.shape[2] - w_sum
    tn = bg_sum - d_sum + tp
    p = tp / w_sum.clamp_min(eps)
    q = tn / bg_sum.clamp_min(eps)
    return p.clamp(eps, 1.0 - eps), q.clamp(eps, 1.0 - eps)


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 for the EM sums where the device supports it (MPS does not), float32 otherwise."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def staple(
    binary: Tensor, max_iter: int = 50, tol: float = 1e-6, prior: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Binary STAPLE EM (Warfield, Zou & Wells 2004, IEEE TMI 23(7):903-921): consensus + rater quality.

    Returns (W, p, q): W the posterior probability of foreground per pixel (B, H, W), p and q the
    estimated sensitivity and specificity of each member (B, N). Float members are binarised with
    `threshold` (> 0.5). The prior f is the image's global foreground fraction over all members
    unless `prior` is given. EM starts from p = q = STAPLE_INIT and stops per image once p and q
    move less than `tol` (max-abs) or after `max_iter` M-steps; the returned W is the E-step under
    the returned p, q. Images whose members are all empty (all full) get W = 0 (W = 1) exactly and,
    by convention, p = q = 1. This is the paper's EM, not the square of the mean.
    """
    m, unbatched = _as_batched(binary)
    b, n = m.shape[:2]
    out_dtype = m.dtype if m.is_floating_point() else torch.float32
    dt = _work_dtype(m)
    d = threshold(m).to(dt).reshape(b, n, -1)
    eps = STAPLE_EPS

    d_sum = d.sum(dim=2)
    frac = d_sum.sum(dim=1) / d[0].numel()
    empty, full = frac <= 0.0, frac >= 1.0
    f = frac if prior is None else torch.full_like(frac, float(prior))
    f = f.clamp(eps, 1.0 - eps)
    log_prior_odds = torch.log(f) - torch.log1p(-f)

    p = torch.full((b, n), STAPLE_INIT, dtype=dt, device=d.device)
    q = p.clone()
    active = ~(empty | full)  # images still iterating
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        w = torch.sigmoid(_staple_log_odds(d, log_prior_odds, p, q))
        p_new, q_new = _staple_m_step(d, d_sum, w, eps)
        step = torch.maximum((p_new - p).abs().amax(dim=1), (q_new - q).abs().amax(dim=1))
        p = torch.where(active[:, None], p_new, p)
        q = torch.where(active[:, None], q_new, q)
        active = active & (step >= tol)

    w = torch.sigmoid(_staple_log_odds(d, log_prior_odds, p, q))
    degenerate = (empty | full)[:, None]
    w = torch.where(degenerate, full[:, None].to(dt).expand_as(w), w)
    p = torch.where(degenerate, torch.ones_like(p), p)
    q = torch.where(degenerate, torch.ones_like(q), q)

    w = w.reshape(b, *m.shape[2:]).to(out_dtype)
    return _unbatch(w, unbatched), _unbatch(p.to(out_dtype), unbatched), _unbatch(q.to(out_dtype), unbatched)


def fuse(members: Tensor, method: str = "mean") -> Tensor:
    """Fused foreground probability in [0, 1], (B, N, H, W) -> (B, H, W), by mean, vote or STAPLE."""
    if method == "mean":
        return fuse_mean(members)
    if method == "vote":
        return fuse_vote(members)
    if method == "staple":
        return staple(members)[0]
    raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}; got {method!r}")


def _binary_entropy_bits(p: Tensor) -> Tensor:
    """H(p) = -p log2 p - (1 - p) log2(1 - p) in bits, with 0 log 0 = 0, so H is in [0, 1]."""
    nats = -(torch.special.xlogy(p, p) + torch.special.xlogy(1.0 - p, 1.0 - p))
    return (nats / torch.log(torch.tensor(2.0, dtype=p.dtype, device=p.device))).clamp(0.0, 1.0)


def uncertainty(members: Tensor, kind: str = "std") -> Tensor:
    """Per-pixel disagreement of the members in [0, 1], (B, N, H, W) -> (B, H, W).

    std: 2 x the population standard deviation (ddof = 0) across members. For values in [0, 1] the
    std is at most 0.5 (half the members at 0, half at 1), so the factor 2 maps that maximum to 1
    and the 8-bit map uses its full range; divide by 2 to get the raw std.
    entropy: binary entropy in bits of the mean probability (predictive entropy), 1 at a mean of 0.5.
    """
    m, unbatched = _as_batched(members)
    m = _float(m)
    if kind == "std":
        out = (2.0 * m.std(dim=1, correction=0)).clamp(0.0, 1.0)
    elif kind == "entropy":
        out = _binary_entropy_bits(m.mean(dim=1).clamp(0.0, 1.0))
    else:
        raise ValueError(f"--uncertainty must be one of {', '.join(UNCERTAINTIES)}; got {kind!r}")
    return _unbatch(out, unbatched)
