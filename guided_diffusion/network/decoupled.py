"""--network decoupled: a time-free image UNet run once per image and a light, time-conditioned mask head run at
every diffusion step.

Ji et al. 2023, "DDP: Diffusion Model for Dense Visual Prediction" (ICCV; arXiv:2303.17559), §3.1: the image
encoder sees neither t nor the noisy map, so it runs once; only a light decoder on [noisy map, image features] is
iterated. Here the image UNet is the plain-UNet baseline's backbone (aux_nets.AuxUNet) and its output convolution is
the calibration head (MedSegDiff's one-pass pre-segmentation, trained with Dice + BCE). The mask head sees x_t, the
self-conditioning input, the calibration logit and the backbone's last feature map, and refines that logit: with a
bounded x0 prediction (--x0_tanh True) its output is added to half the calibration logit,

    x0 = b tanh(calib / 2 + head),   foreground probability sigmoid(calib + 2 head),

so a new head (zero-initialised output) returns the calibration head's mask, and the chain corrects it (a diffusion
refiner of a one-pass mask, as in SegRefiner, Wang et al. 2023, arXiv:2310.16181). Other targets (eps, v, an
unbounded x0) take the head's output as the prediction itself.

Cost: a training step is one backbone pass and one head pass with gradients, plus one head pass without them on
self-conditioned (and recycled) steps, which reuse the step's image encoding; a K-step chain is one backbone pass
and K head passes. With --head_stride s the head runs at 1/s of the mask's resolution: its mask-sized inputs enter
pixel-unshuffled (each s x s block of pixels as s^2 channels, so nothing is lost), the backbone's feature map
average-pooled, and its output is pixel-shuffled back to one correction per full-size pixel (the sub-pixel layout
of Shi et al. 2016, arXiv:1609.05158); the calibration logit it corrects stays at full resolution. At 64 px on
one CPU thread the full-resolution head costs the backbone about a quarter of the plain UNet's steps in the same
minutes, s = 4 about 6% (README, Quality).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guided_diffusion.network.aux_nets import AuxNetConfig, AuxUNet
from guided_diffusion.network.nn import ResBlock, normalization, timestep_embedding, zero_module
from guided_diffusion.network.unet import Condition, default_channel_mult, self_condition_input

__all__ = ["DecoupledUNet"]


class DecoupledUNet(nn.Module):
    """Conditional denoiser with the image path computed once (`encode_condition`) and a light per-step head.

    The same call interface as MedSegDiffUNet: forward(x_t, timesteps, image= or cond=, return_calib=,
    self_cond=); `Condition.features` holds the backbone's last feature map (average-pooled to the head's
    resolution when --head_stride > 1), `calib_logits` its one-pass logits at full resolution.
    """

    def __init__(self, *, image_size: int, model_channels: int, num_res_blocks: int = 1,
                 channel_mult: tuple[int, ...] | None = None, dropout: float = 0.0, learn_sigma: bool = False,
                 image_channels: int = 3, mask_channels: int = 1, self_condition: bool = False,
                 x0_tanh_scale: float | None = None, head_blocks: int = 2,
                 head_channels: int = 0, head_stride: int = 1) -> None:
        super().__init__()
        mult = tuple(channel_mult or default_channel_mult(image_size))
        if head_blocks < 1 or head_channels < 0:
            raise ValueError(f"head_blocks must be >= 1 and head_channels >= 0, got {head_blocks}, {head_channels}")
        if head_stride < 1 or image_size % head_stride:
            raise ValueError(f"--head_stride must be >= 1 and divide --image_size {image_size}, got {head_stride}")
        cfg = AuxNetConfig(image_size=image_size, num_channels=model_channels, num_res_blocks=num_res_blocks,
                           channel_mult=",".join(str(m) for m in mult), dropout=dropout)
        self.image_size, self.image_channels, self.mask_channels = image_size, image_channels, mask_channels
        self.model_channels, self.head_stride = model_channels, head_stride
        self.self_condition, self.learn_sigma, self.x0_tanh_scale = self_condition, learn_sigma, x0_tanh_scale
        self.out_channels = mask_channels * (2 if learn_sigma else 1)
        self.backbone = AuxUNet(cfg, image_channels, image_channels, timed=False, out_channels=mask_channels)
        features, emb = model_channels * mult[0], 4 * model_channels
        width = head_channels or features
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        masks = mask_channels * (3 if self_condition else 2)  # x_t [, x0 estimate], calib
        self.head_in = nn.Conv2d(masks * head_stride ** 2 + features, width, 3, padding=1)
        self.head = nn.ModuleList([ResBlock(width, width, emb, dropout) for _ in range(head_blocks)])
        self.head_out = nn.Sequential(normalization(width), nn.SiLU(),
                                      zero_module(nn.Conv2d(width, self.out_channels * head_stride ** 2, 3, padding=1)))

    def encode_condition(self, image: Tensor) -> Condition:
        """Image (B, C, H, W) in [0, 1] -> the backbone's last feature map and calibration logits (once per image)."""
        if image.ndim != 4 or image.shape[1] != self.image_channels:
            raise ValueError(f"image must be (B, {self.image_channels}, H, W) in [0, 1], got {tuple(image.shape)}")
        s = self.head_stride
        if image.shape[-1] % s or image.shape[-2] % s:
            raise ValueError(f"image {tuple(image.shape)} must be divisible by the head's stride {s} (--head_stride)")
        weight = self.backbone.conv_in.weight
        features = self.backbone.features((image.to(weight.dtype) - 0.5) / 0.5, None)
        # the head's copy of the features is pooled to its resolution here, once per image, not at every step
        return Condition([F.avg_pool2d(features, s) if s > 1 else features], self.backbone.out(features))

    def forward(self, x: Tensor, timesteps: Tensor, image: Tensor | None = None, cond: Condition | None = None,
                y: Tensor | None = None, return_calib: bool = False, self_cond=None):
        """The diffusion target (and the variance value when learn_sigma) for x_t; see MedSegDiffUNet.forward."""
        if (image is None) == (cond is None):
            raise ValueError("pass exactly one of image= or cond=")
        if y is not None:
            raise ValueError("y was given but the model has no class conditioning")
        if x.ndim != 4 or x.shape[1] != self.mask_channels:
            raise ValueError(f"x must be (B, {self.mask_channels}, H, W), got {tuple(x.shape)}")
        cond = self.encode_condition(image) if cond is None else cond
        if cond.batch_size != x.shape[0] or cond.calib_logits.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"condition {tuple(cond.calib_logits.shape)} does not match x {tuple(x.shape)} "
                             f"(use Condition.repeat_interleave for ensembles)")
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.head_in.weight.dtype))
        calib, features = cond.calib_logits, cond.features[0]
        fed = self_condition_input(x, self.self_condition, self_cond)
        dtype, s = self.head_in.weight.dtype, self.head_stride
        masks = torch.cat([p.to(dtype) for p in [x] + ([fed] if fed is not None else []) + [calib]], dim=1)
        if s > 1:  # (the features came pooled from encode_condition)
            masks = F.pixel_unshuffle(masks, s)
        h = self.head_in(torch.cat([masks, features.to(dtype)], dim=1))
        for block in self.head:
            h = block(h, emb)
        out = self.head_out(h)
        if s > 1:
            out = F.pixel_shuffle(out, s)
        if self.x0_tanh_scale is not None:
            c = self.mask_channels
            x0 = self.x0_tanh_scale * torch.tanh(calib.to(out.dtype) / 2 + out[:, :c])
            out = torch.cat([x0, out[:, c:]], dim=1)
        return (out, calib) if return_calib else out
