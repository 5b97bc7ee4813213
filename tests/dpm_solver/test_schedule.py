"""Tests for dpm_solver.schedule: NoiseScheduleVP's discrete knots, lambda inverse, and the linear closed form."""
import numpy as np
import torch
from gaussian_reference import F64

from dpm_solver import NoiseScheduleVP


def test_discrete_schedule_knots(discrete_ns, betas):
    alphas_cumprod = np.cumprod(1.0 - betas)
    n = np.arange(1, 1001)
    t = torch.tensor(n / 1000.0, dtype=F64)
    alpha = discrete_ns.marginal_alpha(t).numpy()
    np.testing.assert_allclose(alpha, np.sqrt(alphas_cumprod), rtol=1e-12)
    np.testing.assert_allclose(discrete_ns.marginal_std(t).numpy(), np.sqrt(1 - alphas_cumprod), rtol=1e-10)
    assert discrete_ns.T == 1.0 and discrete_ns.total_N == 1000
    # log alpha is linear between the knots
    mid = torch.tensor([(n0 + 0.5) / 1000.0 for n0 in (1, 10, 500)], dtype=F64)
    la = 0.5 * np.log(alphas_cumprod)
    expected = [(la[n0 - 1] + la[n0]) / 2 for n0 in (1, 10, 500)]
    np.testing.assert_allclose(discrete_ns.marginal_log_mean_coeff(mid).numpy(), expected, rtol=1e-12)


def test_inverse_lambda_roundtrip(discrete_ns, linear_ns):
    t = torch.cat([torch.linspace(1e-3, 1.0, 997, dtype=F64), torch.tensor([0.3, 0.05, 1e-3, 1.0], dtype=F64)])
    np.testing.assert_allclose(discrete_ns.inverse_lambda(discrete_ns.marginal_lambda(t)).numpy(), t.numpy(),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(linear_ns.inverse_lambda(linear_ns.marginal_lambda(t)).numpy(), t.numpy(),
                               rtol=1e-10, atol=1e-12)
    # float32 on the way through keeps ~single precision
    t32 = t.float()
    back = discrete_ns.inverse_lambda(discrete_ns.marginal_lambda(t32))
    assert back.dtype == torch.float32
    np.testing.assert_allclose(back.double().numpy(), t.numpy(), rtol=2e-4, atol=1e-6)


def test_betas_and_alphas_cumprod_give_same_schedule(discrete_ns, betas):
    ns2 = NoiseScheduleVP("discrete", alphas_cumprod=np.cumprod(1.0 - betas))
    t = torch.rand(257, dtype=F64, generator=torch.Generator().manual_seed(3)) * (1 - 1e-3) + 1e-3
    for name in ("marginal_log_mean_coeff", "marginal_alpha", "marginal_std", "marginal_lambda"):
        np.testing.assert_allclose(getattr(ns2, name)(t).numpy(), getattr(discrete_ns, name)(t).numpy(), rtol=1e-11)
    lam = discrete_ns.marginal_lambda(t)
    np.testing.assert_allclose(ns2.inverse_lambda(lam).numpy(), discrete_ns.inverse_lambda(lam).numpy(), rtol=1e-10)
    assert ns2.total_N == 1000


def test_linear_schedule_closed_form(linear_ns):
    t = torch.linspace(1e-3, 1, 50, dtype=F64)
    log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    np.testing.assert_allclose(linear_ns.marginal_log_mean_coeff(t).numpy(), log_alpha.numpy(), rtol=1e-14)
    a, s = linear_ns.marginal_alpha(t), linear_ns.marginal_std(t)
    np.testing.assert_allclose((a**2 + s**2).numpy(), 1.0, rtol=1e-14)
    np.testing.assert_allclose(linear_ns.marginal_lambda(t).numpy(), torch.log(a / s).numpy(), rtol=1e-12, atol=1e-12)
