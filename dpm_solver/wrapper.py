"""Turn a trained diffusion network into the continuous-time noise predictor
``model_fn(x, t_continuous) -> eps`` that :class:`DPM_Solver` integrates.

Time convention (important for our UNets)
-----------------------------------------
* Discrete schedule with N training steps: the solver works on continuous time
  t in [1/N, 1] and the network is called with

      t_input = (t_continuous - 1/N) * N,

  i.e. the network's own timestep-index scale in [0, N - 1]: t = 1/N -> 0 and
  t = 1 -> N - 1.  Between the knots t_input is real-valued (not rounded); our
  UNet's sinusoidal time embedding accepts non-integer timesteps.
* Continuous ('linear') schedule: the network is called with t_input = t_continuous.

Model parametrisations (x_t = alpha_t x_0 + sigma_t eps):
  'noise'   : network predicts eps
  'x_start' : network predicts x_0           -> eps = (x - alpha_t x_0) / sigma_t
  'v'       : network predicts v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022)
                                             -> eps = alpha_t v + sigma_t x
  'score'   : network predicts grad log p_t  -> eps = -sigma_t * score

If the network returns more channels than ``x`` has (learned variance: the
prediction and the variance values stacked on dim 1), the first ``x.shape[1]``
channels are used.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from .schedule import NoiseScheduleVP

__all__ = ["model_wrapper"]

_MODEL_TYPES = ("noise", "x_start", "v", "score")
_GUIDANCE_TYPES = ("uncond", "classifier-free")


def _bcast(coef: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample coefficient of shape [B] to [B, 1, ..., 1] (``ndim`` dims)."""
    return coef.reshape(coef.shape + (1,) * (ndim - coef.dim()))


def model_wrapper(
    model: Callable[..., torch.Tensor],
    noise_schedule: NoiseScheduleVP,
    model_type: str = "noise",
    model_kwargs: Optional[Dict[str, Any]] = None,
    guidance_type: str = "uncond",
    condition: Any = None,
    unconditional_condition: Any = None,
    guidance_scale: float = 1.0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap ``model`` into ``model_fn(x, t_continuous)`` returning a noise prediction.

    Args:
        model: ``model(x, t_input, **model_kwargs)`` (``guidance_type='uncond'``) or
            ``model(x, t_input, cond, **model_kwargs)`` (``'classifier-free'``).
            ``t_input`` is a tensor of shape [batch]; see the module docstring for
            its scale.
        noise_schedule: the :class:`NoiseScheduleVP` the model was trained with.
        model_type: 'noise' | 'x_start' | 'v' | 'score' (what the network predicts).
        model_kwargs: extra keyword arguments for every model call (e.g. the
            conditioning image of a segmentation diffusion model).
        guidance_type: 'uncond' (default) or 'classifier-free', which returns
            eps_uncond + guidance_scale * (eps_cond - eps_uncond); both branches
            are evaluated in one batched call (inputs concatenated on dim 0).
        condition, unconditional_condition, guidance_scale: used by
            'classifier-free' only.

    Returns:
        ``model_fn(x, t_continuous)``; ``t_continuous`` is a scalar tensor or a
        tensor of shape [batch] with values in the schedule's time range.
    """
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {model_type!r}")
    if guidance_type not in _GUIDANCE_TYPES:
        raise ValueError(f"guidance_type must be one of {_GUIDANCE_TYPES}, got {guidance_type!r}")
    kwargs = dict(model_kwargs or {})

    def get_model_input_time(t_continuous: torch.Tensor) -> torch.Tensor:
        """Continuous solver time -> the time argument the network expects."""
        if noise_schedule.schedule == "discrete":
            n = noise_schedule.total_N
            return (t_continuous - 1.0 / n) * n
        return t_continuous

    def noise_pred_fn(x: torch.Tensor, t_continuous: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if t_continuous.dim() == 0:
            t_continuous = t_continuous.expand(x.shape[0])
        t_input = get_model_input_time(t_continuous)
        if cond is None:
            out = model(x, t_input, **kwargs)
        else:
            out = model(x, t_input, cond, **kwargs)
        if out.dim() == x.dim() and out.shape[1] > x.shape[1]:
            out = out[:, : x.shape[1]]  # learned variance: keep the prediction channels
        if model_type == "noise":
            return out
        alpha_t = _bcast(noise_schedule.marginal_alpha(t_continuous), x.dim()).to(out.dtype)
        sigma_t = _bcast(noise_schedule.marginal_std(t_continuous), x.dim()).to(out.dtype)
        if model_type == "x_start":
            return (x - alpha_t * out) / sigma_t
        if model_type == "v":
            return alpha_t * out + sigma_t * x
        return -sigma_t * out  # 'score'

    def model_fn(x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        if guidance_type == "uncond":
            return noise_pred_fn(x, t_continuous)
        if guidance_scale == 1.0 or unconditional_condition is None:
            return noise_pred_fn(x, t_continuous, cond=condition)
        if t_continuous.dim() == 0:
            t_continuous = t_continuous.expand(x.shape[0])
        x_in = torch.cat([x, x], dim=0)
        t_in = torch.cat([t_continuous, t_continuous], dim=0)
        c_in = torch.cat([unconditional_condition, condition], dim=0)
        eps_uncond, eps_cond = noise_pred_fn(x_in, t_in, cond=c_in).chunk(2, dim=0)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    model_fn.get_model_input_time = get_model_input_time  # type: ignore[attr-defined]
    return model_fn
