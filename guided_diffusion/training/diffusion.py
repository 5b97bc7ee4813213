"""The diffusion model's trainer: the MedSegDiff-style UNet and its loss, on the one training core (core.py).

Loss per step, on x_t = q_sample(x_0, t, eps) with x_0 = b (2 m - 1) (b = --mask_scale):
  --mse_weight        the MSE of the prediction target, eps, x0 or v (GaussianDiffusion.training_losses), plus the
                      VLB term with learned sigma;
  --mask_loss_weight  Dice + BCE of the x_0 estimate read as a foreground probability (Pix2Seq-D trains its x_0 with
                      a cross-entropy; a mask loss on the mask the sampler returns);
  --cal_weight        the calibration head's Dice + BCE (MedSegDiff's one-pass pre-segmentation from the image
                      encoder).
Options of the input x_t and of t:
  self-conditioning   (--self_condition True; Chen, Zhang, Hinton 2022, "Analog Bits", §3): on a seeded fraction
                      --self_condition_rate of the steps a first pass without gradients estimates x_0, which the
                      trained pass sees as its extra input (zeros on the other steps, as at a chain's first step);
                      both passes (and recycling's) reuse the step's one encoding of the image;
  recycling           (--recycle True; Fu et al. 2023, arXiv:2308.16355, "max" variant): a first pass without
                      gradients predicts x_0 from pure noise x_T, and x_t is drawn from that estimate instead of the
                      ground truth, as at sampling time; the targets stay the ground truth's;
  --t_power p         timesteps floor(T u^(1/p)): p > 1 trains the noisy levels more (GenMask's weighting toward
                      the levels where a binary mask is hidden).
Cost and coupling:
  --diffusion_batch k the diffusion losses (the denoiser's passes) on the first k images of each batch, the
                      calibration loss on all: with --network decoupled a step costs one backbone pass on the batch
                      and head passes on k images;
  --detach_condition  the denoiser's losses stop at the image encoding, so only the calibration loss trains the
                      encoder (--network decoupled: the backbone trains as the plain UNet, except that the
                      --grad_clip norm still includes the head's gradients).
  --calib_noise A     (--network decoupled) the mask head sees its calibration logit plus A u z, z a smooth unit
                      Gaussian field (white noise averaged over an 8 x 8 grid of cells, rescaled to unit variance
                      and bilinearly upsampled) and u uniform in [0, 1) per image: on training images the backbone's
                      one-pass mask is close to perfect, so without errors to correct the head learns to keep it;
                      the perturbed logit gives it blobs and boundary errors to undo, as a refiner's coarse masks
                      (SegRefiner, Wang et al. 2023). The calibration loss stays on the logit itself. Measured
                      (README, Quality): the head still returns the one-pass mask on test images, and the backbone
                      loses Dice, so the preset does not use it.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F

from guided_diffusion.checkpoint import check_flags
from guided_diffusion.config import (DataConfig, DiffusionConfig, ModelConfig, TrainConfig, check_attention_resolutions,
                                     create_gaussian_diffusion, create_model, unused_model_flags, validate)
from guided_diffusion.data import volumes
from guided_diffusion.diffusion.gaussian_diffusion import dice_bce_loss
from guided_diffusion.distributed import DistInfo
from guided_diffusion.training.core import Trainer, find_resume


class DiffusionTrainer(Trainer):
    """Trains the conditional diffusion segmenter (scripts/segmentation_train.py)."""

    kind = "diffusion"
    loss_terms = ("loss", "mse", "vb", "cal", "mask")

    def __init__(self, model_cfg: ModelConfig, diff_cfg: DiffusionConfig, data_cfg: DataConfig,
                 train_cfg: TrainConfig, dist_info: DistInfo):
        self.mc, self.dc = model_cfg, diff_cfg
        self.image_size = model_cfg.image_size
        train_cfg.validate()
        volumes.configure(model_cfg, data_cfg)  # --image_channels (and for volumes --modalities) from the data
        validate(model_cfg, diff_cfg)
        check_attention_resolutions(model_cfg)
        if train_cfg.calib_noise and model_cfg.network != "decoupled":
            raise ValueError(f"--calib_noise perturbs the logit the decoupled network's mask head refines; "
                             f"--network {model_cfg.network} has no such input (give --calib_noise 0)")
        if train_cfg.detach_condition and model_cfg.network == "unet":
            raise ValueError("--detach_condition True needs an image encoder trained by the calibration loss "
                             "(--network decoupled or medsegdiff); --network unet has none")
        unused = unused_model_flags(model_cfg, train_cfg.preset)
        if unused and dist_info.is_main:
            print(f"note: --network {model_cfg.network} does not use {', '.join(unused)}", flush=True)
        resume = find_resume(train_cfg, self.kind, dist_info)
        if resume is not None:  # a flag that contradicts the run being resumed is an error, never a silent mismatch
            saved = resume["config"]
            check_flags({**asdict(model_cfg), **asdict(diff_cfg)}, {**saved["model"], **saved["diffusion"]},
                        f"the checkpoint {resume['path']}", hint="use the same value or another --out_dir")
        self.diffusion = create_gaussian_diffusion(diff_cfg)
        self._encode = None
        super().__init__(data_cfg, train_cfg, dist_info, resume)

    def build_network(self) -> torch.nn.Module:
        return create_model(self.mc, self.dc)

    def encode(self, image: torch.Tensor):
        """The network's image encoding (its Condition), with gradients; compiled with --compile. It runs outside
        the DDP wrapper, whose gradient hooks sit on the parameters, so the encoder's gradients are still reduced."""
        if self._encode is None:
            self._encode = torch.compile(self.model.encode_condition) if self.tc.compile else \
                self.model.encode_condition
        return self._encode(image)

    def network_config(self) -> dict:
        return {"model": asdict(self.mc), "diffusion": asdict(self.dc)}

    @torch.no_grad()
    def first_pass(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The x_0 estimate of a pass without gradients (and with no self-conditioning input), clipped to [-b, b],
        on the step's image encoding `cond`."""
        d = self.diffusion
        fed = torch.zeros_like(x_t) if self.dc.self_condition else None
        with self.autocast():
            out = self.wrapped(x_t, d.scale_timesteps(t), cond=cond, self_cond=fed)
        return d.clip_x0(self.x0_estimate(out, x_t, t)).to(x_t.dtype)

    def x0_estimate(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = self.diffusion
        return d.x0_and_eps(d.split_output(out.float(), x_t)[0], x_t.float(), t)[0]

    def calib_perturbation(self, calib: torch.Tensor) -> torch.Tensor:
        """--calib_noise's field A u z for this step's (B, 1, H, W) calibration logits (seeded: exact resume)."""
        h, w = calib.shape[-2:]  # u: a uniform draw over 2^20 levels of the step's stream 3, white: its noise
        u, white = self.noise_and_t(calib.shape[0], (1, h, w), 1 << 20, stream=3)
        cells = (min(8, h), min(8, w))
        z = F.adaptive_avg_pool2d(white, cells) * math.sqrt(h * w / (cells[0] * cells[1]))
        z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)
        return (self.tc.calib_noise * u.to(z.dtype) / (1 << 20)).view(-1, 1, 1, 1) * z.to(calib.dtype)

    def compute_loss(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d, tc = self.diffusion, self.tc
        x_start = d.mask_to_x0(mask)
        t, noise = self.noise_and_t(mask.shape[0], tuple(mask.shape[1:]), d.num_timesteps, t_power=tc.t_power)
        with self.autocast():  # the image encoding, once a step: every pass below reuses it
            cond = self.encode(image)
        calib = cond.calib_logits
        k = tc.diffusion_batch or mask.shape[0]  # the diffusion losses on the first k images, the calibration's on all
        cond, x_start, t, noise, target = cond.first(k), x_start[:k], t[:k], noise[:k], mask[:k]
        if tc.detach_condition:  # the denoiser's losses stop at the encoding; the calibration loss trains it
            cond = cond.detach()
        if tc.calib_noise:
            cond = cond._replace(calib_logits=cond.calib_logits + self.calib_perturbation(cond.calib_logits))
        source = x_start
        if tc.recycle:  # x_t drawn from the model's own estimate from pure noise, as at sampling time
            t_max, noise_max = self.noise_and_t(mask.shape[0], tuple(mask.shape[1:]), d.num_timesteps, stream=1)
            t_max, noise_max = torch.full_like(t_max[:k], d.num_timesteps - 1), noise_max[:k]
            source = self.first_pass(self.layout(d.q_sample(x_start, t_max, noise_max)), t_max, cond)
        x_t = self.layout(d.q_sample(source, t, noise))
        eps = noise
        if tc.recycle:  # the eps that takes the ground truth to this x_t: the targets stay the ground truth's
            a, s = (v.to(x_t.dtype) for v in d.alpha_sigma(t, x_t.ndim))
            eps = (x_t - a * x_start) / s
        fed = None
        if self.dc.self_condition and self.coin(tc.self_condition_rate, stream=1):
            fed = self.first_pass(x_t, t, cond) / d.mask_scale
        with self.autocast():
            out = self.wrapped(x_t, d.scale_timesteps(t), cond=cond, self_cond=fed)
        losses = d.training_losses(out.float(), x_start, x_t, t, eps)
        loss = tc.mse_weight * losses["loss"].mean()
        terms = {"mse": losses["mse"].mean()}
        if calib is not None:  # --network unet has no calibration head
            terms["cal"] = dice_bce_loss(calib.float(), mask).mean()
            loss = loss + tc.cal_weight * terms["cal"]
        if "vb" in losses:
            terms["vb"] = losses["vb"].mean()
        if tc.mask_loss_weight:
            x0 = self.x0_estimate(out, x_t, t)
            terms["mask"] = dice_bce_loss(torch.logit(d.x0_to_probability(x0), eps=1e-4), target).mean()
            loss = loss + tc.mask_loss_weight * terms["mask"]
        return loss, terms
