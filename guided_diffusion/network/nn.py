"""Small network building blocks shared by the MedSegDiff-style UNet (`unet.py`)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def norm_groups(channels: int, max_groups: int = 32) -> int:
    """Largest GroupNorm group count <= max_groups dividing `channels`, keeping >= 2 channels a group where possible.

    Any positive width (16, 24, 48, 96, 128, even 17) gets a valid count, so no width is rejected for GroupNorm.
    """
    if channels < 1:
        raise ValueError(f"GroupNorm needs at least one channel, got {channels}")
    min_size = 2 if channels >= 2 else 1
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0 and channels // groups >= min_size:
            return groups
    return 1


def normalization(channels: int) -> nn.GroupNorm:
    """GroupNorm with an automatically chosen group count (see `norm_groups`)."""
    return nn.GroupNorm(norm_groups(channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so a residual branch starts as the identity (Dhariwal & Nichol 2021, App. A)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(fn: Callable[..., Tensor], *args: Tensor, enabled: bool) -> Tensor:
    """Run `fn(*args)` with gradient checkpointing when enabled and gradients are being recorded (saves memory)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of real-valued timesteps (Vaswani et al. 2017 §3.5; Ho et al. 2020 App. B).

    Accepts float t so a continuous-time solver can query the network between the integer training steps;
    the embedding is smooth in t. Returns (B, dim).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of each pixel of a (B, C, H, W) map, with a per-channel affine."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each pixel's channel vector to zero mean, unit variance, then scale and shift."""
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 convolution (no checkerboard artefacts)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block with an optional timestep embedding (Dhariwal & Nichol 2021 §3, Ho et al. 2020 App. B).

    With `use_scale_shift_norm` the embedding modulates the second norm as AdaGN(h, e) = e_s * GroupNorm(h) + e_b
    (Dhariwal & Nichol 2021 §3); otherwise it is added to the features. With `emb_channels=None` the block ignores
    time, which is how the image encoder uses it.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        emb_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm and emb_channels is not None
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers: nn.Module | None = None
        if emb_channels is not None:
            emb_out = 2 * out_channels if self.use_scale_shift_norm else out_channels
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_norm = normalization(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); emb: (B, emb_channels) or None for a time-free block."""
        if emb is None:
            return maybe_checkpoint(self._forward_plain, x, enabled=self.use_checkpoint)
        return maybe_checkpoint(self._forward_emb, x, emb, enabled=self.use_checkpoint)

    def _forward_plain(self, x: Tensor) -> Tensor:
        """Residual block without time conditioning."""
        h = self.in_layers(x)
        return self.skip(x) + self.out_layers(self.out_norm(h))

    def _forward_emb(self, x: Tensor, emb: Tensor) -> Tensor:
        """Residual block conditioned on the embedding by addition or by AdaGN scale-shift."""
        h = self.in_layers(x)
        assert self.emb_layers is not None, "this ResBlock was built without an embedding"
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, as a residual branch (Vaswani et al. 2017)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_checkpoint: bool = False):
        super().__init__()
        self.num_heads = attention_heads(channels, num_heads, num_head_channels)
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor) -> Tensor:
        """softmax(QK^T / sqrt(d)) V per head, projected and added back to x."""
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, hgt * wid))  # (B, 3C, L)
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid).transpose(-1, -2)
        q, k, v = qkv.unbind(dim=1)  # each (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, hgt * wid)
        return x + self.proj_out(out).reshape(b, c, hgt, wid)


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads for a width: `num_heads`, or channels // num_head_channels when the latter is not -1."""
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the attention width {channels}")
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise ValueError(
            f"num_head_channels={num_head_channels} must be >= 1 (or -1) and divide the attention width {channels}"
        )
    return channels // num_head_channels
