"""Tests for dpm_solver.dpm_solver: phi, measured convergence orders, x0 correction, NFE, dtypes, the SDE solver.

Reference problems (float64 throughout unless stated): the Gaussian of helpers/gaussian_reference.py (exact eps and
exact probability-flow map), and a two-component Gaussian mixture in 2-D (exact eps from the mixture posterior),
compared with the ODE integrated by scipy's DOP853 at rtol 1e-13.
"""

import math
import weakref

import numpy as np
import pytest
import torch
from gaussian_reference import F64, Gaussian, noise
from scipy.integrate import solve_ivp

import dpm_solver.dpm_solver as dpm_module
from dpm_solver import DPM_Solver, NoiseScheduleVP, phi


# --------------------------------------------------------------------------- helpers
def max_err(a, b):
    return (a - b).abs().max().item()


def loglog_slope(ks, errs):
    return -np.polyfit(np.log(ks), np.log(errs), 1)[0]


# --------------------------------------------------------------------------- phi
def test_phi_matches_closed_form_and_series():
    for z in (-3.0, -0.7, -0.2, -1e-3, 1e-3, 0.2, 0.7, 3.0):
        assert phi(1, z) == pytest.approx(math.expm1(z) / z, rel=1e-13)
        assert phi(2, z) == pytest.approx((math.expm1(z) - z) / z**2, rel=1e-9)
        assert phi(3, z) == pytest.approx((math.expm1(z) - z - z * z / 2) / z**3, rel=1e-6)
    # limits at 0 are 1/k!
    assert phi(3, 1e-12) == pytest.approx(1 / 6, rel=1e-12)
    # continuity across the series / closed-form switch at |z| = 0.5
    for k in (1, 2, 3):
        assert phi(k, 0.5 - 1e-12) == pytest.approx(phi(k, 0.5 + 1e-12), rel=1e-10)


# --------------------------------------------------------------------------- order 1 = DDIM
@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
@pytest.mark.parametrize("skip_type", ["logSNR", "time_uniform", "time_quadratic"])
def test_order1_is_ddim(linear_ns, algorithm, skip_type):
    g = Gaussian(linear_ns)
    x_T = noise((8, 4))
    steps, t_end = 25, 0.02
    solver = DPM_Solver(g.eps, linear_ns, algorithm_type=algorithm)
    ts = solver.get_time_steps(skip_type, 1.0, t_end, steps)
    assert ts.shape == (steps + 1,) and ts[0] == 1.0 and ts[-1] == t_end
    x = x_T.clone()
    for i in range(steps):  # DDIM (eta = 0): x_t = alpha_t x0_hat + sigma_t eps
        s, t = ts[i], ts[i + 1]
        eps = g.eps(x, s.expand(8))
        x0_hat = (x - linear_ns.marginal_std(s) * eps) / linear_ns.marginal_alpha(s)
        x = linear_ns.marginal_alpha(t) * x0_hat + linear_ns.marginal_std(t) * eps
    for method in ("multistep", "singlestep_fixed", "singlestep"):
        out = solver.sample(x_T.clone(), steps=steps, t_end=t_end, order=1, skip_type=skip_type, method=method)
        assert max_err(out, x) < 1e-12 * x.abs().max().item(), method
        assert solver.nfe == steps


# --------------------------------------------------------------------------- convergence orders
ORDER_KS = [40, 80, 160, 320]


T_END = 0.05  # lambda runs from -5.0 to 1.75; errors at 320 steps are >= 4e-8, far above round-off


def _final_errors(ns, g, algorithm, method, order, solver_type, ks, t_start=1.0, warmup="singlestep"):
    x_T = noise((8, 4))
    ref = g.exact(x_T, t_start, T_END)
    errs = []
    for k in ks:
        solver = DPM_Solver(g.eps, ns, algorithm_type=algorithm)
        out = solver.sample(x_T.clone(), steps=k, t_start=t_start, t_end=T_END, order=order, skip_type="logSNR",
                            method=method, lower_order_final=False, solver_type=solver_type,
                            multistep_warmup=warmup)
        errs.append(max_err(out, ref))
    return errs


@pytest.mark.parametrize("solver_type", ["dpmsolver", "taylor"])
@pytest.mark.parametrize("method", ["multistep", "singlestep_fixed"])
@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
def test_convergence_order(linear_ns, algorithm, method, solver_type):
    g = Gaussian(linear_ns)
    for order in (1, 2, 3):
        errs = _final_errors(linear_ns, g, algorithm, method, order, solver_type, ORDER_KS)
        slope = loglog_slope(ORDER_KS, errs)
        assert min(errs) > 1e-10, errs  # measurable: well above float64 round-off
        assert slope >= order - 0.2, (order, slope, errs)
        assert slope <= order + 0.6, (order, slope, errs)  # not superconvergent by accident


def test_half_second_difference_is_only_second_order(linear_ns, monkeypatch):
    """The test above can tell order 3 from order 2: scaling the second-derivative
    estimate by 1/2 (the defect of the widely used multistep third-order update)
    drops the measured slope to ~2."""
    original = dpm_module._divided_difference_derivatives

    def halved(lams, values):
        out = original(lams, values)
        if len(out) == 2:
            out[1] = 0.5 * out[1]
        return out

    monkeypatch.setattr(dpm_module, "_divided_difference_derivatives", halved)
    g = Gaussian(linear_ns)
    for algorithm in ("dpmsolver", "dpmsolver++"):
        errs = _final_errors(linear_ns, g, algorithm, "multistep", 3, "dpmsolver", ORDER_KS)
        assert loglog_slope(ORDER_KS, errs) < 2.3, errs


@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
def test_part_way_start(linear_ns, algorithm):
    """t_start < 1: compare with the exact map from t = 0.3."""
    g = Gaussian(linear_ns)
    x_start = g.exact(noise((8, 4), seed=5), 1.0, 0.3)
    solver = DPM_Solver(g.eps, linear_ns, algorithm_type=algorithm)
    for order, tol in ((1, 2e-1), (2, 5e-3), (3, 5e-4)):
        out = solver.sample(x_start.clone(), steps=30, t_start=0.3, t_end=T_END, order=order, skip_type="logSNR",
                            lower_order_final=False)
        assert max_err(out, g.exact(x_start, 0.3, T_END)) < tol, order
    # the order-3 multistep run stays third order from a part-way start ...
    ks = [20, 40, 80, 160]
    errs = _final_errors(linear_ns, g, algorithm, "multistep", 3, "dpmsolver", ks, t_start=0.3)
    assert loglog_slope(ks, errs) >= 2.8, errs
    # ... which needs the second-order warm-up step: a first-order first step gives order 2
    errs_lo = _final_errors(linear_ns, g, algorithm, "multistep", 3, "dpmsolver", ks, t_start=0.3,
                            warmup="lower_order")
    assert loglog_slope(ks, errs_lo) < 2.3, errs_lo
    assert errs[-1] < errs_lo[-1] / 10


@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
@pytest.mark.parametrize("solver_type", ["dpmsolver", "taylor"])
def test_singlestep_budget_converges(linear_ns, algorithm, solver_type):
    g = Gaussian(linear_ns)
    x_T = noise((8, 4))
    ref = g.exact(x_T, 1.0, T_END)
    solver = DPM_Solver(g.eps, linear_ns, algorithm_type=algorithm)
    for order in (2, 3):
        assert solver.singlestep_orders(20, order)[-1] < order or 20 % order == 0
        errs = []
        for k in (12, 24, 48, 96):  # multiples of 3: the budget ends with a 2nd and a 1st order step
            out = solver.sample(x_T.clone(), steps=k, t_end=T_END, order=order, skip_type="logSNR",
                                method="singlestep", solver_type=solver_type)
            assert solver.nfe == k
            errs.append(max_err(out, ref))
        assert all(b < a for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < (1e-2 if order == 2 else 1e-3), errs


def test_singlestep_orders_split():
    split = DPM_Solver.singlestep_orders
    assert split(9, 3) == [3, 3, 2, 1]
    assert split(10, 3) == [3, 3, 3, 1]
    assert split(11, 3) == [3, 3, 3, 2]
    assert split(7, 2) == [2, 2, 2, 1]
    assert split(5, 1) == [1] * 5
    for k in range(1, 30):
        for o in (1, 2, 3):
            assert sum(split(k, o)) == k


def test_discrete_schedule_sampling(discrete_ns):
    """The solver on the discrete schedule (log alpha piecewise linear in t)
    against the exact map, which holds for any schedule."""
    g = Gaussian(discrete_ns)
    x_T = noise((8, 4), seed=2)
    t_end = 1.0 / 1000
    for algorithm in ("dpmsolver", "dpmsolver++"):
        solver = DPM_Solver(g.eps, discrete_ns, algorithm_type=algorithm)
        out = solver.sample(x_T.clone(), steps=50, order=3, skip_type="logSNR", lower_order_final=False)
        assert max_err(out, g.exact(x_T, 1.0, t_end)) < 2e-3


# --------------------------------------------------------------------------- mixture
MIX_W = np.array([0.3, 0.7])


MIX_MU = np.array([[-1.0, 0.5], [1.5, -1.0]])


MIX_S = np.array([0.3, 0.5])


def _mixture_eps(x, a, sg, w=MIX_W, mu=MIX_MU, s=MIX_S):
    """Exact eps = -sigma grad log p_t for p_0 = sum_k w_k N(mu_k, s_k^2 I)."""
    v = a**2 * s**2 + sg**2
    diff = x[:, None, :] - a * mu[None]
    logp = np.log(w)[None] - 0.5 * (diff**2).sum(-1) / v[None] - 0.5 * x.shape[1] * np.log(v)[None]
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return sg * (r[:, :, None] * diff / v[None, :, None]).sum(1)


def _alpha_sigma(lam):
    return math.sqrt(1.0 / (1.0 + math.exp(-2 * lam))), math.sqrt(1.0 / (1.0 + math.exp(2 * lam)))


def _reference_ode(eps_fn, x_T, lam_T, lam_0, rtol=1e-13):
    """Integrate d(x / sigma) / d lambda = e^lambda x0(x, lambda) with DOP853."""
    b, d = x_T.shape
    _, sg = _alpha_sigma(lam_T)

    def rhs(lam, y):
        a, sg = _alpha_sigma(lam)
        x = (y * sg).reshape(b, d)
        x0 = (x - sg * eps_fn(x, a, sg)) / a
        return (math.exp(lam) * x0).ravel()

    sol = solve_ivp(rhs, (lam_T, lam_0), (x_T / sg).ravel(), method="DOP853", rtol=rtol, atol=rtol)
    assert sol.success
    return sol.y[:, -1].reshape(b, d) * _alpha_sigma(lam_0)[1]


def test_gaussian_mixture_against_reference(linear_ns):
    def model_fn(x, t):
        a = linear_ns.marginal_alpha(t[:1]).item()
        sg = linear_ns.marginal_std(t[:1]).item()
        return torch.from_numpy(_mixture_eps(x.numpy(), a, sg))

    x_T = noise((64, 2), seed=1)
    lam_T = linear_ns.marginal_lambda(torch.tensor(1.0, dtype=F64)).item()
    lam_0 = linear_ns.marginal_lambda(torch.tensor(T_END, dtype=F64)).item()
    ref = _reference_ode(_mixture_eps, x_T.numpy(), lam_T, lam_0)
    # the reference is converged ...
    assert np.abs(ref - _reference_ode(_mixture_eps, x_T.numpy(), lam_T, lam_0, rtol=1e-10)).max() < 1e-8
    # ... and the reference integrator reproduces the closed-form map on a single Gaussian
    one = dict(w=np.array([1.0]), mu=np.array([[0.4, -0.8]]), s=np.array([0.3]))
    g1 = Gaussian(linear_ns, mu=(0.4, -0.8), s=(0.3, 0.3))
    ref1 = _reference_ode(lambda x, a, sg: _mixture_eps(x, a, sg, **one), x_T.numpy(), lam_T, lam_0)
    assert np.abs(ref1 - g1.exact(x_T, 1.0, T_END).numpy()).max() < 1e-9
    ref = torch.from_numpy(ref)

    for algorithm in ("dpmsolver", "dpmsolver++"):
        solver = DPM_Solver(model_fn, linear_ns, algorithm_type=algorithm)
        for method, order, tol80 in (("multistep", 2, 1e-2), ("multistep", 3, 2e-3),
                                     ("singlestep_fixed", 2, 1e-2), ("singlestep_fixed", 3, 2e-4)):
            errs = []
            for k in (20, 40, 80):
                out = solver.sample(x_T.clone(), steps=k, t_end=T_END, order=order, skip_type="logSNR",
                                    method=method, lower_order_final=False)
                errs.append(max_err(out, ref))
            assert errs[0] > errs[1] > errs[2], (algorithm, method, order, errs)
            assert errs[2] < tol80, (algorithm, method, order, errs)
            assert errs[0] / errs[2] > (10 if order == 2 else 20), (algorithm, method, order, errs)


# --------------------------------------------------------------------------- x0 correction
def test_correcting_x0_callable_is_applied(linear_ns):
    g = Gaussian(linear_ns, mu=(3.0, -3.0, 0.0, 2.0))
    calls = []

    def clamp(x0, t):
        calls.append(t)
        assert t.shape == (x0.shape[0],)
        return x0.clamp(-0.5, 0.5)

    x_T = noise((8, 4))
    for algorithm in ("dpmsolver++", "dpmsolver"):
        calls.clear()
        solver = DPM_Solver(g.eps, linear_ns, algorithm_type=algorithm, correcting_x0_fn=clamp)
        out = solver.sample(x_T.clone(), steps=10, order=2, denoise_to_zero=True)
        assert len(calls) == solver.nfe == 11
        assert out.abs().max().item() <= 0.5 + 1e-12
        plain = DPM_Solver(g.eps, linear_ns, algorithm_type=algorithm).sample(x_T.clone(), steps=10, order=2,
                                                                                denoise_to_zero=True)
        assert plain.abs().max().item() > 1.5  # the correction really changed the run


def test_dynamic_thresholding(linear_ns):
    solver = DPM_Solver(lambda x, t: x, linear_ns, correcting_x0_fn="dynamic_thresholding",
                        thresholding_max_val=1.0, dynamic_thresholding_ratio=0.9)
    x0 = noise((4, 3, 5, 7), seed=7) * torch.tensor([0.2, 1.0, 3.0, 10.0], dtype=F64).reshape(4, 1, 1, 1)
    out = solver.correcting_x0_fn(x0, None)
    s = torch.quantile(x0.reshape(4, -1).abs(), 0.9, dim=1).clamp(min=1.0).reshape(4, 1, 1, 1)
    assert torch.allclose(out, torch.clamp(x0, -s, s) / s, rtol=1e-12, atol=1e-14)
    assert torch.equal(out[0], x0[0])  # small samples pass unchanged
    assert out.abs().max() <= 1.0
    # inside sampling: data far outside [-1, 1] end inside it
    g = Gaussian(linear_ns, mu=(3.0, -3.0, 0.0, 2.0))
    solver = DPM_Solver(g.eps, linear_ns, correcting_x0_fn="dynamic_thresholding")
    out = solver.sample(noise((8, 4)), steps=10, order=2, denoise_to_zero=True)
    assert out.abs().max().item() <= 1.0 + 1e-12


# --------------------------------------------------------------------------- NFE, memory, dtypes
def test_nfe_counts(linear_ns):
    g = Gaussian(linear_ns)
    calls = [0]

    def model_fn(x, t):
        calls[0] += 1
        return g.eps(x, t)

    solver = DPM_Solver(model_fn, linear_ns)
    cases = [
        (dict(steps=15, order=2, method="multistep"), 15),
        (dict(steps=15, order=2, method="multistep", denoise_to_zero=True), 16),
        (dict(steps=15, order=1, method="multistep"), 15),
        (dict(steps=15, order=3, method="multistep"), 16),  # + the second-order warm-up step
        (dict(steps=15, order=3, method="multistep", multistep_warmup="lower_order"), 15),
        (dict(steps=6, order=3, method="multistep"), 7),
        (dict(steps=7, order=2, method="singlestep_fixed"), 14),
        (dict(steps=7, order=3, method="singlestep_fixed"), 21),
        (dict(steps=13, order=3, method="singlestep"), 13),
        (dict(steps=13, order=2, method="singlestep", denoise_to_zero=True), 14),
    ]
    for kwargs, expected in cases:
        calls[0] = 0
        solver.sample(noise((2, 4)), **kwargs)
        assert solver.nfe == calls[0] == expected, kwargs


def test_multistep_keeps_only_last_outputs(linear_ns):
    g = Gaussian(linear_ns)
    refs, alive_max = [], [0]

    def model_fn(x, t):
        alive_max[0] = max(alive_max[0], sum(r() is not None for r in refs))
        out = g.eps(x, t)
        refs.append(weakref.ref(out))
        return out

    for order in (1, 2, 3):
        refs.clear()
        alive_max[0] = 0
        solver = DPM_Solver(model_fn, linear_ns, algorithm_type="dpmsolver")  # history stores model outputs
        solver.sample(noise((2, 4)), steps=40, order=order, method="multistep")
        assert alive_max[0] <= order, (order, alive_max[0])


def test_float32_inference_mode_and_intermediates(linear_ns):
    g = Gaussian(linear_ns)
    x64 = noise((8, 4))
    ref = g.exact(x64, 1.0, T_END)
    for algorithm in ("dpmsolver", "dpmsolver++"):
        solver = DPM_Solver(g.eps, linear_ns, algorithm_type=algorithm)
        with torch.inference_mode():
            out, inter = solver.sample(x64.float(), steps=40, t_end=T_END, order=3, skip_type="logSNR",
                                       return_intermediate=True)
        assert out.dtype == torch.float32
        assert len(inter) == 41 and inter[-1] is out and torch.equal(inter[0], x64.float())
        out64 = solver.sample(x64, steps=40, t_end=T_END, order=3, skip_type="logSNR")
        assert out64.dtype == F64 and max_err(out64, ref) < 1e-3
        diff = max_err(out.double(), out64)
        print(algorithm, "float32 vs float64:", diff)
        assert diff < 1e-4  # float32 round-off only


def test_default_times(discrete_ns, linear_ns):
    seen = []

    def model_fn(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    DPM_Solver(model_fn, discrete_ns).sample(torch.zeros(1, 1), steps=5, order=1, denoise_to_zero=True)
    assert seen[0] == 1.0 and seen[-1] == pytest.approx(1e-3, rel=1e-6)
    seen.clear()
    DPM_Solver(model_fn, linear_ns).sample(torch.zeros(1, 1), steps=5, order=1, denoise_to_zero=True)
    assert seen[0] == 1.0 and seen[-1] == pytest.approx(1e-3, rel=1e-6)


def test_invalid_arguments(linear_ns, discrete_ns):
    solver = DPM_Solver(lambda x, t: x, linear_ns)
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError):
        solver.sample(x, order=4)
    with pytest.raises(ValueError):
        solver.sample(x, method="adaptive")
    with pytest.raises(ValueError):
        solver.sample(x, t_start=0.1, t_end=0.2)
    with pytest.raises(ValueError):
        DPM_Solver(lambda x, t: x, discrete_ns).sample(x, t_end=1e-4)
    with pytest.raises(ValueError):
        DPM_Solver(lambda x, t: x, linear_ns, algorithm_type="ddim")
    with pytest.raises(ValueError):
        NoiseScheduleVP("discrete")


# --------------------------------------------------------------------------- SDE-DPM-Solver++
@pytest.mark.parametrize("skip_type", ["logSNR", "time_uniform"])
def test_sde_order1_is_the_ddpm_posterior_step(linear_ns, skip_type):
    """First-order SDE-DPM-Solver++ is DDIM with eta = 1, i.e. a draw from q(x_t | x_s, x0_hat) (DDPM eq. 7):
    mean sqrt(a_t) x0 + sqrt(1 - a_t - var) eps, var = (1 - a_t)/(1 - a_s) (1 - a_s/a_t), the same noise."""
    g = Gaussian(linear_ns)
    x_T = noise((8, 4))
    steps, t_end = 25, 0.02
    zs = [noise((8, 4), seed=100 + i) for i in range(steps)]
    it = iter(zs)
    solver = DPM_Solver(g.eps, linear_ns, algorithm_type="sde-dpmsolver++")
    out = solver.sample(x_T.clone(), steps=steps, t_end=t_end, order=1, skip_type=skip_type,
                        noise_fn=lambda like: next(it))
    assert solver.nfe == steps
    ts = solver.get_time_steps(skip_type, 1.0, t_end, steps)
    x = x_T.clone()
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        a_s, a_t = linear_ns.marginal_alpha(s) ** 2, linear_ns.marginal_alpha(t) ** 2  # alpha_bar
        eps = g.eps(x, s.expand(8))
        x0_hat = (x - torch.sqrt(1 - a_s) * eps) / torch.sqrt(a_s)
        var = (1 - a_t) / (1 - a_s) * (1 - a_s / a_t)
        x = torch.sqrt(a_t) * x0_hat + torch.sqrt(1 - a_t - var) * eps + torch.sqrt(var) * zs[i]
    assert max_err(out, x) < 1e-12 * x.abs().max().item()


def _sde_marginal_errors(ns, order, solver_type, ks, t_start=1.0):
    """Exact mean and variance errors of SDE-DPM-Solver++ samples at T_END for Gaussian data, from x_{t_start}
    drawn from its true marginal. Every quantity is affine in the independent normals (x_{t_start} and one z per
    step) because E[x0 | x_t] is affine in x_t, so the solver runs on the coefficient vectors: column 0 holds
    the constant, column 1 + j the coefficient of the j-th normal. No Monte Carlo."""
    g = Gaussian(ns)
    a_T, s_T = (float(f(torch.tensor(t_start, dtype=F64))) for f in (ns.marginal_alpha, ns.marginal_std))
    a_0, s_0 = (float(f(torch.tensor(T_END, dtype=F64))) for f in (ns.marginal_alpha, ns.marginal_std))
    mean_errs, var_errs = [], []
    for k in ks:
        def eps(X, t):  # the exact eps, applied to the affine representation (the constant only in column 0)
            a, sg = float(ns.marginal_alpha(t[:1])), float(ns.marginal_std(t[:1]))
            shift = torch.zeros_like(X)
            shift[:, 0] = a * g.mu
            return sg * (X - shift) / (a**2 * g.s**2 + sg**2)[:, None]

        fresh = iter(range(2, k + 2))

        def noise_fn(X):
            z = torch.zeros_like(X)
            z[:, next(fresh)] = 1.0
            return z

        X = torch.zeros(4, k + 2, dtype=F64)
        X[:, 0], X[:, 1] = a_T * g.mu, torch.sqrt(a_T**2 * g.s**2 + s_T**2)
        out = DPM_Solver(eps, ns, algorithm_type="sde-dpmsolver++").sample(
            X, steps=k, t_start=t_start, t_end=T_END, order=order, skip_type="logSNR", lower_order_final=False,
            solver_type=solver_type, noise_fn=noise_fn)
        mean_errs.append(max_err(out[:, 0], a_0 * g.mu))
        var_errs.append(max_err((out[:, 1:] ** 2).sum(1), a_0**2 * g.s**2 + s_0**2))
    return mean_errs, var_errs


@pytest.mark.parametrize("solver_type", ["dpmsolver", "taylor"])
def test_sde_weak_convergence_order(linear_ns, solver_type):
    """The sample distribution converges to the true marginal N(alpha mu, alpha^2 s^2 + sigma^2): the variance
    error falls at order 1 (first order) and 2 (SDE-DPM-Solver++(2M)); the mean is exact for this problem."""
    for order in (1, 2):
        mean_errs, var_errs = _sde_marginal_errors(linear_ns, order, solver_type, ORDER_KS)
        assert max(mean_errs) < 1e-12, mean_errs
        assert min(var_errs) > 1e-6, var_errs
        slope = loglog_slope(ORDER_KS, var_errs)
        assert order - 0.2 <= slope <= order + 0.6, (order, slope, var_errs)
    # and from a part-way start (ADDPM's truncated chain)
    _, var_errs = _sde_marginal_errors(linear_ns, 2, solver_type, ORDER_KS, t_start=0.3)
    assert loglog_slope(ORDER_KS, var_errs) >= 1.8, var_errs


def test_sde_is_stochastic_and_lands_on_a_point_mass(linear_ns):
    g = Gaussian(linear_ns, s=(1e-9,) * 4)  # data = mu exactly: every sample must end on mu
    solver = DPM_Solver(g.eps, linear_ns, algorithm_type="sde-dpmsolver++")
    x_T = noise((8, 4))
    a = solver.sample(x_T.clone(), steps=10, t_end=T_END, order=2, denoise_to_zero=True)
    assert solver.nfe == 11
    torch.testing.assert_close(a, g.mu.expand(8, 4), atol=1e-6, rtol=0)
    wide = Gaussian(linear_ns)
    b, c = (DPM_Solver(wide.eps, linear_ns, algorithm_type="sde-dpmsolver++").sample(x_T.clone(), steps=10)
            for _ in range(2))
    assert max_err(b, c) > 1e-2  # fresh noise at every step: the same start gives different samples


def test_sde_invalid_arguments(linear_ns):
    solver = DPM_Solver(lambda x, t: x, linear_ns, algorithm_type="sde-dpmsolver++")
    for kwargs in ({"order": 3}, {"method": "singlestep"}, {"method": "singlestep_fixed"}):
        with pytest.raises(ValueError, match="sde-dpmsolver"):
            solver.sample(torch.zeros(1, 1), steps=5, **kwargs)
