"""One entry point over every sampler: DDPM (ancestral), DDIM and DPM-Solver(++), on the trained schedule.

Every sampler has the same signature, in the spirit of k-diffusion's `sampling.py`:

    sampler(model_fn, diffusion, x_T, spec, noise) -> x_0 estimate in [-1, 1]

where `model_fn(x_t, t)` is the network with the image condition already bound (t on the diffusion's index
scale 0..T-1, real-valued allowed) and `noise` draws the fresh Gaussian noise ancestral steps need. The
schedule is always the diffusion the model was trained with; `spec.steps` only picks how many of its noise
levels are visited. Network evaluations are counted by `CountingModel`, never by bookkeeping in the loops.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim", "dpm_solver", "dpm_solver++")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """What to run: sampler name, number of steps, and the solver's knobs."""
    sampler: str = "dpm_solver++"
    steps: int = 20
    order: int = 2
    skip_type: str = "time_uniform"
    method: str = "multistep"
    eta: float = 0.0            # DDIM stochasticity (0: deterministic)
    clip_denoised: bool = True  # clamp x_0 estimates to the mask range [-1, 1]

    def validate(self, num_timesteps: int) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not 1 <= self.steps <= num_timesteps:
            raise ValueError(f"--steps must be in 1..{num_timesteps} (the model's diffusion_steps), got {self.steps}")
        if self.sampler.startswith("dpm_solver"):
            if self.order not in (1, 2, 3):
                raise ValueError(f"--order must be 1, 2 or 3, got {self.order}")
            if self.skip_type not in ("time_uniform", "logSNR", "time_quadratic"):
                raise ValueError(f"--skip_type must be time_uniform, logSNR or time_quadratic, got {self.skip_type!r}")
            if self.method not in ("multistep", "singlestep", "singlestep_fixed"):
                raise ValueError(f"--method must be multistep, singlestep or singlestep_fixed, got {self.method!r}")


class CountingModel:
    """Wraps model_fn and counts its calls (NFE = network function evaluations)."""

    def __init__(self, fn: ModelFn):
        self.fn, self.nfe = fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.fn(x, t)


class NoiseSource:
    """Gaussian noise drawn per image from its own seeded generator, so an image's samples do not depend on
    which other images share its batch (or on which process samples it)."""

    def __init__(self, seeds: list[int], members: int, device: torch.device):
        self.members, self.device = members, device
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise of shape (len(seeds) * members, *shape): image i's members are rows i*members ... ."""
        return torch.cat([torch.randn((self.members, *shape), generator=g, device=self.device)
                          for g in self.gens])


def image_seed(seed: int, image_id: str) -> int:
    """A per-image seed from the run's --seed and the image id (stable across runs and platforms)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` indices evenly spread over T-1..0, descending, starting at T-1 (ending at 0 when steps > 1)."""
    idx = np.unique(np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(int))
    return [int(i) for i in idx[::-1]]


# ----- samplers (one shared signature) -------------------------------------------------------------
def sample_ddpm(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, spec: SamplerSpec,
                noise: NoiseSource) -> torch.Tensor:
    """Ancestral sampling (DDPM Algorithm 2). With steps < T, over a respaced subsequence of the trained noise
    levels (Improved DDPM §4: betas recomputed from alpha_bar of the visited steps), the network still seeing
    the original timestep indices."""
    ts = spaced_timesteps(diffusion.num_timesteps, spec.steps)
    d = diffusion if spec.steps == diffusion.num_timesteps else respaced(diffusion, ts)
    ts_model = ts[::-1]  # respaced index k corresponds to trained index ts_model[k]
    for k in reversed(range(len(ts_model))):
        t_model = torch.full((x.shape[0],), float(ts_model[k]), device=x.device)
        out = model_fn(x, t_model)
        t_local = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        x = d.p_sample_step(out, x, t_local, noise=noise(tuple(x.shape[1:])) if k > 0 else None,
                            clip_denoised=spec.clip_denoised).sample
    return x


def sample_ddim(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, spec: SamplerSpec,
                noise: NoiseSource) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) over `steps` evenly spaced trained noise levels; eta = 0 is deterministic."""
    ts = spaced_timesteps(diffusion.num_timesteps, spec.steps)
    for cur, nxt in zip(ts, ts[1:] + [-1]):
        t = torch.full((x.shape[0],), cur, device=x.device, dtype=torch.long)
        out = model_fn(x, t.float())
        step_noise = noise(tuple(x.shape[1:])) if spec.eta > 0 and nxt >= 0 else None
        x = diffusion.ddim_step(out, x, t, torch.full_like(t, nxt), eta=spec.eta if nxt >= 0 else 0.0,
                                noise=step_noise, clip_denoised=spec.clip_denoised).sample
    return x


def sample_dpm_solver(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, spec: SamplerSpec,
                      noise: NoiseSource) -> torch.Tensor:
    """DPM-Solver (noise prediction) or DPM-Solver++ (data prediction) on the trained discrete schedule,
    `steps` solver steps from t = 1 to t = 1/N, then one more evaluation that denoises to x_0 (as the last
    DDPM/DDIM step does), so no residual noise of sigma_{1/N} is left in the mask: NFE = steps + 1.
    The x_0 estimates are clamped to the mask range [-1, 1]."""
    from dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper

    schedule = NoiseScheduleVP("discrete", betas=diffusion.betas.to(x.device, torch.float32))
    wrapped = model_wrapper(model_fn, schedule, model_type="noise")
    plus = spec.sampler == "dpm_solver++"
    solver = DPM_Solver(wrapped, schedule, algorithm_type="dpmsolver++" if plus else "dpmsolver",
                        correcting_x0_fn=(lambda x0, t: x0.clamp(-1, 1)) if spec.clip_denoised else None)
    return solver.sample(x, steps=spec.steps, order=spec.order, skip_type=spec.skip_type, method=spec.method,
                         lower_order_final=True, denoise_to_zero=True)


SAMPLER_FNS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm_solver": sample_dpm_solver,
               "dpm_solver++": sample_dpm_solver}


def respaced(diffusion: GaussianDiffusion, use_timesteps: list[int]) -> GaussianDiffusion:
    """The diffusion restricted to a subset of its steps: same alpha_bar at those steps, new betas."""
    ac = diffusion.alphas_cumprod.numpy()
    keep = sorted(use_timesteps)
    prev, betas = 1.0, []
    for i in keep:
        betas.append(1 - ac[i] / prev)
        prev = ac[i]
    return GaussianDiffusion(np.array(betas), learn_sigma=diffusion.learn_sigma,
                             rescale_learned_sigmas=diffusion.rescale_learned_sigmas,
                             rescale_timesteps=diffusion.rescale_timesteps)


@dataclass
class EnsembleResult:
    """Members as foreground probabilities in [0, 1], (B, N, H, W), and the network evaluations spent."""
    members: torch.Tensor
    nfe: int


@torch.inference_mode()
def sample_ensemble(model, diffusion: GaussianDiffusion, images: torch.Tensor, num_ensemble: int,
                    spec: SamplerSpec, seeds: list[int]) -> EnsembleResult:
    """Sample `num_ensemble` masks for each image in one batch through every step.

    The image encoder runs once per image; its features are repeated for the members and reused at every
    step. Nothing per step is kept, so memory does not grow with the number of steps.
    """
    spec.validate(diffusion.num_timesteps)
    b = images.shape[0]
    cond = model.encode_condition(images).repeat_interleave(num_ensemble)
    counting = CountingModel(lambda x, t: model(x, diffusion.scale_timesteps(t), cond=cond))
    noise = NoiseSource(seeds, num_ensemble, images.device)
    size = images.shape[-2:]
    x_T = noise((1, *size))
    x0 = SAMPLER_FNS[spec.sampler](counting, diffusion, x_T, spec, noise)
    members = ((x0.float().clamp(-1, 1) + 1) / 2).reshape(b, num_ensemble, *size)
    return EnsembleResult(members, counting.nfe)
