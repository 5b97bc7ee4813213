"""DPM-Solver and DPM-Solver++ (orders 1-3; multistep, singlestep, singlestep_fixed).

References
----------
[DPM]   C. Lu, Y. Zhou, F. Bao, J. Chen, C. Li, J. Zhu, "DPM-Solver: A Fast ODE
        Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps",
        NeurIPS 2022, arXiv:2206.00927.
[DPM++] C. Lu, Y. Zhou, F. Bao, J. Chen, C. Li, J. Zhu, "DPM-Solver++: Fast
        Solver for Guided Sampling of Diffusion Probabilistic Models",
        arXiv:2211.01095.

The maths in one place
----------------------
(Equation numbers refer to the arXiv versions of the papers.)
With lambda = log(alpha/sigma) and h = lambda_t - lambda_s (> 0 when going
from s to an earlier time t), the probability-flow ODE has the exact solutions

  noise prediction  ([DPM] Prop. 3.1, Eq. (3.4)):
      x_t = (alpha_t/alpha_s) x_s - alpha_t * int_{lambda_s}^{lambda_t} e^{-lambda} eps(x_lambda, lambda) dlambda
  data prediction   ([DPM++] Sec. 4.1, exact solution for x_theta):
      x_t = (sigma_t/sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^{+lambda} x0(x_lambda, lambda) dlambda

Expanding the model output m(lambda) (eps or x0) in a Taylor series around
lambda_s ([DPM] Eq. (3.5)-(3.6), [DPM++] Sec. 4.1) and integrating term by term
gives the common form used by every update in this file:

      x_t = A x_s + B * sum_{n=0}^{k-1} c_n(h) m^{(n)}(lambda_s) + O(h^{k+1})

  noise prediction:  A = alpha_t/alpha_s,  B = -sigma_t,  c_n = h^{n+1} phi_{n+1}(+h)
  data prediction:   A = sigma_t/sigma_s,  B = +alpha_t,  c_n = h^{n+1} phi_{n+1}(-h)

with phi_k(z) = int_0^1 e^{(1-tau) z} tau^{k-1}/(k-1)! dtau, i.e.
phi_1(z) = (e^z-1)/z, phi_2(z) = (e^z-1-z)/z^2, phi_3(z) = (e^z-1-z-z^2/2)/z^3.
For k = 1 this is DDIM ([DPM] Eq. (3.7); DPM-Solver++ with k = 1).

SDE-DPM-Solver++ ('sde-dpmsolver++', the SDE variant of [DPM++])
integrates the reverse diffusion SDE instead of the ODE.  In data prediction
its exact solution from s to t is
      x_t = (sigma_t/sigma_s) e^{-h} x_s + 2 alpha_t int_{lambda_s}^{lambda_t}
              e^{-2(lambda_t - lambda)} x0(x_lambda, lambda) dlambda
            + sigma_t sqrt(1 - e^{-2h}) z,          z ~ N(0, I),
the common form above with A = (sigma_t/sigma_s) e^{-h}, B = 2 alpha_t,
c_n = h^{n+1} phi_{n+1}(-2h), plus the noise term.  Its first order is the
DDPM posterior step q(x_t | x_s, x0) (DDIM with eta = 1); its second order
(multistep, 'dpmsolver' type) is SDE-DPM-Solver++(2M).

The derivatives m^{(n)}(lambda_s) are estimated from model outputs at other
points on the lambda axis (intermediate points of a singlestep step, or the
previous grid points of a multistep method) by differentiating the
interpolating polynomial (Newton divided differences).

``solver_type`` (as in the papers):
  'dpmsolver': second-order steps use c_1 = (h/2) c_0, the coefficient of
      [DPM] DPM-Solver-2 / [DPM++] Algorithm 1 (2S) and Algorithm 2 (2M);
      singlestep third order is [DPM] DPM-Solver-3: the final update uses one
      first difference taken at r2 = 2/3 with the exact c_1 and no c_2 term
      (third order because r2 = 2/3 makes c_1 * r2 h / 2 = c_2 + O(h^4)).
  'taylor': every derivative is estimated from the full interpolating polynomial
      and multiplied by its exact c_n.  (Singlestep third order stays third
      order: with r2 = 2/3 the O(h^2) error of the r1-point enters the final
      update with weight O(h^2) only.)
  Multistep third order is identical for both types: exact c_0, c_1, c_2 with
  m' and m'' from the quadratic through the last three outputs.  Note that
  m'' = 2 f[l0, l1, l2] (twice the second divided difference); using
  f[l0, l1, l2] itself makes the method only second order.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Sequence, Tuple, Union

import torch

from .schedule import NoiseScheduleVP
from .wrapper import model_wrapper

__all__ = ["NoiseScheduleVP", "model_wrapper", "DPM_Solver", "phi"]

_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
_DATA_PREDICTION = ("dpmsolver++", "sde-dpmsolver++")
_METHODS = ("multistep", "singlestep", "singlestep_fixed")
_SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
_SOLVER_TYPES = ("dpmsolver", "taylor")
_WARMUPS = ("lower_order", "singlestep")

# intermediate points of singlestep steps, as fractions r of the step in lambda
# ([DPM] DPM-Solver-2 uses r1 = 1/2, DPM-Solver-3 uses r1 = 1/3, r2 = 2/3)
_R_ORDER2 = 0.5
_R_ORDER3 = (1.0 / 3.0, 2.0 / 3.0)

# lower_order_final only acts for short runs, where it stabilises the last steps
_LOWER_ORDER_FINAL_MAX_STEPS = 10


# --------------------------------------------------------------------------- maths
def phi(k: int, z: float) -> float:
    """phi_k(z) = int_0^1 exp((1 - tau) z) tau^(k-1) / (k-1)! dtau  (phi_0(z) = e^z).

    Evaluated without cancellation: a power series sum_j z^j / (j + k)! for
    small |z|, the closed form (e^z - sum_{j<k} z^j / j!) / z^k otherwise.
    """
    if k == 0:
        return math.exp(z)
    if abs(z) < 0.5:
        term = 1.0 / math.factorial(k)
        total = term
        for j in range(1, 40):
            term *= z / (j + k)
            total += term
            if abs(term) <= 1e-17 * abs(total):
                break
        return total
    head = math.expm1(z)  # e^z - 1
    power = 1.0
    for j in range(1, k):
        power *= z / j
        head -= power  # subtract z^j / j!
    return head / z**k


@dataclass(frozen=True)
class _Point:
    """A time on the solver's lambda grid with its schedule values (float64, host side)."""

    t: float
    lam: float
    alpha: float
    sigma: float


def _divided_difference_derivatives(lams: Sequence[float], values: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Derivatives at lams[0] of the polynomial through (lams[j], values[j]), j < len(lams).

    Returns [p'(l0)] for two points and [p'(l0), p''(l0)] for three.  With the
    Newton form p(l) = m0 + (l - l0) f[0,1] + (l - l0)(l - l1) f[0,1,2]:
        p'(l0)  = f[0,1] + (l0 - l1) f[0,1,2]
        p''(l0) = 2 f[0,1,2]
    """
    n = len(lams)
    if n < 2:
        return []
    f01 = (values[1] - values[0]) / (lams[1] - lams[0])
    if n == 2:
        return [f01]
    if n != 3:
        raise ValueError("at most three points are supported")
    f12 = (values[2] - values[1]) / (lams[2] - lams[1])
    f012 = (f12 - f01) / (lams[2] - lams[0])
    return [f01 + (lams[0] - lams[1]) * f012, 2.0 * f012]


# --------------------------------------------------------------------------- solver
class DPM_Solver:
    """DPM-Solver ([DPM], noise prediction) and DPM-Solver++ ([DPM++], data prediction).

    Args:
        model_fn: ``model_fn(x, t_continuous) -> eps`` (see :func:`model_wrapper`).
            ``t_continuous`` is passed as a tensor of shape [batch] on x's device,
            in x's dtype (float32 for half-precision x).
        noise_schedule: the :class:`NoiseScheduleVP`.
        algorithm_type: 'dpmsolver++' (integrate the data prediction x0, default),
            'dpmsolver' (integrate the noise prediction eps), or 'sde-dpmsolver++'
            (the reverse SDE in data prediction: stochastic, multistep, orders 1-2).
        correcting_x0_fn: None, 'dynamic_thresholding', or a callable
            ``fn(x0, t) -> x0`` applied to every predicted x0 (``t`` as above).
            With 'dpmsolver' the corrected x0 is turned back into
            eps = (x - alpha_t x0) / sigma_t, so it applies to both algorithms.
        thresholding_max_val, dynamic_thresholding_ratio: parameters of dynamic
            thresholding (Imagen, Saharia et al. 2022): per sample
            s = max(quantile(|x0|, ratio), max_val) and
            x0 <- clamp(x0, -s, s) * max_val / s, so x0 ends in [-max_val, max_val].

    Attributes:
        nfe: number of ``model_fn`` calls made by the last :meth:`sample`.
    """

    def __init__(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        noise_schedule: NoiseScheduleVP,
        algorithm_type: str = "dpmsolver++",
        correcting_x0_fn: Union[None, str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        thresholding_max_val: float = 1.0,
        dynamic_thresholding_ratio: float = 0.995,
    ) -> None:
        if algorithm_type not in _ALGORITHMS:
            raise ValueError(f"algorithm_type must be one of {_ALGORITHMS}, got {algorithm_type!r}")
        if correcting_x0_fn == "dynamic_thresholding":
            correcting_x0_fn = self.dynamic_thresholding_fn
        elif correcting_x0_fn is not None and not callable(correcting_x0_fn):
            raise ValueError("correcting_x0_fn must be None, 'dynamic_thresholding' or a callable")
        self.model = model_fn
        self.noise_schedule = noise_schedule
        self.algorithm_type = algorithm_type
        self.correcting_x0_fn = correcting_x0_fn
        self.thresholding_max_val = float(thresholding_max_val)
        self.dynamic_thresholding_ratio = float(dynamic_thresholding_ratio)
        self.nfe = 0

    # ------------------------------------------------------------ x0 correction
    def dynamic_thresholding_fn(self, x0: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dynamic thresholding of a predicted x0 (per sample over all non-batch dims)."""
        flat = x0.reshape(x0.shape[0], -1).abs()
        s = _quantile_rows(flat, self.dynamic_thresholding_ratio)
        s = torch.clamp(s, min=self.thresholding_max_val)
        s = s.reshape((-1,) + (1,) * (x0.dim() - 1))
        return torch.maximum(torch.minimum(x0, s), -s) * (self.thresholding_max_val / s)

    # ---------------------------------------------------- model in both forms
    def noise_prediction_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps(x, t) from the model (no correction, does not count towards nfe)."""
        return self.model(x, t)

    def data_prediction_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0(x, t) = (x - sigma_t eps) / alpha_t, corrected by ``correcting_x0_fn``."""
        t_vec = t.expand(x.shape[0]) if t.dim() == 0 else t
        eps = self.model(x, t_vec)
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha = self.noise_schedule.marginal_alpha(t_vec).reshape(shape).to(x.dtype)
        sigma = self.noise_schedule.marginal_std(t_vec).reshape(shape).to(x.dtype)
        x0 = (x - sigma * eps) / alpha
        if self.correcting_x0_fn is not None:
            x0 = self.correcting_x0_fn(x0, t_vec)
        return x0

    def _time_tensor(self, x: torch.Tensor, t: float) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return torch.full((x.shape[0],), t, device=x.device, dtype=dtype)

    def _evaluate(self, x: torch.Tensor, p: _Point) -> torch.Tensor:
        """One network evaluation, returned in the form the algorithm integrates:
        x0 for 'dpmsolver++', eps for 'dpmsolver' (both after x0 correction)."""
        t = self._time_tensor(x, p.t)
        self.nfe += 1
        eps = self.model(x, t)
        if self.algorithm_type in _DATA_PREDICTION:
            x0 = (x - p.sigma * eps) / p.alpha
            if self.correcting_x0_fn is not None:
                x0 = self.correcting_x0_fn(x0, t)
            return x0
        if self.correcting_x0_fn is not None:
            x0 = self.correcting_x0_fn((x - p.sigma * eps) / p.alpha, t)
            eps = (x - p.alpha * x0) / p.sigma
        return eps

    # ------------------------------------------------------------- time grid
    def get_time_steps(self, skip_type: str, t_T: float, t_0: float, N: int, device=None) -> torch.Tensor:
        """N + 1 times from t_T down to t_0 (float64).

        'logSNR': uniform in lambda; 'time_uniform': uniform in t;
        'time_quadratic': uniform in sqrt(t).
        """
        return self._time_grid(skip_type, float(t_T), float(t_0), int(N)).to(device or "cpu")

    def _time_grid(self, skip_type: str, t_T: float, t_0: float, N: int) -> torch.Tensor:
        if skip_type not in _SKIP_TYPES:
            raise ValueError(f"skip_type must be one of {_SKIP_TYPES}, got {skip_type!r}")
        f64 = torch.float64
        if skip_type == "logSNR":
            lam_T = self.noise_schedule.marginal_lambda(torch.tensor(t_T, dtype=f64))
            lam_0 = self.noise_schedule.marginal_lambda(torch.tensor(t_0, dtype=f64))
            lams = torch.linspace(float(lam_T), float(lam_0), N + 1, dtype=f64)
            ts = self.noise_schedule.inverse_lambda(lams)
        elif skip_type == "time_uniform":
            ts = torch.linspace(t_T, t_0, N + 1, dtype=f64)
        else:
            ts = torch.linspace(math.sqrt(t_T), math.sqrt(t_0), N + 1, dtype=f64) ** 2
        ts[0], ts[-1] = t_T, t_0  # exact end points
        return ts

    def _points(self, ts: torch.Tensor) -> List[_Point]:
        ts = ts.to(dtype=torch.float64, device="cpu")
        log_alpha = self.noise_schedule.marginal_log_mean_coeff(ts)
        lam = self.noise_schedule.marginal_lambda(ts)
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2.0 * log_alpha))
        return [
            _Point(t=a, lam=b, alpha=c, sigma=d)
            for a, b, c, d in zip(ts.tolist(), lam.tolist(), alpha.tolist(), sigma.tolist())
        ]

    def _points_between(self, s: _Point, t: _Point, fractions: Sequence[float]) -> List[_Point]:
        """Points at lambda_s + r (lambda_t - lambda_s) for r in ``fractions``."""
        lams = torch.tensor([s.lam + r * (t.lam - s.lam) for r in fractions], dtype=torch.float64)
        return self._points(self.noise_schedule.inverse_lambda(lams))

    # ------------------------------------------------------- one exp. step
    def _linear_part(self, s: _Point, t: _Point) -> Tuple[float, float]:
        """(A, B) of x_t = A x_s + B * sum_n c_n m^{(n)}  (see module docstring)."""
        if self.algorithm_type == "dpmsolver++":
            return t.sigma / s.sigma, t.alpha
        if self.algorithm_type == "sde-dpmsolver++":
            return t.sigma / s.sigma * math.exp(-(t.lam - s.lam)), 2.0 * t.alpha
        return t.alpha / s.alpha, -t.sigma

    def _taylor_coefficients(self, s: _Point, t: _Point, n_terms: int) -> List[float]:
        """c_n = h^{n+1} phi_{n+1}(+-h), n < n_terms: the exact weights of the
        Taylor terms ([DPM] Eq. (3.6); [DPM++] Sec. 4.1)."""
        h = t.lam - s.lam
        z = {"dpmsolver": h, "dpmsolver++": -h, "sde-dpmsolver++": -2.0 * h}[self.algorithm_type]
        return [h ** (n + 1) * phi(n + 1, z) for n in range(n_terms)]

    def _step_noise_std(self, s: _Point, t: _Point) -> float:
        """Standard deviation of the fresh noise an SDE step from s to t adds: sigma_t sqrt(1 - e^{-2h})."""
        return t.sigma * math.sqrt(-math.expm1(-2.0 * (t.lam - s.lam)))

    def _exp_step(
        self, x_s: torch.Tensor, s: _Point, t: _Point, terms: Sequence[torch.Tensor], coeffs: Sequence[float]
    ) -> torch.Tensor:
        """x_t = A x_s + B sum_n coeffs[n] terms[n]; terms[0] is the model output at s,
        terms[n] the estimate of its n-th lambda-derivative at s."""
        a, b = self._linear_part(s, t)
        out = x_s * a
        for c, term in zip(coeffs, terms):
            out = out.add(term, alpha=b * c)
        return out

    def _second_order_coefficients(self, s: _Point, t: _Point, solver_type: str) -> List[float]:
        """[c_0, c_1] for a second-order update: exact, or c_1 = (h/2) c_0 ('dpmsolver',
        [DPM] DPM-Solver-2, [DPM++] Algorithms 1-2)."""
        c0, c1 = self._taylor_coefficients(s, t, 2)
        if solver_type == "dpmsolver":
            c1 = 0.5 * (t.lam - s.lam) * c0
        return [c0, c1]

    # ---------------------------------------------------------- multistep
    def multistep_update(
        self,
        x: torch.Tensor,
        history: Sequence[Tuple[_Point, torch.Tensor]],
        t: _Point,
        order: int,
        solver_type: str,
    ) -> torch.Tensor:
        """One multistep step of ``order`` from the newest history point to ``t``.

        ``history`` holds (point, model output) pairs, oldest first; the newest
        ``order`` of them are used.  Order 2 is [DPM++] Algorithm 2 (2M) /
        its noise-prediction analogue; order 3 uses the quadratic through the
        last three outputs (exact c_0, c_1, c_2).
        """
        recent = list(history)[-order:][::-1]  # newest first: (s, m0), (s1, m1), ...
        s, m0 = recent[0]
        lams = [p.lam for p, _ in recent]
        values = [m for _, m in recent]
        derivs = _divided_difference_derivatives(lams, values)
        if order == 1:
            coeffs = self._taylor_coefficients(s, t, 1)
        elif order == 2:
            coeffs = self._second_order_coefficients(s, t, solver_type)
        else:
            coeffs = self._taylor_coefficients(s, t, 3)
        return self._exp_step(x, s, t, [m0] + derivs, coeffs)

    # --------------------------------------------------------- singlestep
    def singlestep_update(
        self, x: torch.Tensor, s: _Point, m_s: torch.Tensor, t: _Point, order: int, solver_type: str
    ) -> torch.Tensor:
        """One singlestep step of ``order`` from s to t; ``m_s`` is the model output at s.

        order 1: DDIM / DPM-Solver-1.
        order 2: [DPM] DPM-Solver-2, [DPM++] Algorithm 1 (2S); intermediate point
                 at r1 = 1/2.
        order 3: [DPM] DPM-Solver-3 / [DPM++] 3S; intermediate points at
                 r1 = 1/3 (first-order step) and r2 = 2/3 (second-order step).
        Uses order - 1 extra network evaluations.
        """
        if order == 1:
            return self._exp_step(x, s, t, [m_s], self._taylor_coefficients(s, t, 1))
        if order == 2:
            (s1,) = self._points_between(s, t, [_R_ORDER2])
            u1 = self._exp_step(x, s, s1, [m_s], self._taylor_coefficients(s, s1, 1))
            m1 = self._evaluate(u1, s1)
            d1 = _divided_difference_derivatives([s.lam, s1.lam], [m_s, m1])
            return self._exp_step(x, s, t, [m_s] + d1, self._second_order_coefficients(s, t, solver_type))
        if order != 3:
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        s1, s2 = self._points_between(s, t, _R_ORDER3)
        u1 = self._exp_step(x, s, s1, [m_s], self._taylor_coefficients(s, s1, 1))
        m1 = self._evaluate(u1, s1)
        d1 = _divided_difference_derivatives([s.lam, s1.lam], [m_s, m1])
        u2 = self._exp_step(x, s, s2, [m_s] + d1, self._taylor_coefficients(s, s2, 2))
        del u1, d1
        m2 = self._evaluate(u2, s2)
        if solver_type == "dpmsolver":
            d = _divided_difference_derivatives([s.lam, s2.lam], [m_s, m2])
            return self._exp_step(x, s, t, [m_s] + d, self._taylor_coefficients(s, t, 2))
        d = _divided_difference_derivatives([s.lam, s1.lam, s2.lam], [m_s, m1, m2])
        return self._exp_step(x, s, t, [m_s] + d, self._taylor_coefficients(s, t, 3))

    @staticmethod
    def singlestep_orders(steps: int, order: int) -> List[int]:
        """Split a budget of ``steps`` evaluations into singlestep orders
        ([DPM] 'DPM-Solver-fast' schedule), ending with lower orders."""
        if order == 3:
            m, r = divmod(steps, 3)
            if r == 0:
                return [3] * (m - 1) + [2, 1]
            return [3] * m + ([1] if r == 1 else [2])
        if order == 2:
            m, r = divmod(steps, 2)
            return [2] * m + [1] * r
        return [1] * steps

    # -------------------------------------------------------------- sample
    def sample(
        self,
        x: torch.Tensor,
        steps: int = 20,
        t_start: Optional[float] = None,
        t_end: Optional[float] = None,
        order: int = 2,
        skip_type: str = "time_uniform",
        method: str = "multistep",
        lower_order_final: bool = True,
        denoise_to_zero: bool = False,
        solver_type: str = "dpmsolver",
        return_intermediate: bool = False,
        multistep_warmup: str = "singlestep",
        noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        """Integrate the probability-flow ODE (for 'sde-dpmsolver++': the reverse SDE) from ``t_start``
        (x = x_{t_start}) to ``t_end``.

        Args:
            x: the initial value at ``t_start`` (pure noise for t_start = T).
            steps: 'multistep': number of steps (NFE = steps; steps + 1 for order 3,
                see ``multistep_warmup``);
                'singlestep': the NFE budget, split into steps of order ``order``
                and lower ([DPM] DPM-Solver-fast); 'singlestep_fixed': number of
                steps, each of order ``order`` (NFE = steps * order).
            t_start, t_end: defaults T = 1 and 1/N (discrete) or 1e-3 (continuous).
                Any t_start > t_end inside the schedule works.
            order: 1, 2 or 3.
            skip_type: 'time_uniform' | 'logSNR' | 'time_quadratic' time grid.
                For 'singlestep' the grid has ``steps`` cells and a step of
                order k spans k of them.
            lower_order_final: 'multistep' only: for runs with fewer than 10
                steps, the last steps use orders min(order, steps left), which
                stabilises very short runs.
            denoise_to_zero: finish with x <- x0(x, t_end) (one more NFE).
            solver_type: 'dpmsolver' | 'taylor' (see module docstring).
            return_intermediate: also return the list of x at every step
                boundary (x at t_start first; the denoised x last if
                ``denoise_to_zero``).  Keeps all of them in memory.
            multistep_warmup: how a 'multistep' run starts before ``order``
                previous outputs exist.  A global order p needs every step,
                warm-up included, to have local error O(h^p).
                'singlestep' (default): step i uses the multistep order
                min(order, i), except that for order 3 the first step is a
                singlestep second-order step (one extra NFE: NFE = steps + 1),
                so the run is third order in the strict sense.
                'lower_order' (the papers' / reference code's choice, NFE =
                steps): step i uses order min(order, i).  Its first-order first
                step adds an O(h^2) error: negligible from t_start = T (there
                d eps / d lambda ~ alpha_T^2), but from a part-way t_start it
                makes order 3 converge at order 2 only.
                Orders 1 and 2 are the same under both choices.
            noise_fn: 'sde-dpmsolver++' only: ``noise_fn(x)`` returns fresh
                standard normal noise shaped like x (default torch.randn_like);
                called once per step.

        Returns:
            x at t_end, or (x, intermediates) if ``return_intermediate``.
        """
        self._check_args(order, method, solver_type, multistep_warmup, steps)
        if self.algorithm_type == "sde-dpmsolver++" and (method != "multistep" or order > 2):
            raise ValueError(f"algorithm_type='sde-dpmsolver++' supports method='multistep' with order 1 or 2, "
                             f"got method={method!r}, order={order}")
        ns = self.noise_schedule
        t_0 = (1.0 / ns.total_N if ns.schedule == "discrete" else 1e-3) if t_end is None else float(t_end)
        t_T = ns.T if t_start is None else float(t_start)
        self._check_times(t_T, t_0)
        self.nfe = 0
        intermediates: Optional[List[torch.Tensor]] = [x] if return_intermediate else None

        with torch.no_grad():
            if method == "multistep":
                x = self._sample_multistep(
                    x, steps, t_T, t_0, order, skip_type, lower_order_final, solver_type, multistep_warmup,
                    intermediates, noise_fn or torch.randn_like,
                )
            else:
                if method == "singlestep":
                    orders = self.singlestep_orders(steps, order)
                    cells = self._time_grid(skip_type, t_T, t_0, steps)
                    bounds = [0]
                    for k in orders:
                        bounds.append(bounds[-1] + k)
                    points = self._points(cells[bounds])
                else:
                    orders = [order] * steps
                    points = self._points(self._time_grid(skip_type, t_T, t_0, steps))
                for i, k in enumerate(orders):
                    s, t = points[i], points[i + 1]
                    m_s = self._evaluate(x, s)
                    x = self.singlestep_update(x, s, m_s, t, k, solver_type)
                    del m_s
                    if intermediates is not None:
                        intermediates.append(x)
                t_0 = points[-1].t

            if denoise_to_zero:
                x = self._to_data(x, self._points(torch.tensor([t_0], dtype=torch.float64))[0])
                if intermediates is not None:
                    intermediates.append(x)

        if return_intermediate:
            return x, intermediates
        return x

    def _sample_multistep(
        self, x, steps, t_T, t_0, order, skip_type, lower_order_final, solver_type, warmup, intermediates, noise_fn
    ):
        points = self._points(self._time_grid(skip_type, t_T, t_0, steps))
        # only the last `order` outputs are ever needed: memory is O(order), not O(steps)
        history: Deque[Tuple[_Point, torch.Tensor]] = deque(maxlen=order)
        history.append((points[0], self._evaluate(x, points[0])))
        taper = lower_order_final and steps < _LOWER_ORDER_FINAL_MAX_STEPS
        for i in range(1, steps + 1):
            k_warm = min(order, i)  # orders available from the history
            k_final = steps + 1 - i if taper else order  # lower orders at the end
            k = min(k_warm, k_final)
            s, m_s = history[-1]
            t = points[i]
            if warmup == "singlestep" and k_warm < order - 1 and k_final > k_warm:
                # a k-th order multistep step has local error O(h^{k+1}); a global
                # order p needs O(h^p) even in the warm-up, so use a singlestep step.
                x = self.singlestep_update(x, s, m_s, t, order - 1, solver_type)
            else:
                x = self.multistep_update(x, history, t, k, solver_type)
            if self.algorithm_type == "sde-dpmsolver++":
                x = x.add(noise_fn(x), alpha=self._step_noise_std(s, t))
            if intermediates is not None:
                intermediates.append(x)
            if i < steps:
                history.append((t, self._evaluate(x, t)))
        return x

    def _to_data(self, x: torch.Tensor, p: _Point) -> torch.Tensor:
        m = self._evaluate(x, p)
        if self.algorithm_type in _DATA_PREDICTION:
            return m
        return (x - p.sigma * m) / p.alpha

    # ----------------------------------------------------------- validation
    @staticmethod
    def _check_args(order, method, solver_type, warmup, steps):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if solver_type not in _SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {_SOLVER_TYPES}, got {solver_type!r}")
        if warmup not in _WARMUPS:
            raise ValueError(f"multistep_warmup must be one of {_WARMUPS}, got {warmup!r}")
        if int(steps) < 1:
            raise ValueError("steps must be >= 1")

    def _check_times(self, t_T: float, t_0: float) -> None:
        ns = self.noise_schedule
        lowest = 1.0 / ns.total_N if ns.schedule == "discrete" else 0.0
        if not (t_T > t_0):
            raise ValueError(f"need t_start > t_end, got t_start={t_T}, t_end={t_0}")
        if t_T > ns.T * (1 + 1e-12):
            raise ValueError(f"t_start={t_T} is beyond the end of the schedule T={ns.T}")
        if t_0 <= 0 or (ns.schedule == "discrete" and t_0 < lowest * (1 - 1e-9)):
            raise ValueError(f"t_end={t_0} is below the start of the schedule ({lowest})")


def _quantile_rows(values: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise linear-interpolation quantile of a [B, n] tensor (no size limit,
    unlike torch.quantile)."""
    n = values.shape[1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(values, lo + 1, dim=1).values
    if frac == 0.0 or hi == lo:
        return v_lo
    v_hi = torch.kthvalue(values, hi + 1, dim=1).values
    return v_lo + (v_hi - v_lo) * frac
