"""Tests for guided_diffusion.diffusion.gaussian_diffusion: schedules, q_sample, posterior, steps and losses."""
import math

import numpy as np
import pytest
import torch

from guided_diffusion.diffusion.gaussian_diffusion import (GaussianDiffusion, create_diffusion, dice_bce_loss,
                                                           discretized_gaussian_log_likelihood,
                                                           get_named_beta_schedule, normal_kl)


def test_linear_schedule_matches_ddpm_endpoints_and_rescales():
    b = get_named_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b50 = get_named_beta_schedule("linear", 50)
    assert b50[0] == pytest.approx(1e-4 * 20) and b50[-1] == pytest.approx(0.02 * 20)


def test_cosine_schedule_alpha_bar_closed_form():
    n = 200
    ac = np.cumprod(1 - get_named_beta_schedule("cosine", n))
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f((i + 1) / n) / f(0) for i in range(n)])
    # identical until the 0.999 clip bites in the very last steps
    np.testing.assert_allclose(ac[:-2], expected[:-2], rtol=1e-10)


def test_bad_schedule_names_flag():
    with pytest.raises(ValueError, match="--noise_schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_q_sample_marginal_statistics():
    d = create_diffusion(100, "linear", False)
    torch.manual_seed(0)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    for step in (0, 37, 99):
        t = torch.full((x0.shape[0],), step)
        xt = d.q_sample(x0, t)
        ab = d.alphas_cumprod[step].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=4 * math.sqrt((1 - ab) / 20000))
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.05)


def test_posterior_matches_bayes_rule():
    d = create_diffusion(50, "cosine", False)
    x0 = torch.tensor([[0.3], [-1.0], [1.0]], dtype=torch.float64)
    xt = torch.tensor([[0.1], [0.5], [-2.0]], dtype=torch.float64)
    for step in (1, 10, 49):
        t = torch.full((3,), step)
        mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
        b = d.betas[step].item()
        ab_prev = d.alphas_cumprod[step - 1].item()
        # q(x_{t-1}|x0) = N(sqrt(ab_prev) x0, 1 - ab_prev), q(x_t|x_{t-1}) = N(sqrt(1-b) x_{t-1}, b)
        prec = 1 / (1 - ab_prev) + (1 - b) / b
        exp_var = 1 / prec
        exp_mean = exp_var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - b) * xt / b)
        torch.testing.assert_close(var, torch.full_like(var, exp_var))
        torch.testing.assert_close(mean, exp_mean)


def test_learned_variance_interpolates_between_beta_and_beta_tilde():
    d = create_diffusion(100, "linear", True)
    x = torch.zeros(2, 1, 4, 4)
    t = torch.tensor([5, 80])
    for v, expect in ((1.0, d.betas), (-1.0, torch.exp(d.posterior_log_variance_clipped))):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)
        p = d.p_mean_variance(out, x, t)
        torch.testing.assert_close(p["variance"][:, 0, 0, 0], expect[t].float())


def test_perfect_eps_recovers_x0_and_ancestral_chain_lands_on_data():
    d = create_diffusion(40, "linear", False)
    c = 0.8  # point-mass data: the exact eps is (x_t - sqrt(ab) c) / sqrt(1 - ab)
    torch.manual_seed(1)
    x = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    for step in reversed(range(d.num_timesteps)):
        t = torch.full((64,), step)
        eps = (x - d.sqrt_ac[step] * c) / d.sqrt_one_minus_ac[step]
        out = d.p_sample_step(eps, x, t)
        torch.testing.assert_close(out.pred_xstart, torch.full_like(x, c))
        x = out.sample
    torch.testing.assert_close(x, torch.full_like(x, c))


def test_ddim_step_deterministic_and_exact_for_point_mass():
    d = create_diffusion(100, "cosine", False)
    c = -0.4
    x = torch.randn(8, 1, 3, 3, dtype=torch.float64)
    steps = [99, 74, 49, 24, 0]
    for cur, nxt in zip(steps, steps[1:] + [-1]):
        t = torch.full((8,), cur)
        eps = (x - d.sqrt_ac[cur] * c) / d.sqrt_one_minus_ac[cur]
        x = d.ddim_step(eps, x, t, torch.full((8,), nxt)).sample
        if nxt >= 0:  # on the exact ODE path x_s = sqrt(ab_s) c + sqrt(1-ab_s) eps, eps constant
            e = (x - d.sqrt_ac[nxt] * c) / d.sqrt_one_minus_ac[nxt]
            torch.testing.assert_close(e, eps)
    torch.testing.assert_close(x, torch.full_like(x, c))


def test_normal_kl_matches_torch_distributions():
    m1, lv1, m2, lv2 = torch.randn(4, dtype=torch.float64).unbind()
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, lv1.mul(0.5).exp()),
                                            torch.distributions.Normal(m2, lv2.mul(0.5).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)


def test_discretized_likelihood_against_exact_normal_cdf():
    x = torch.tensor([-1.0, 0.2, 1.0])
    mean = torch.tensor([-0.9, 0.21, 0.95])
    log_scale = torch.log(torch.tensor([0.05, 0.02, 0.1]))
    n = torch.distributions.Normal(mean, log_scale.exp())
    ref = torch.stack([n.cdf(x[0] + 1 / 255)[0], (n.cdf(x + 1 / 255) - n.cdf(x - 1 / 255))[1],
                       1 - n.cdf(x - 1 / 255)[2]]).log()
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=5e-3)


def test_training_losses_zero_for_exact_eps_and_vb_only_with_learned_sigma():
    x0 = torch.randn(3, 1, 4, 4).sign()
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 99])
    d = create_diffusion(100, "linear", False)
    xt = d.q_sample(x0, t, noise)
    out = d.training_losses(noise, x0, xt, t, noise)
    assert set(out) == {"mse", "loss"} and torch.all(out["mse"] == 0)
    dl = create_diffusion(100, "linear", True)
    # v = -1 selects beta tilde, the true posterior variance: KL is zero when eps is exact (t > 0)
    model_out = torch.cat([noise, -torch.ones_like(x0)], 1)
    out = dl.training_losses(model_out, x0, xt, t, noise)
    assert out["vb"][1:].abs().max() < 1e-4
    assert out["vb"][0] > 0  # decoder NLL at t = 0
    resc = GaussianDiffusion(dl.betas.numpy(), learn_sigma=True, rescale_learned_sigmas=True)
    model_out = torch.cat([noise, torch.zeros_like(x0)], 1)
    a = dl.training_losses(model_out, x0, xt, t, noise)["vb"]
    b = resc.training_losses(model_out, x0, xt, t, noise)["vb"]
    torch.testing.assert_close(b, a * 0.1)


def test_vb_gradient_reaches_only_variance_channel():
    d = create_diffusion(100, "linear", True)
    x0 = torch.randn(2, 1, 4, 4).sign()
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 50])
    xt = d.q_sample(x0, t, noise)
    eps = torch.zeros_like(x0, requires_grad=True)
    var = torch.zeros_like(x0, requires_grad=True)
    d.training_losses(torch.cat([eps, var], 1), x0, xt, t, noise)["vb"].sum().backward()
    assert eps.grad.abs().sum() == 0 and var.grad.abs().sum() > 0


def test_wrong_output_channels_is_a_clear_error():
    d = create_diffusion(10, "linear", True)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="learn_sigma"):
        d.p_mean_variance(x, x, torch.tensor([1]))


def test_rescale_timesteps():
    d = GaussianDiffusion(get_named_beta_schedule("linear", 250), rescale_timesteps=True)
    assert d.scale_timesteps(torch.tensor([0, 125])).tolist() == [0.0, 500.0]


def test_dice_bce_perfect_vs_wrong():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    good = dice_bce_loss((target * 2 - 1) * 20, target)
    bad = dice_bce_loss(-(target * 2 - 1) * 20, target)
    assert good.item() < 0.01 and bad.item() > 1.9
