"""Tests for the prediction targets (eps, x0, v) and the mask scale of guided_diffusion.diffusion.gaussian_diffusion."""
import pytest
import torch

from dpm_solver import NoiseScheduleVP
from guided_diffusion.diffusion.gaussian_diffusion import (PREDICTIONS, create_diffusion, training_target,
                                                           x0_and_eps)

F64 = torch.float64


def level(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 1, 5, 5, generator=g, dtype=F64)
    eps = torch.randn(4, 1, 5, 5, generator=g, dtype=F64)
    ab = torch.tensor([0.999, 0.7, 0.2, 1e-3], dtype=F64).reshape(-1, 1, 1, 1)
    return x0, eps, ab.sqrt(), (1 - ab).sqrt()


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_each_target_converts_back_to_x0_and_eps_exactly(kind):
    x0, eps, a, s = level()
    x_t = a * x0 + s * eps
    got_x0, got_eps = x0_and_eps(kind, training_target(kind, x0, eps, a, s), x_t, a, s)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)


def test_targets_are_the_closed_forms_and_convert_into_each_other():
    x0, eps, a, s = level(1)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0  # Salimans & Ho 2022, §4
    assert torch.equal(training_target("eps", x0, eps, a, s), eps)
    assert torch.equal(training_target("x0", x0, eps, a, s), x0)
    torch.testing.assert_close(training_target("v", x0, eps, a, s), v, rtol=0, atol=1e-12)
    # a v-model's x0 and eps, handed on as an x0- or eps-model's prediction, give the same pair again
    for kind in PREDICTIONS:
        pred = training_target(kind, *x0_and_eps("v", v, x_t, a, s), a, s)
        torch.testing.assert_close(x0_and_eps(kind, pred, x_t, a, s)[0], x0, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="--prediction"):
        x0_and_eps("score", v, x_t, a, s)


def test_alpha_sigma_reads_the_table_and_interpolates_as_dpm_solver():
    d = create_diffusion(100, "cosine", False)
    t = torch.tensor([0, 7, 99])
    a, s = d.alpha_sigma(t, 4)
    torch.testing.assert_close(a.flatten(), d.sqrt_ac[t], rtol=0, atol=1e-12)
    torch.testing.assert_close(s.flatten(), d.sqrt_one_minus_ac[t], rtol=0, atol=1e-12)
    schedule = NoiseScheduleVP("discrete", betas=d.betas)
    real = torch.tensor([0.0, 3.25, 50.5, 98.9], dtype=F64)
    a, s = d.alpha_sigma(real, 1)
    tc = (real + 1) / 100  # the wrapper's t_input = (t_c - 1/N) N
    torch.testing.assert_close(a, schedule.marginal_alpha(tc), rtol=1e-6, atol=0)
    torch.testing.assert_close(s, schedule.marginal_std(tc), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_training_loss_is_zero_for_the_exact_target_at_any_mask_scale(kind):
    d = create_diffusion(50, "linear", False, prediction=kind, mask_scale=0.1)
    mask = (torch.rand(3, 1, 6, 6) > 0.5).float()
    x0 = d.mask_to_x0(mask)
    torch.testing.assert_close(x0.abs(), torch.full_like(x0, 0.1))
    noise, t = torch.randn_like(x0), torch.tensor([0, 20, 49])
    x_t = d.q_sample(x0, t, noise)
    a, s = d.sqrt_ac[t].reshape(-1, 1, 1, 1).float(), d.sqrt_one_minus_ac[t].reshape(-1, 1, 1, 1).float()
    out = d.training_losses(training_target(kind, x0, noise, a, s), x0, x_t, t, noise)
    assert out["mse"].max() < 1e-10
    assert d.training_losses(torch.zeros_like(x0), x0, x_t, t, noise)["mse"].min() > 1e-4


def test_mask_scale_maps_masks_and_probabilities():
    d = create_diffusion(20, "linear", False, mask_scale=0.25)
    mask = torch.tensor([0.0, 1.0, 0.5])
    torch.testing.assert_close(d.mask_to_x0(mask), torch.tensor([-0.25, 0.25, 0.0]))
    torch.testing.assert_close(d.x0_to_probability(torch.tensor([-0.25, 0.25, 0.0, 3.0])),
                               torch.tensor([0.0, 1.0, 0.5, 1.0]))
    torch.testing.assert_close(d.clip_x0(torch.tensor([-1.0, 0.1, 1.0])), torch.tensor([-0.25, 0.1, 0.25]))
    with pytest.raises(ValueError, match="--mask_scale"):
        create_diffusion(20, "linear", False, mask_scale=0)
    with pytest.raises(ValueError, match="--prediction"):
        create_diffusion(20, "linear", False, prediction="score")


def test_learned_sigma_vb_term_is_exact_for_every_target_and_scale():
    """With the true posterior variance (v = -1) and the exact target, the KL term is zero at t > 0."""
    for kind in PREDICTIONS:
        d = create_diffusion(100, "linear", True, prediction=kind, mask_scale=0.1)
        x0 = d.mask_to_x0((torch.rand(3, 1, 4, 4) > 0.5).float())
        noise, t = torch.randn_like(x0), torch.tensor([0, 10, 99])
        x_t = d.q_sample(x0, t, noise)
        a, s = d.sqrt_ac[t].reshape(-1, 1, 1, 1).float(), d.sqrt_one_minus_ac[t].reshape(-1, 1, 1, 1).float()
        out = torch.cat([training_target(kind, x0, noise, a, s), -torch.ones_like(x0)], 1)
        vb = d.training_losses(out, x0, x_t, t, noise)["vb"]
        assert vb[1:].abs().max() < 1e-3 and torch.isfinite(vb[0])
