"""Gaussian diffusion over segmentation masks: schedules, forward process, posterior, losses, reverse steps.

Notation follows Ho et al. 2020 ("DDPM", arXiv:2006.11239) and Nichol & Dhariwal 2021 ("Improved DDPM",
arXiv:2102.09672): alpha_bar_t = prod_{s<=t} (1 - beta_s), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
Timesteps are integer indices 0..T-1 into the arrays below (index 0 is the first, least noisy step).
Masks live in [-b, b] (foreground = +b; b = --mask_scale, 1 by default; Chen 2023, "On the importance of noise
scheduling for diffusion models", §2, scales the data to move the signal-to-noise ratio of every level).

The network predicts one of three equivalent targets (--prediction; with a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)
and x_t = a x_0 + s eps):
  eps  the noise (DDPM eq. 11),                               x_0 = (x_t - s eps) / a
  x0   the clean mask (DDPM's "predict x_0", §3.2),           eps = (x_t - a x_0) / s
  v    a eps - s x_0 (Salimans & Ho 2022, "Progressive distillation", §4 and App. D),
                                                              x_0 = a x_t - s v,  eps = s x_t + a v
and, with learned sigma, the interpolation value of Improved DDPM eq. 15 in a second channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")


def x0_and_eps(kind: str, pred: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
    """(x_0, eps) from the network's prediction of `kind` at a level with a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)
    (broadcastable to x_t); exact inverses of `training_target`."""
    if kind == "eps":
        return (x_t - s * pred) / a, pred
    if kind == "x0":
        return pred, (x_t - a * pred) / s
    if kind == "v":
        return a * x_t - s * pred, s * x_t + a * pred
    raise ValueError(f"--prediction must be one of {', '.join(PREDICTIONS)}, got {kind!r}")


def training_target(kind: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What a network of prediction `kind` is trained to output for x_t = a x0 + s eps."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    raise ValueError(f"--prediction must be one of {', '.join(PREDICTIONS)}, got {kind!r}")


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Betas of a named schedule over `num_steps` (float64)."""
    if num_steps < 1:
        raise ValueError(f"--diffusion_steps must be >= 1, got {num_steps}")
    if name == "linear":
        # DDPM's 1e-4..0.02 over 1000 steps, rescaled so other step counts span the same noise range
        # (clipped at 0.999 like the cosine schedule: below ~20 steps the rescaled end exceeds 1).
        scale = 1000.0 / num_steps
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64), 0.999)
    if name == "cosine":
        # Improved DDPM eq. 17, with betas clipped at 0.999 to avoid a singularity at t = T.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999)
                 for i in range(num_steps)]
        return np.array(betas, dtype=np.float64)
    raise ValueError(f"--noise_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


def _gather(arr: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[t] reshaped to broadcast over a tensor of `ndim` dimensions."""
    out = arr.to(t.device)[t]
    return out.reshape(out.shape + (1,) * (ndim - 1))


@dataclass
class StepOutput:
    """What one reverse step produced: the next sample and the model's clean-mask estimate."""
    sample: torch.Tensor
    pred_xstart: torch.Tensor


class GaussianDiffusion:
    """The discrete-time diffusion a model is trained with; the schedule always comes from here."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool = False,
                 rescale_learned_sigmas: bool = False, rescale_timesteps: bool = False,
                 prediction: str = "eps", mask_scale: float = 1.0):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        if prediction not in PREDICTIONS:
            raise ValueError(f"--prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        if not mask_scale > 0:
            raise ValueError(f"--mask_scale must be > 0, got {mask_scale}")
        self.num_timesteps = len(betas)
        self.prediction, self.mask_scale = prediction, float(mask_scale)
        self.learn_sigma = learn_sigma
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.rescale_timesteps = rescale_timesteps

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)          # DDPM eq. 7, beta tilde
        t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        self.betas = t64(betas)
        self.alphas_cumprod = t64(ac)
        self.alphas_cumprod_prev = t64(ac_prev)
        self.sqrt_ac = t64(np.sqrt(ac))
        self.sqrt_one_minus_ac = t64(np.sqrt(1.0 - ac))
        self.sqrt_recip_ac = t64(np.sqrt(1.0 / ac))
        self.sqrt_recipm1_ac = t64(np.sqrt(1.0 / ac - 1.0))
        self.posterior_variance = t64(post_var)
        # beta tilde is 0 at t = 0; use its t = 1 value there so the log stays finite (as Improved DDPM does).
        self.posterior_log_variance_clipped = t64(np.log(np.append(post_var[1], post_var[1:])))
        self.posterior_mean_coef1 = t64(betas * np.sqrt(ac_prev) / (1.0 - ac))        # DDPM eq. 7
        self.posterior_mean_coef2 = t64((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
        self.log_alpha = t64(0.5 * np.log(ac))  # log sqrt(alpha_bar), interpolated between the levels (alpha_sigma)

    # ----- masks ------------------------------------------------------------------------------------
    def mask_to_x0(self, mask: torch.Tensor) -> torch.Tensor:
        """A {0, 1} mask (or a probability) as diffusion data in [-b, b]."""
        return (mask * 2 - 1) * self.mask_scale

    def x0_to_probability(self, x0: torch.Tensor) -> torch.Tensor:
        """Diffusion data in [-b, b] as a foreground probability in [0, 1] (0.5 at x_0 = 0)."""
        return ((x0.float() / self.mask_scale).clamp(-1, 1) + 1) / 2

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """x_0 estimates clamped to the mask range [-b, b]."""
        return x0.clamp(-self.mask_scale, self.mask_scale)

    # ----- forward process ------------------------------------------------------------------------
    def q_mean_variance(self, x_start, t):
        """Mean and variance of q(x_t | x_0) (DDPM eq. 4)."""
        mean = _gather(self.sqrt_ac, t, x_start.ndim).to(x_start.dtype) * x_start
        var = _gather(1.0 - self.alphas_cumprod, t, x_start.ndim).to(x_start.dtype)
        return mean, var.expand_as(x_start)

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        a = _gather(self.sqrt_ac, t, x_start.ndim).to(x_start.dtype)
        s = _gather(self.sqrt_one_minus_ac, t, x_start.ndim).to(x_start.dtype)
        return a * x_start + s * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        nd, dt = x_t.ndim, x_t.dtype
        mean = (_gather(self.posterior_mean_coef1, t, nd).to(dt) * x_start
                + _gather(self.posterior_mean_coef2, t, nd).to(dt) * x_t)
        var = _gather(self.posterior_variance, t, nd).to(dt).expand_as(x_t)
        logvar = _gather(self.posterior_log_variance_clipped, t, nd).to(dt).expand_as(x_t)
        return mean, var, logvar

    # ----- the model's view ---------------------------------------------------------------------
    def scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timestep values the network sees: the index, or index * 1000 / T with --rescale_timesteps."""
        t = t.float()
        return t * (1000.0 / self.num_timesteps) if self.rescale_timesteps else t

    def alpha_sigma(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) at timestep indices t, shaped to broadcast over `ndim` dims. Integer
        t reads the table; real-valued t (DPM-Solver between the levels) interpolates log sqrt(alpha_bar) linearly in
        t, as dpm_solver.NoiseScheduleVP('discrete') does, so both see the same noise level."""
        t = t.to(torch.float64)
        lo = t.floor().clamp(0, self.num_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        la = self.log_alpha.to(t.device)
        log_a = la[lo.long()] + (t - lo) * (la[hi.long()] - la[lo.long()])
        a = torch.exp(log_a)
        s = torch.sqrt((1 - a * a).clamp(min=0))
        shape = a.shape + (1,) * (ndim - 1)
        return a.reshape(shape), s.reshape(shape)

    def x0_and_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(x_0, eps) estimates from the network's prediction channel(s) at timestep indices t (real-valued allowed)."""
        if self.prediction == "eps" and not torch.is_floating_point(t):  # the table: DDPM's own formula
            return self.predict_xstart_from_eps(x_t, t, pred), pred
        a, s = self.alpha_sigma(t, x_t.ndim)
        return x0_and_eps(self.prediction, pred, x_t, a.to(x_t.dtype), s.to(x_t.dtype))

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
        nd, dt = x_t.ndim, x_t.dtype
        return (_gather(self.sqrt_recip_ac, t, nd).to(dt) * x_t
                - _gather(self.sqrt_recipm1_ac, t, nd).to(dt) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """Inverse of predict_xstart_from_eps."""
        nd, dt = x_t.ndim, x_t.dtype
        return ((_gather(self.sqrt_recip_ac, t, nd).to(dt) * x_t - pred_xstart)
                / _gather(self.sqrt_recipm1_ac, t, nd).to(dt))

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """(prediction, variance values or None) from the network's output channels."""
        c = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learn_sigma expects {2 * c} output channels, got {model_output.shape[1]}")
            return model_output[:, :c], model_output[:, c:]
        if model_output.shape[1] != c:
            raise ValueError(f"expected {c} output channels, got {model_output.shape[1]}")
        return model_output, None

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = True):
        """Mean, variance and x_0 estimate of p(x_{t-1} | x_t) from the network output.

        Fixed variance: beta tilde (DDPM's sigma_t^2 = beta tilde choice). Learned: Improved DDPM eq. 15,
        log Sigma = v log beta + (1 - v) log beta tilde, with the network's v in [-1, 1] mapped to [0, 1].
        """
        pred, var_values = self.split_output(model_output, x_t)
        nd, dt = x_t.ndim, x_t.dtype
        if var_values is None:
            logvar = _gather(self.posterior_log_variance_clipped, t, nd).to(dt).expand_as(x_t)
        else:
            min_log = _gather(self.posterior_log_variance_clipped, t, nd).to(dt)
            max_log = _gather(torch.log(self.betas), t, nd).to(dt)
            frac = (var_values + 1) / 2
            logvar = frac * max_log + (1 - frac) * min_log
        pred_xstart, eps = self.x0_and_eps(pred, x_t, t)
        if clip_denoised:
            pred_xstart = self.clip_x0(pred_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": torch.exp(logvar), "log_variance": logvar,
                "pred_xstart": pred_xstart, "eps": eps}

    # ----- losses -----------------------------------------------------------------------------------
    def training_losses(self, model_output, x_start, x_t, t, noise) -> dict:
        """Per-sample losses: MSE of the prediction target (eps: DDPM eq. 14; x0 or v: the same squared error on
        that target), plus the hybrid VLB term with learned sigma. `noise` is the eps of x_t = a x_start + s eps.

        With learned sigma the VLB term sees a frozen prediction so it trains only the variance (Improved DDPM
        §3.1, L_hybrid = L_simple + lambda L_vlb); --rescale_learned_sigmas multiplies it by T / 1000.
        """
        pred, var_values = self.split_output(model_output, x_t)
        if self.prediction == "eps":
            target = noise
        else:
            a, s = (_gather(arr, t, x_t.ndim).to(x_t.dtype) for arr in (self.sqrt_ac, self.sqrt_one_minus_ac))
            target = training_target(self.prediction, x_start, noise, a, s)
        mse = ((target.float() - pred.float()) ** 2).mean(dim=tuple(range(1, x_t.ndim)))
        out = {"mse": mse}
        loss = mse
        if var_values is not None:
            frozen = torch.cat([pred.detach(), var_values], dim=1).float()
            vb = self._vb_terms_bpd(frozen, x_start.float(), x_t.float(), t)
            if self.rescale_learned_sigmas:
                vb = vb * (self.num_timesteps / 1000.0)
            out["vb"] = vb
            loss = loss + vb
        out["loss"] = loss
        return out

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim; decoder NLL at t = 0 (DDPM §3.3), on the data
        divided by the mask scale so its 256 bins span [-1, 1] as in DDPM."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])
        kl = kl.mean(dim=tuple(range(1, x_t.ndim))) / math.log(2.0)
        b = self.mask_scale
        nll = -discretized_gaussian_log_likelihood(x_start / b, p["mean"] / b, 0.5 * p["log_variance"] - math.log(b))
        nll = nll.mean(dim=tuple(range(1, x_t.ndim))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ----- reverse steps (the loops live in sampling/samplers.py) --------------------------------------------
    def p_sample_step(self, model_output, x_t, t, noise=None, clip_denoised: bool = True) -> StepOutput:
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2); no noise is added at t = 0."""
        p = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        sample = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise
        return StepOutput(sample, p["pred_xstart"])

    def ddim_step(self, model_output, x_t, t, t_prev, eta: float = 0.0, noise=None,
                  clip_denoised: bool = True) -> StepOutput:
        """One DDIM step from index t to index t_prev < t (Song et al. 2021 eq. 12); t_prev = -1 means x_0."""
        pred, _ = self.split_output(model_output, x_t)
        nd, dt = x_t.ndim, x_t.dtype
        pred_xstart, eps = self.x0_and_eps(pred, x_t, t)
        if clip_denoised:
            pred_xstart = self.clip_x0(pred_xstart)
            eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)
        a_t = _gather(self.alphas_cumprod, t, nd).to(dt)
        ac_ext = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        a_prev = _gather(ac_ext, t_prev + 1, nd).to(dt)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
        mean = torch.sqrt(a_prev) * pred_xstart + torch.sqrt((1 - a_prev - sigma ** 2).clamp(min=0)) * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(x_t)
            mean = mean + sigma * noise
        return StepOutput(mean, pred_xstart)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    """Standard normal CDF through the tanh approximation (accurate to ~1e-3, as in DDPM's decoder)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian (DDPM §3.3, eq. 13)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


def create_diffusion(diffusion_steps: int, noise_schedule: str, learn_sigma: bool,
                     rescale_learned_sigmas: bool = False, rescale_timesteps: bool = False,
                     prediction: str = "eps", mask_scale: float = 1.0) -> GaussianDiffusion:
    """The diffusion a run is trained with, from its config values."""
    return GaussianDiffusion(get_named_beta_schedule(noise_schedule, diffusion_steps), learn_sigma=learn_sigma,
                             rescale_learned_sigmas=rescale_learned_sigmas, rescale_timesteps=rescale_timesteps,
                             prediction=prediction, mask_scale=mask_scale)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-sample soft Dice + binary cross-entropy on logits vs a {0,1} mask (calibration-head loss)."""
    logits = logits.float()
    dims = tuple(range(1, logits.ndim))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=dims)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=dims)
    dice = (2 * inter + eps) / (p.sum(dim=dims) + target.sum(dim=dims) + eps)
    return bce + (1 - dice)
