"""Variance-preserving noise schedules in the parametrisation used by DPM-Solver.

A VP diffusion has marginals q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with
sigma_t^2 = 1 - alpha_t^2 (DPM-Solver paper, Lu et al. 2022, Eq. (2.1)).  The
solvers work in the half log-SNR

    lambda_t = log(alpha_t / sigma_t),

which is strictly decreasing in t, so it can be inverted (``inverse_lambda``).

Everything here is plain torch and works on any device / floating dtype of the
input ``t``.  The tables of the discrete schedule are kept in float64 and cast to
the dtype/device of the query (cached per (device, dtype)).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["NoiseScheduleVP"]


def _as_float64_1d(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        out = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        out = torch.as_tensor(np.asarray(values, dtype=np.float64))
    return out.reshape(-1)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation f(x) through the knots (xp, fp).

    ``xp`` must be strictly increasing.  Outside [xp[0], xp[-1]] the first/last
    segment is extended linearly.  Works elementwise for any shape of ``x``.
    """
    flat = x.reshape(-1).contiguous()
    seg = torch.searchsorted(xp, flat, right=True) - 1
    seg = seg.clamp(0, xp.numel() - 2)
    x0, x1 = xp[seg], xp[seg + 1]
    f0, f1 = fp[seg], fp[seg + 1]
    out = f0 + (flat - x0) * ((f1 - f0) / (x1 - x0))
    return out.reshape(x.shape)


def _log_alpha_from_lambda(lamb: torch.Tensor) -> torch.Tensor:
    # alpha^2 = 1 / (1 + exp(-2 lambda))  =>  log alpha = -0.5 * log(1 + exp(-2 lambda))
    return -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)


class NoiseScheduleVP:
    """VP noise schedule (alpha_t, sigma_t, lambda_t) on continuous time t in (0, T].

    Two kinds of schedules:

    * ``NoiseScheduleVP('discrete', betas=...)`` or ``alphas_cumprod=...``: a
      DDPM-style schedule with N steps.  Step n = 1..N (``alphas_cumprod[n-1]``)
      is placed at continuous time t_n = n / N, and log(alpha_t) is piecewise
      linear in t between these knots (alpha_t = sqrt(alphas_cumprod) at the
      knots).  T = 1, ``total_N`` = N, and the usable range is t in [1/N, 1].
    * ``NoiseScheduleVP('linear', continuous_beta_0=0.1, continuous_beta_1=20.)``:
      the continuous VP-SDE with beta(t) = beta_0 + t (beta_1 - beta_0), i.e.
      log alpha_t = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2.  T = 1,
      ``total_N`` = 1000 (nominal).

    Methods take a tensor ``t`` (any shape) and return a tensor of the same
    shape, dtype and device.
    """

    def __init__(
        self,
        schedule: str = "discrete",
        betas=None,
        alphas_cumprod=None,
        continuous_beta_0: float = 0.1,
        continuous_beta_1: float = 20.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if schedule not in ("discrete", "linear"):
            raise ValueError(f"Unsupported noise schedule {schedule!r}; use 'discrete' or 'linear'.")
        self.schedule = schedule
        # ``dtype`` is accepted for interface compatibility.  Internally the
        # tables are float64; queries are answered in the dtype of ``t``.
        self.dtype = dtype
        self.T = 1.0
        self._cache: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, ...]] = {}

        if schedule == "discrete":
            if (betas is None) == (alphas_cumprod is None):
                raise ValueError("The discrete schedule needs exactly one of `betas` or `alphas_cumprod`.")
            if betas is not None:
                b = _as_float64_1d(betas)
                log_alphas = 0.5 * torch.cumsum(torch.log1p(-b), dim=0)
            else:
                log_alphas = 0.5 * torch.log(_as_float64_1d(alphas_cumprod))
            n = log_alphas.numel()
            if n < 2:
                raise ValueError("The discrete schedule needs at least 2 steps.")
            if not bool(torch.all(log_alphas[1:] < log_alphas[:-1])):
                raise ValueError("alphas_cumprod must be strictly decreasing (all betas in (0, 1)).")
            if not bool(log_alphas[0] < 0):
                raise ValueError("alphas_cumprod must be < 1 (betas > 0).")
            self.total_N = n
            # knots t_n = n / N (n = 1..N), computed as correctly rounded n / N
            self.t_array = torch.arange(1, n + 1, dtype=torch.float64) / n
            self.log_alpha_array = log_alphas
        else:
            self.total_N = 1000
            self.beta_0 = float(continuous_beta_0)
            self.beta_1 = float(continuous_beta_1)
            if not (self.beta_0 > 0 and self.beta_1 >= self.beta_0):
                raise ValueError("Need 0 < continuous_beta_0 <= continuous_beta_1.")

    # ------------------------------------------------------------------ tables
    def _tables(self, like: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        key = (like.device, like.dtype)
        tab = self._cache.get(key)
        if tab is None:
            t_arr = self.t_array.to(device=like.device, dtype=like.dtype)
            la = self.log_alpha_array.to(device=like.device, dtype=like.dtype)
            # increasing-x copies for the inverse map log_alpha -> t
            tab = (t_arr, la, torch.flip(la, dims=[0]).contiguous(), torch.flip(t_arr, dims=[0]).contiguous())
            self._cache[key] = tab
        return tab

    @staticmethod
    def _as_tensor(t) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t if t.is_floating_point() else t.to(torch.float64)
        return torch.as_tensor(t, dtype=torch.float64)

    # ---------------------------------------------------------------- marginals
    def marginal_log_mean_coeff(self, t) -> torch.Tensor:
        """log(alpha_t)."""
        t = self._as_tensor(t)
        if self.schedule == "discrete":
            t_arr, la, _, _ = self._tables(t)
            return _interp(t, t_arr, la)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def marginal_alpha(self, t) -> torch.Tensor:
        """alpha_t = exp(log alpha_t)."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_t^2) (computed with expm1 for accuracy near t = 0)."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t) -> torch.Tensor:
        """lambda_t = log(alpha_t) - log(sigma_t)."""
        log_alpha = self.marginal_log_mean_coeff(t)
        log_sigma = 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))
        return log_alpha - log_sigma

    def inverse_lambda(self, lamb) -> torch.Tensor:
        """The time t with lambda_t = lamb."""
        lamb = self._as_tensor(lamb)
        log_alpha = _log_alpha_from_lambda(lamb)
        if self.schedule == "discrete":
            _, _, la_inc, t_inc = self._tables(lamb)
            return _interp(log_alpha, la_inc, t_inc)
        # Solve a t^2 + b t + log_alpha = 0 with a = (beta_1 - beta_0)/4, b = beta_0/2
        # for the positive root, in the cancellation-free form t = -2c / (b + sqrt(b^2 - 4ac)).
        b = 0.5 * self.beta_0
        disc = b * b - (self.beta_1 - self.beta_0) * log_alpha
        return -2.0 * log_alpha / (b + torch.sqrt(disc))

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        if self.schedule == "discrete":
            return f"NoiseScheduleVP('discrete', N={self.total_N})"
        return f"NoiseScheduleVP('linear', beta_0={self.beta_0}, beta_1={self.beta_1})"
