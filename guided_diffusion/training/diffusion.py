"""The diffusion model's trainer: the MedSegDiff-style UNet and its loss, on the one training core (core.py).

Loss per step: the diffusion loss of GaussianDiffusion.training_losses on x_t = q_sample(2 m - 1, t, eps) (eps
MSE, plus the VLB term with learned sigma), and --cal_weight times the calibration head's Dice + BCE against
the mask (MedSegDiff's one-pass pre-segmentation from the image encoder).
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from guided_diffusion.checkpoint import check_flags
from guided_diffusion.config import (DataConfig, DiffusionConfig, ModelConfig, TrainConfig, create_gaussian_diffusion,
                                     create_model)
from guided_diffusion.diffusion.gaussian_diffusion import dice_bce_loss
from guided_diffusion.distributed import DistInfo
from guided_diffusion.training.core import Trainer, find_resume


class DiffusionTrainer(Trainer):
    """Trains the conditional diffusion segmenter (scripts/segmentation_train.py)."""

    kind = "diffusion"
    loss_terms = ("loss", "mse", "vb", "cal")

    def __init__(self, model_cfg: ModelConfig, diff_cfg: DiffusionConfig, data_cfg: DataConfig,
                 train_cfg: TrainConfig, dist_info: DistInfo):
        self.mc, self.dc = model_cfg, diff_cfg
        self.image_size = model_cfg.image_size
        train_cfg.validate()
        resume = find_resume(train_cfg, self.kind, dist_info)
        if resume is not None:  # a flag that contradicts the run being resumed is an error, never a silent mismatch
            saved = resume["config"]
            check_flags({**asdict(model_cfg), **asdict(diff_cfg)}, {**saved["model"], **saved["diffusion"]},
                        f"the checkpoint {resume['path']}", hint="use the same value or another --out_dir")
        self.diffusion = create_gaussian_diffusion(diff_cfg)
        super().__init__(data_cfg, train_cfg, dist_info, resume)

    def build_network(self) -> torch.nn.Module:
        return create_model(self.mc, self.dc)

    def network_config(self) -> dict:
        return {"model": asdict(self.mc), "diffusion": asdict(self.dc)}

    def compute_loss(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x_start = mask * 2 - 1
        t, noise = self.noise_and_t(mask.shape[0], tuple(mask.shape[1:]), self.diffusion.num_timesteps)
        x_t = self.layout(self.diffusion.q_sample(x_start, t, noise))
        with self.autocast():
            out, calib = self.wrapped(x_t, self.diffusion.scale_timesteps(t), image=image, return_calib=True)
        losses = self.diffusion.training_losses(out.float(), x_start, x_t, t, noise)
        cal = dice_bce_loss(calib.float(), mask).mean()
        loss = losses["loss"].mean() + self.tc.cal_weight * cal
        terms = {"mse": losses["mse"].mean(), "cal": cal}
        if "vb" in losses:
            terms["vb"] = losses["vb"].mean()
        return loss, terms
