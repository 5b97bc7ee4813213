"""ADDPM's two auxiliary networks: the pre-segmentation network and the one-step denoising network.

Guo, Xiang, Yang, Ye, Yu, Ma, "Accelerating denoising diffusion probabilistic model via truncated inverse
processes for medical image segmentation" (ADDPM): a separate segmentation network gives the pre-segmentation
the truncated reverse process starts from, and a separate denoising network turns the nearly clean mask
x_{stop_t} into the final mask in one step.

Both are one small UNet (`AuxUNet`) built from the diffusion UNet's blocks (`nn.py`):
  * `preseg`:   image -> mask logits.
  * `denoiser`: (x_t, image, t) -> clean-mask logits. Unlike the seed's denoiser, which sees only x_t at one
    fixed t, ours also sees the image and a timestep embedding and is trained on every level t <= T, so the
    reverse chain may stop at any --stop_t <= T.
Their checkpoints are ours (checkpoint.py) with a "kind" key, so one kind is never loaded as another.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.network.nn import Downsample, ResBlock, Upsample, normalization, timestep_embedding
from guided_diffusion.config import from_dict, parse_int_list

PRESEG, DENOISER = "preseg", "denoiser"
KINDS = (PRESEG, DENOISER)


@dataclass
class AuxNetConfig:
    """The small UNet of an auxiliary network (flags of train_preseg_network.py / train_denoising_network.py)."""
    image_size: int = field(default=256, metadata={"help": "side of the square images and masks (must equal the "
                                                           "diffusion model's)"})
    num_channels: int = field(default=32, metadata={"help": "base width of the UNet"})
    num_res_blocks: int = field(default=1, metadata={"help": "residual blocks per resolution level"})
    channel_mult: str = field(default="", metadata={"help": "comma-separated width multipliers per level; "
                                                            "empty: by image size, as the diffusion UNet"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the residual blocks"})


class AuxUNet(nn.Module):
    """A small UNet to one logit channel; with `time_dim` the blocks also see a timestep embedding.

    Encoder level k: num_res_blocks ResBlocks at width num_channels * mult[k], then a stride-2 conv; decoder
    level k: one ResBlock on [upsampled h, level-k skip], then 2x upsampling. Input images in [0, 1] are mapped
    to [-1, 1], the range of the masks.
    """

    def __init__(self, cfg: AuxNetConfig, in_channels: int, image_channels: int = 3, timed: bool = False,
                 out_channels: int = 1):
        super().__init__()
        from guided_diffusion.network.unet import default_channel_mult

        mult = parse_int_list(cfg.channel_mult, "--channel_mult") or default_channel_mult(cfg.image_size)
        if cfg.num_channels < 1 or cfg.num_res_blocks < 1:
            raise ValueError("--num_channels and --num_res_blocks must be >= 1")
        self.size_multiple = 2 ** (len(mult) - 1)
        if cfg.image_size % self.size_multiple:
            raise ValueError(f"--image_size {cfg.image_size} must be divisible by {self.size_multiple} "
                             f"(2**(levels-1) for channel_mult {mult})")
        self.image_channels, self.image_size, self.width = image_channels, cfg.image_size, cfg.num_channels
        widths = [cfg.num_channels * m for m in mult]
        emb = 4 * cfg.num_channels if timed else None
        self.time_embed = nn.Sequential(nn.Linear(cfg.num_channels, emb), nn.SiLU(), nn.Linear(emb, emb)) \
            if timed else None

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb, cfg.dropout)

        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.enc, self.downs, ch = nn.ModuleList(), nn.ModuleList(), widths[0]
        for k, w in enumerate(widths):
            self.enc.append(nn.ModuleList([res(ch if i == 0 else w, w) for i in range(cfg.num_res_blocks)]))
            ch = w
            if k < len(widths) - 1:
                self.downs.append(Downsample(w))
        self.middle = res(ch, ch)
        self.dec, self.ups = nn.ModuleList(), nn.ModuleList()
        for k in reversed(range(len(widths))):
            self.dec.append(res(ch + widths[k], widths[k]))
            ch = widths[k]
            if k > 0:
                self.ups.append(Upsample(ch))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def _embed(self, t: Tensor | None, batch: int) -> Tensor | None:
        """Timestep embedding (Ho et al. 2020 App. B) of the diffusion index t, or None for a time-free net."""
        if self.time_embed is None:
            return None
        if t is None:
            raise ValueError("the denoising network needs the timestep t")
        t = torch.as_tensor(t, device=self.conv_in.weight.device).float()
        if t.ndim == 0:
            t = t.expand(batch)
        return self.time_embed(timestep_embedding(t, self.width).to(self.conv_in.weight.dtype))

    def _unet(self, h: Tensor, emb: Tensor | None) -> Tensor:
        """The UNet body on the stacked inputs: logits (B, out_channels, H, W)."""
        return self.out(self.features(h, emb))

    def features(self, h: Tensor, emb: Tensor | None) -> Tensor:
        """The last decoder level's feature map (B, num_channels * mult[0], H, W), before the output head."""
        if h.shape[-1] % self.size_multiple or h.shape[-2] % self.size_multiple:
            raise ValueError(f"input size {tuple(h.shape[-2:])} must be divisible by {self.size_multiple}")
        h = self.conv_in(h.to(self.conv_in.weight.dtype))
        skips = []
        for k, blocks in enumerate(self.enc):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if k < len(self.downs):
                h = self.downs[k](h)
        h = self.middle(h, emb)
        for k, block in enumerate(self.dec):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if k < len(self.ups):
                h = self.ups[k](h)
        return h


class PresegNet(AuxUNet):
    """Pre-segmentation network: image (B, 3, H, W) in [0, 1] -> mask logits (B, 1, H, W)."""

    def __init__(self, cfg: AuxNetConfig, image_channels: int = 3):
        super().__init__(cfg, image_channels, image_channels, timed=False)

    def forward(self, image: Tensor) -> Tensor:
        return self._unet(image * 2 - 1, None)


class DenoiserNet(AuxUNet):
    """One-step denoiser: noisy mask x_t (B, 1, H, W), image in [0, 1] and the diffusion index t (B,) ->
    clean-mask logits. t is the 0-based index of the diffusion code (index i is DDPM's x_{i+1})."""

    def __init__(self, cfg: AuxNetConfig, image_channels: int = 3):
        super().__init__(cfg, 1 + image_channels, image_channels, timed=True)

    def forward(self, x_t: Tensor, t: Tensor, image: Tensor) -> Tensor:
        return self._unet(torch.cat([x_t.to(image.dtype), image * 2 - 1], dim=1), self._embed(t, x_t.shape[0]))


def build_network(kind: str, cfg: AuxNetConfig) -> AuxUNet:
    """The one factory of the auxiliary networks."""
    if kind not in KINDS:
        raise ValueError(f"unknown auxiliary network kind {kind!r}; choose {' or '.join(KINDS)}")
    return PresegNet(cfg) if kind == PRESEG else DenoiserNet(cfg)


@dataclass
class LoadedAux:
    """An auxiliary network ready to run, with the checkpoint it came from."""
    net: AuxUNet
    cfg: AuxNetConfig
    ckpt: dict


def load_aux(path: str | Path, kind: str, device: torch.device, use_ema: bool = True,
             flag: str = "--model_path") -> LoadedAux:
    """Build the network from its checkpoint's config and load its (EMA) weights, in eval mode."""
    return aux_from_checkpoint(load_checkpoint(path, flag, kind=kind), device, use_ema)


def aux_from_checkpoint(ckpt: dict, device: torch.device, use_ema: bool = True) -> LoadedAux:
    """The auxiliary network of a loaded checkpoint of kind preseg or denoiser, in eval mode."""
    cfg = from_dict(AuxNetConfig, ckpt["config"]["net"])
    net = build_network(ckpt["kind"], cfg)
    net.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    return LoadedAux(net.to(device).eval(), cfg, ckpt)
