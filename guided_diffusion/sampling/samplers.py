"""One entry point over every sampler: DDPM (ancestral), DDIM and DPM-Solver(++), on the trained schedule.

Every sampler has the same signature, in the spirit of k-diffusion's `sampling.py`:

    sampler(model_fn, diffusion, x_start, spec, noise) -> x at level spec.t_end (x_0 estimate in [-1, 1])

where `model_fn(x_t, t)` is the network with the image condition already bound (t on the diffusion's index
scale 0..T-1, real-valued allowed) and `noise` draws the fresh Gaussian noise ancestral steps need. The chain
runs from x_T (or ADDPM's x_{pre_t}, spec.t_start) down to x_0 (or x_{stop_t}, spec.t_end). The
schedule is always the diffusion the model was trained with; `spec.steps` only picks how many of its noise
levels are visited. Network evaluations are counted by `CountingModel`, never by bookkeeping in the loops.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from guided_diffusion.diffusion.gaussian_diffusion import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim", "dpm_solver", "dpm_solver++", "sde-dpm_solver++")
# the solver samplers and the dpm_solver algorithm each one runs
SOLVER_ALGORITHMS = {"dpm_solver": "dpmsolver", "dpm_solver++": "dpmsolver++",
                     "sde-dpm_solver++": "sde-dpmsolver++"}
# --prediction -> the model_type of dpm_solver.model_wrapper
WRAPPER_MODEL_TYPES = {"eps": "noise", "x0": "x_start", "v": "v"}
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """What to run: sampler name, number of steps, the solver's knobs, and the stretch of the chain.

    The chain runs from x_{t_start} down to x_{t_end} in DDPM's 1-based levels (x_t has alpha_bar at the
    diffusion's index t - 1): t_start = T (None) starts from pure noise, t_end = 0 ends on the clean mask x_0.
    ADDPM's truncated inverse process is t_start = pre_t, t_end = stop_t (addpm.py).
    """
    sampler: str = "dpm_solver++"
    steps: int = 20
    order: int = 2
    skip_type: str = "time_uniform"
    method: str = "multistep"
    eta: float = 0.0            # DDIM stochasticity (0: deterministic)
    td: float = 0.0             # DDIM's asymmetric time difference, in steps (Pix2Seq-D / Analog Bits §3)
    clip_denoised: bool = True  # clamp x_0 estimates to the mask range [-1, 1]
    t_start: int | None = None  # first level x_{t_start} (None: T)
    t_end: int = 0              # last level x_{t_end} (0: x_0)

    def interval(self, num_timesteps: int) -> tuple[int, int]:
        """(start, end) levels of the chain, 1-based (start = T: pure noise; end = 0: the clean mask)."""
        return (num_timesteps if self.t_start is None else self.t_start), self.t_end

    def validate(self, num_timesteps: int) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        start, end = self.interval(num_timesteps)
        if not 1 <= start <= num_timesteps:
            raise ValueError(f"--pre_t must be in 1..{num_timesteps} (the model's diffusion_steps), got {start}")
        if not 0 <= end < start:
            raise ValueError(f"--stop_t must be in 0..{start - 1} (below --pre_t {start}), got {end}")
        span = start - end
        where = "the model's diffusion_steps" if span == num_timesteps else f"the levels from --pre_t {start} " \
                                                                             f"down to --stop_t {end}"
        if not 1 <= self.steps <= span:
            raise ValueError(f"--steps must be in 1..{span} ({where}), got {self.steps}")
        if self.td < 0 or (self.td and self.sampler != "ddim"):
            raise ValueError(f"--td is DDIM's time difference, >= 0 and for --sampler ddim only, got {self.td} with "
                             f"--sampler {self.sampler}")
        if self.sampler in SOLVER_ALGORITHMS:
            if end == 0 and start < 2:
                raise ValueError("the solvers integrate down to x_1 and then denoise: --pre_t must be >= 2")
            if self.order not in (1, 2, 3):
                raise ValueError(f"--order must be 1, 2 or 3, got {self.order}")
            if self.skip_type not in ("time_uniform", "logSNR", "time_quadratic"):
                raise ValueError(f"--skip_type must be time_uniform, logSNR or time_quadratic, got {self.skip_type!r}")
            if self.method not in ("multistep", "singlestep", "singlestep_fixed"):
                raise ValueError(f"--method must be multistep, singlestep or singlestep_fixed, got {self.method!r}")
            if self.sampler == "sde-dpm_solver++" and (self.method != "multistep" or self.order > 2):
                raise ValueError(f"--sampler sde-dpm_solver++ runs --method multistep with --order 1 or 2, got "
                                 f"--method {self.method} --order {self.order}")


class CountingModel:
    """Wraps model_fn and counts its calls (NFE = network function evaluations)."""

    def __init__(self, fn: ModelFn):
        self.fn, self.nfe = fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.fn(x, t)


class ConditionedModel:
    """The network as every sampler calls it, model_fn(x_t, t): the image condition bound (computed once per image),
    the timestep scaled as in training, and, for a self-conditioned model (Chen, Zhang, Hinton 2022, "Analog Bits",
    §3), the previous call's x_0 estimate (clipped, divided by the mask scale) fed back as its extra input, zeros at
    the first call. That estimate is the one piece of state a chain carries; it is reset per chain."""

    def __init__(self, model, diffusion: GaussianDiffusion, cond):
        self.model, self.diffusion, self.cond = model, diffusion, cond
        self.self_condition = getattr(model, "self_condition", False)
        self.previous: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = self.diffusion
        if not self.self_condition:
            return self.model(x, d.scale_timesteps(t), cond=self.cond)
        fed = self.previous if self.previous is not None else torch.zeros_like(x)
        out = self.model(x, d.scale_timesteps(t), cond=self.cond, self_cond=fed)
        x0 = d.x0_and_eps(d.split_output(out, x)[0].float(), x.float(), t.float())[0]
        self.previous = (d.clip_x0(x0) / d.mask_scale).to(x.dtype)
        return out


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
    return chain_timesteps(steps, num_timesteps, 0)


def chain_timesteps(steps: int, start: int, end: int) -> list[int]:
    """The model indices a chain from level x_start down to x_end calls the network at: `steps` of them evenly
    spread over start-1..end, descending, first start-1 (the network sees x_start), last end (when steps > 1;
    that step lands on x_end)."""
    idx = np.unique(np.round(np.linspace(start - 1, end, steps)).astype(int))
    return [int(i) for i in idx[::-1]]


# ----- samplers (one shared signature) -------------------------------------------------------------
def sample_ddpm(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, spec: SamplerSpec,
                noise: NoiseSource) -> torch.Tensor:
    """Ancestral sampling (DDPM Algorithm 2) from x_start to x_end. Over every trained level on the trained
    diffusion; over fewer, on a respaced subsequence of the trained noise levels (Improved DDPM §4: betas
    recomputed from alpha_bar of the visited levels), the network still seeing the original timestep indices.
    A chain that stops at x_end > 0 keeps level end - 1 in the subsequence, so its last step is the posterior
    q(x_end | x_{end+1}, x_0) of the trained schedule and adds its noise."""
    start, end = spec.interval(diffusion.num_timesteps)
    ts = chain_timesteps(spec.steps, start, end)
    if len(ts) == start - end:  # every trained step: the trained diffusion, trained indices
        d, local = diffusion, ts
    else:
        keep = sorted(ts) if end == 0 else [end - 1] + sorted(ts)
        d, local = respaced(diffusion, keep), [keep.index(i) for i in ts]
    for t_model, k in zip(ts, local):
        out = model_fn(x, torch.full((x.shape[0],), float(t_model), device=x.device))
        t_local = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        x = d.p_sample_step(out, x, t_local, noise=noise(tuple(x.shape[1:])) if k > 0 else None,
                            clip_denoised=spec.clip_denoised).sample
    return x


def sample_ddim(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, spec: SamplerSpec,
                noise: NoiseSource) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) over `steps` evenly spaced trained noise levels from x_start to x_end;
    eta = 0 is deterministic. With td > 0 (the asymmetric time intervals of Chen, Zhang, Hinton 2022, "Analog
    Bits", §3, used by Pix2Seq-D) each step lands td steps' worth of levels below the next level, while the next
    network call still sees the next level's t, so the network is given slightly less noise than its t says."""
    start, end = spec.interval(diffusion.num_timesteps)
    ts = chain_timesteps(spec.steps, start, end)
    shift = round(spec.td * (start - end) / spec.steps)
    for cur, nxt in zip(ts, ts[1:] + [end - 1]):  # index end - 1 is level x_end (-1: x_0)
        t = torch.full((x.shape[0],), cur, device=x.device, dtype=torch.long)
        out = model_fn(x, t.float())
        land = nxt if nxt < end else max(nxt - shift, end)  # the last step still lands on x_end exactly
        step_noise = noise(tuple(x.shape[1:])) if spec.eta > 0 and land >= 0 else None
        x = diffusion.ddim_step(out, x, t, torch.full_like(t, land), eta=spec.eta if land >= 0 else 0.0,
                                noise=step_noise, clip_denoised=spec.clip_denoised).sample
    return x


def sample_dpm_solver(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, spec: SamplerSpec,
                      noise: NoiseSource) -> torch.Tensor:
    """DPM-Solver (noise prediction), DPM-Solver++ (data prediction) or SDE-DPM-Solver++ (data prediction,
    reverse SDE: fresh noise every step, drawn from `noise`) on the trained discrete schedule, `steps` solver
    steps from t = start/N to t = end/N (the schedule's knot t_n = n/N is level x_n, the network's index n - 1).
    A chain to x_0 integrates to t = 1/N and spends one more evaluation denoising to x_0 (as the last DDPM/DDIM
    step does), so no residual noise of sigma_{1/N} is left: NFE = steps + 1.
    The network's target (eps, x0 or v) is the wrapper's model_type; the x_0 estimates are clamped to the mask
    range [-b, b]."""
    from dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper

    n = diffusion.num_timesteps
    start, end = spec.interval(n)
    schedule = NoiseScheduleVP("discrete", betas=diffusion.betas.to(x.device, torch.float32))
    wrapped = model_wrapper(model_fn, schedule, model_type=WRAPPER_MODEL_TYPES[diffusion.prediction])
    solver = DPM_Solver(wrapped, schedule, algorithm_type=SOLVER_ALGORITHMS[spec.sampler],
                        correcting_x0_fn=(lambda x0, t: diffusion.clip_x0(x0)) if spec.clip_denoised else None)
    return solver.sample(x, steps=spec.steps, t_start=start / n, t_end=max(end, 1) / n, order=spec.order,
                         skip_type=spec.skip_type, method=spec.method, lower_order_final=True,
                         denoise_to_zero=end == 0, noise_fn=lambda like: noise(tuple(like.shape[1:])))


SAMPLER_FNS = {"ddpm": sample_ddpm, "ddim": sample_ddim, **dict.fromkeys(SOLVER_ALGORITHMS, sample_dpm_solver)}


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
                             rescale_timesteps=diffusion.rescale_timesteps, prediction=diffusion.prediction,
                             mask_scale=diffusion.mask_scale)


@dataclass
class EnsembleResult:
    """Members as foreground probabilities in [0, 1], (B, N, H, W), and the network evaluations spent per member
    (with its parts, where a strategy has several networks: ADDPM's pre-segmentation, chain and denoiser)."""
    members: torch.Tensor
    nfe: int
    nfe_parts: dict = field(default_factory=dict)


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
    counting = CountingModel(ConditionedModel(model, diffusion, cond))
    noise = NoiseSource(seeds, num_ensemble, images.device)
    size = images.shape[-2:]
    x_T = noise((1, *size))
    x0 = SAMPLER_FNS[spec.sampler](counting, diffusion, x_T, spec, noise)
    members = diffusion.x0_to_probability(x0).reshape(b, num_ensemble, *size)
    return EnsembleResult(members, counting.nfe)


# --views: the image as it is, mirrored left-right, mirrored up-down, and both (flips training augments with)
FLIP_VIEWS = ((), (-1,), (-2,), (-1, -2))
VIEW_COUNTS = (1, 2, 4)


def check_views(views: int) -> None:
    """--views is 1, 2 or 4 (the flips of FLIP_VIEWS), else a one-line error naming the flag."""
    if views not in VIEW_COUNTS:
        raise ValueError(f"--views must be one of {', '.join(map(str, VIEW_COUNTS))}, got {views}")


def view_seed(seed: int, view: int) -> int:
    """The per-image seed of view `view`: view 0 keeps the image's own, so --views 1 samples as without views."""
    return seed if view == 0 else image_seed(seed, f"view{view}")


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.flip(dims) if dims else x


def sample_views(strategy: "Strategy", model, diffusion, images: torch.Tensor, num_ensemble: int,
                 seeds: list[int], views: int = 1) -> EnsembleResult:
    """`num_ensemble` members of each of `views` mirrored copies of every image (test-time mirroring, as nnU-Net
    predicts): the copies go through the strategy in one batch, each with its own seeds, and every member is
    mirrored back to the image's frame. Members (B, views * num_ensemble, H, W): view v's are v*N ... v*N + N-1,
    so the fused mask averages over views as well as noise and the uncertainty map shows where views disagree.
    The NFE stays per member; the image encoder runs once per copy."""
    check_views(views)
    if views == 1:
        return strategy.sample(model, diffusion, images, num_ensemble, seeds)
    flips = FLIP_VIEWS[:views]
    copies = torch.cat([_flip(images, dims) for dims in flips])
    result = strategy.sample(model, diffusion, copies, num_ensemble,
                             [view_seed(s, v) for v in range(views) for s in seeds])
    parts = result.members.chunk(views)  # (B, N, H, W) per view, in the order of `flips`
    members = torch.cat([_flip(part, dims) for part, dims in zip(parts, flips)], dim=1)
    return EnsembleResult(members, result.nfe, result.nfe_parts)


class Strategy(Protocol):
    """How the pipeline turns a batch of images into ensemble members (sampling/pipeline.py)."""

    @property
    def label(self) -> str:
        """The manifest's sampler column."""

    @property
    def steps(self) -> int:
        """The manifest's steps column."""

    def record(self) -> dict:
        """The strategy's own manifest columns."""

    def sample(self, model, diffusion: GaussianDiffusion, images: torch.Tensor, num_ensemble: int,
               seeds: list[int]) -> EnsembleResult:
        """`num_ensemble` members per image."""

    def warn_if_trained_on(self, ids: list[str]) -> None:
        """Warn when an image to be sampled was a training image of a network the strategy brings."""


@dataclass
class FromNoise:
    """A plain sampler: every member from pure noise x_T down to the mask x_0 (spec.sampler)."""
    spec: SamplerSpec

    @property
    def label(self) -> str:
        return self.spec.sampler

    @property
    def steps(self) -> int:
        return self.spec.steps

    def record(self) -> dict:
        return {}

    def sample(self, model, diffusion: GaussianDiffusion, images: torch.Tensor, num_ensemble: int,
               seeds: list[int]) -> EnsembleResult:
        return sample_ensemble(model, diffusion, images, num_ensemble, self.spec, seeds)

    def warn_if_trained_on(self, ids: list[str]) -> None:
        """The diffusion model's own split is the one sampled: nothing to warn about."""


@dataclass
class OnePass:
    """A plain segmentation network (a pre-segmentation checkpoint, the plain-UNet baseline): its sigmoid in one
    pass per image, repeated for the members (so the uncertainty map is zero, except where --views disagree)."""
    label: str = "preseg"
    steps: int = 1

    def record(self) -> dict:
        return {}

    @torch.inference_mode()
    def sample(self, model, diffusion, images: torch.Tensor, num_ensemble: int, seeds: list[int]) -> EnsembleResult:
        prob = torch.sigmoid(model(images).float())  # (B, 1, H, W)
        return EnsembleResult(prob.expand(-1, num_ensemble, -1, -1).contiguous(), 1)

    def warn_if_trained_on(self, ids: list[str]) -> None:
        """The network's own split is the one sampled: nothing to warn about."""
