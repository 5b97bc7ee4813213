"""ADDPM: the truncated inverse process, started from a pre-segmentation and finished by a one-step denoiser.

Guo, Xiang, Yang, Ye, Yu, Ma, "Accelerating denoising diffusion probabilistic model via truncated inverse
processes for medical image segmentation" (ADDPM; its precursor PD-DDPM is arXiv:2210.17408). Per image:
  1. pre-segment once: a separate network (aux_nets.PresegNet), or the diffusion model's own image-encoder
     head (`head`), which comes out of the encoder pass every sampler makes once per image anyway;
  2. per ensemble member, jump forward to x_{pre_t} ~ q(x_{pre_t} | x0_pre), the marginal at exactly pre_t
     (DDPM eq. 4), x0_pre the thresholded pre-segmentation in [-1, 1] (the paper's; 2p - 1 with soft=True);
  3. run the reverse chain from x_{pre_t} down to x_{stop_t}: DDPM steps, DDIM, or DPM-Solver(++) over the
     truncated interval t in [stop_t/N, pre_t/N] (samplers.py, SamplerSpec t_start/t_end);
  4. one call of the denoiser (aux_nets.DenoiserNet) maps x_{stop_t} to the mask probabilities.
Levels are DDPM's 1-based t: x_t has alpha_bar at the diffusion code's index t - 1, so the jump uses
alpha_bar[pre_t - 1], the chain's first network call is at index pre_t - 1 and its last step lands on x_{stop_t}.
pre_t in 1..T (T: the pure-noise level); stop_t in 0..pre_t - 1 (0: the chain ends on x_0 and no denoiser runs;
with pre_t = T that is the plain sampler, up to the sqrt(alpha_bar_T) x0_pre left in x_T).
Members differ only by their noise (jump and ancestral), drawn from each image's seeded NoiseSource.
The model sees only the image: no ground-truth mask is an input anywhere on this path.
NFE per image = pre-segmentation (1 for a network, 0 for the head) + chain + 1 denoiser call.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from guided_diffusion.network.aux_nets import DENOISER, PRESEG, LoadedAux, load_aux
from guided_diffusion.diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.sampling.samplers import (SAMPLER_FNS, ConditionedModel, CountingModel, EnsembleResult, NoiseSource,
                                                SamplerSpec)
from guided_diffusion.config import DiffusionConfig

ADDPM = "addpm"  # the --sampler value; its manifest label is addpm-<chain sampler>
HEAD = "head"


class HeadPreseg:
    """The diffusion model's calibration head (MedSegDiff's one-pass pre-segmentation from the image encoder)."""
    nfe = 0  # computed by the encoder pass that runs once per image for every sampler
    label = HEAD

    def __call__(self, images: torch.Tensor, cond) -> torch.Tensor:
        if cond.calib_logits is None:
            raise ValueError("--preseg head needs the diffusion model's calibration head, which --network unet does "
                             "not have; give --preseg_path (a train_preseg_network.py checkpoint)")
        return torch.sigmoid(cond.calib_logits.float())


class NetPreseg:
    """A separately trained pre-segmentation network (scripts/train_preseg_network.py): one call per image."""
    nfe = 1

    def __init__(self, net: torch.nn.Module, label: str = "net"):
        self.net, self.label = net, label

    def __call__(self, images: torch.Tensor, cond) -> torch.Tensor:
        return torch.sigmoid(self.net(images).float())


def start_mask(prob: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """The pre-segmentation as a mask in [-1, 1]: thresholded at 0.5 (ADDPM starts from the pre-segmentation
    mask), or 2p - 1 of the probability with soft=True."""
    return prob * 2 - 1 if soft else (prob > 0.5).to(prob.dtype) * 2 - 1


def forward_jump(diffusion: GaussianDiffusion, x0: torch.Tensor, pre_t: int, eps: torch.Tensor) -> torch.Tensor:
    """x_{pre_t} = sqrt(ab[pre_t-1]) x0 + sqrt(1 - ab[pre_t-1]) eps: q(x_{pre_t} | x0) at exactly level pre_t
    (DDPM eq. 4; ADDPM's non-Gaussian start built by the forward diffusion rule)."""
    t = torch.full((x0.shape[0],), pre_t - 1, device=x0.device, dtype=torch.long)
    return diffusion.q_sample(x0, t, eps)


def check_pairing(chain: SamplerSpec, num_timesteps: int, has_denoiser: bool) -> tuple[int, int]:
    """(pre_t, stop_t) of a valid ADDPM chain: a denoiser exactly when the chain stops above x_0."""
    chain.validate(num_timesteps)
    pre_t, stop_t = chain.interval(num_timesteps)
    if stop_t > 0 and not has_denoiser:
        raise ValueError(f"--stop_t {stop_t} ends the chain on a noisy mask: give --denoiser_path (a "
                         f"train_denoising_network.py checkpoint), or --stop_t 0 to run the chain down to x_0")
    if stop_t == 0 and has_denoiser:
        raise ValueError("--stop_t 0 runs the chain down to the clean mask x_0: --denoiser_path would not be used")
    return pre_t, stop_t


@torch.inference_mode()
def sample_addpm_ensemble(model, diffusion: GaussianDiffusion, images: torch.Tensor, num_ensemble: int,
                          chain: SamplerSpec, seeds: list[int], preseg, denoiser=None,
                          soft_preseg: bool = False) -> EnsembleResult:
    """ADDPM for a batch of images, `num_ensemble` members each, all members in one batch (see module doc)."""
    pre_t, stop_t = check_pairing(chain, diffusion.num_timesteps, denoiser is not None)
    b, size, n = images.shape[0], images.shape[-2:], num_ensemble
    cond = model.encode_condition(images)
    x0_pre = (start_mask(preseg(images, cond), soft_preseg) * diffusion.mask_scale).repeat_interleave(n, dim=0)
    cond = cond.repeat_interleave(n)
    noise = NoiseSource(seeds, n, images.device)
    x = forward_jump(diffusion, x0_pre, pre_t, noise((1, *size)))
    counting = CountingModel(ConditionedModel(model, diffusion, cond))
    x = SAMPLER_FNS[chain.sampler](counting, diffusion, x, chain, noise)
    if denoiser is not None:
        t = torch.full((x.shape[0],), float(stop_t - 1), device=x.device)  # level stop_t is index stop_t - 1
        prob = torch.sigmoid(denoiser(x, t, images.repeat_interleave(n, dim=0)).float())
    else:
        prob = diffusion.x0_to_probability(x)
    parts = {"preseg": preseg.nfe, "chain": counting.nfe, "denoiser": int(denoiser is not None)}
    return EnsembleResult(prob.reshape(b, n, *size), sum(parts.values()), parts)


@dataclass
class AddpmSampler:
    """ADDPM's pieces besides the diffusion model: the chain, the pre-segmenter and the denoiser."""
    chain: SamplerSpec
    preseg: HeadPreseg | NetPreseg
    denoiser: torch.nn.Module | None
    soft_preseg: bool = False
    aux: list[LoadedAux] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.chain.steps

    @property
    def label(self) -> str:
        return label_of(self.chain.sampler)

    def record(self) -> dict:
        """ADDPM's manifest columns: the chain's levels and the pre-segmentation."""
        return {"pre_t": self.chain.t_start, "stop_t": self.chain.t_end, "preseg": self.preseg.label}

    def sample(self, model, diffusion: GaussianDiffusion, images: torch.Tensor, num_ensemble: int,
               seeds: list[int]) -> EnsembleResult:
        return sample_addpm_ensemble(model, diffusion, images, num_ensemble, self.chain, seeds, self.preseg,
                                     self.denoiser, self.soft_preseg)

    def warn_if_trained_on(self, ids: list[str]) -> None:
        """Warn when an image to be sampled was in an auxiliary network's training split (a test-set leak)."""
        for aux in self.aux:
            trained = set(aux.ckpt.get("split", {}).get("train", [])) & set(ids)
            if trained:
                print(f"warning: {len(trained)} of the {len(ids)} images to sample were training images of "
                      f"{aux.ckpt['path']}; train it with --split_from <the diffusion run>", file=sys.stderr)


def label_of(chain_sampler: str) -> str:
    """The manifest label of ADDPM with that chain: addpm-<sampler>."""
    return f"{ADDPM}-{chain_sampler}"


def chain_of(label: str) -> str | None:
    """The chain sampler of an ADDPM label (addpm-ddpm -> ddpm), None for a plain sampler's label."""
    head, _, chain = label.partition("-")
    return chain if head == ADDPM and chain else None


def check_denoiser(den: LoadedAux, diffusion_cfg: DiffusionConfig, stop_t: int) -> None:
    """The denoiser must know the diffusion model's schedule and the level the chain stops at."""
    d, path = den.ckpt["config"]["denoiser"], den.ckpt["path"]
    mine = (diffusion_cfg.diffusion_steps, diffusion_cfg.noise_schedule)
    if d.get("mask_scale", 1.0) != diffusion_cfg.mask_scale:
        raise ValueError(f"--denoiser_path {path} was trained on masks scaled by {d.get('mask_scale', 1.0)} but the "
                         f"diffusion model's --mask_scale is {diffusion_cfg.mask_scale}; train the denoiser with "
                         f"--split_from <the diffusion run>")
    if (d["diffusion_steps"], d["noise_schedule"]) != mine:
        raise ValueError(f"--denoiser_path {path} was trained on the {d['diffusion_steps']}-step {d['noise_schedule']} "
                         f"schedule but the diffusion model uses the {mine[0]}-step {mine[1]} one; train the denoiser "
                         f"with --split_from <the diffusion run>")
    if d["T"] < stop_t:
        raise ValueError(f"--stop_t {stop_t} is above the denoiser's --T {d['T']} ({path}): it never saw x_{stop_t}; "
                         f"use --stop_t <= {d['T']} or train a denoiser with --T {stop_t}")


def check_size(aux: LoadedAux, image_size: int, flag: str) -> None:
    if aux.cfg.image_size != image_size:
        raise ValueError(f"{flag} {aux.ckpt['path']} works at image size {aux.cfg.image_size}, the diffusion model "
                         f"at {image_size}; train it with the same --image_size (or --split_from the diffusion run)")


def load_addpm(chain: SamplerSpec, diffusion_cfg: DiffusionConfig, image_size: int, preseg: str,
               denoiser_path: str, device: torch.device, use_ema: bool = True,
               soft_preseg: bool = False) -> AddpmSampler:
    """Load and check ADDPM's pre-segmenter (`head` or a checkpoint) and denoiser for a diffusion model."""
    if not preseg:
        raise ValueError("--sampler addpm needs a pre-segmentation: --preseg_path PATH (a train_preseg_network.py "
                         "checkpoint) or --preseg head (the diffusion model's own image-encoder head)")
    _, stop_t = check_pairing(chain, diffusion_cfg.diffusion_steps, bool(denoiser_path))
    aux: list[LoadedAux] = []
    if preseg == HEAD:
        pre = HeadPreseg()
    else:
        loaded = load_aux(preseg, PRESEG, device, use_ema, flag="--preseg_path")
        check_size(loaded, image_size, "--preseg_path")
        pre, aux = NetPreseg(loaded.net, loaded.ckpt["path"]), [loaded]
    denoiser = None
    if denoiser_path:
        den = load_aux(denoiser_path, DENOISER, device, use_ema, flag="--denoiser_path")
        check_size(den, image_size, "--denoiser_path")
        check_denoiser(den, diffusion_cfg, stop_t)
        denoiser, aux = den.net, aux + [den]
    return AddpmSampler(chain, pre, denoiser, soft_preseg, aux)
