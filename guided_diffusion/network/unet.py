"""MedSegDiff-style conditional UNet: denoises a segmentation mask x_t at timestep t while looking at the image.

Wu et al. 2022, "MedSegDiff" (arXiv:2211.00611): the noisy-mask encoder E^x and an image encoder E^I are fused
at every encoder level, eps_theta(x_t, I, t) = D((E^I + E^x_t, t), t) (§2.1, Eq. 3), through
  * dynamic conditional encoding (§2.2, Eq. 4): m_x + (LN(m_I) * LN(m_x)) * m_I, an attention-like gate, and
  * the FF-Parser (§2.3, Eqs. 5-7): m_x -> F^-1[A * F[m_x]] with a learnable frequency map A, applied to the mask
    features before fusion to temper their high-frequency noise.
The mask path is the guided-diffusion UNet (Dhariwal & Nichol 2021 §3): residual blocks with a timestep
embedding (optionally AdaGN scale-shift), self-attention at chosen resolutions, skip connections.

Speed: the image encoder sees neither t nor x_t, so `encode_condition` runs once per image and its `Condition`
is reused at every sampling step and, via `Condition.repeat_interleave`, by every ensemble member.
It is lighter than the mask path (half the width, one residual block per level) and also carries MedSegDiff's
calibration head, a one-pass pre-segmentation trained with Dice+BCE by the training loop.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guided_diffusion.network.nn import (AttentionBlock, Downsample, LayerNorm2d, ResBlock, Upsample,
                                         attention_heads, normalization, timestep_embedding, zero_module)

__all__ = [
    "Condition",
    "FFParser",
    "DynamicConditionalFusion",
    "ConditionEncoder",
    "MedSegDiffUNet",
    "default_channel_mult",
    "parse_attention_resolutions",
]


def default_channel_mult(image_size: int) -> tuple[int, ...]:
    """Per-level width multipliers chosen by image size; each choice bottoms out at 8x8 for its nominal size.

    >= 256: (1,1,2,2,4,4); >= 128: (1,1,2,3,4); >= 64: (1,2,3,4); >= 32: (1,2,2); smaller: (1,2)
    (the first two follow guided-diffusion's 256/128 settings). The image size must still be divisible by
    2**(len(mult)-1); `MedSegDiffUNet` checks that.
    """
    if image_size >= 256:
        return (1, 1, 2, 2, 4, 4)
    if image_size >= 128:
        return (1, 1, 2, 3, 4)
    if image_size >= 64:
        return (1, 2, 3, 4)
    if image_size >= 32:
        return (1, 2, 2)
    return (1, 2)


def parse_attention_resolutions(spec: str | Iterable[int], image_size: int) -> tuple[int, ...]:
    """Turn "16,8" (feature-map sizes in pixels, guided-diffusion convention) into downsample factors image_size//res.

    Lenient: sizes that cannot occur (not image_size / 2**k) are ignored, so one flag value serves several image
    sizes; an empty spec means no attention outside the middle block. Malformed entries raise ValueError.
    """
    if isinstance(spec, str):
        tokens = [tok.strip() for tok in spec.replace(";", ",").split(",") if tok.strip()]
        try:
            resolutions = [int(tok) for tok in tokens]
        except ValueError:
            raise ValueError(f"attention_resolutions must be comma-separated integers, got {spec!r}") from None
    else:
        resolutions = [int(r) for r in spec]
    factors = set()
    for res in resolutions:
        if res < 1:
            raise ValueError(f"attention resolutions must be positive, got {res} in {spec!r}")
        if image_size % res == 0:
            ds = image_size // res
            if ds & (ds - 1) == 0:  # a power of two: a UNet level can have this resolution
                factors.add(ds)
    return tuple(sorted(factors))


class Condition(NamedTuple):
    """Image-encoder output, independent of t and x_t: cache it per image and reuse it at every sampling step."""

    features: list[Tensor]  # one (B, C_k, H/2^k, W/2^k) map per UNet level, already at the mask path's width
    calib_logits: Tensor | None  # (B, 1, H, W) one-pass pre-segmentation logits (MedSegDiff's calibration output)
    image: Tensor | None = None  # the image in [-1, 1], kept for a model that also concatenates it to x_t

    @property
    def batch_size(self) -> int:
        """Number of images the condition was computed for."""
        return next(t for t in (self.calib_logits, self.image) if t is not None).shape[0]

    def _map(self, fn) -> Condition:
        return Condition([fn(f) for f in self.features], *(None if t is None else fn(t)
                                                           for t in (self.calib_logits, self.image)))

    def repeat_interleave(self, n: int) -> Condition:
        """Repeat every image n times along the batch (img0 x n, img1 x n, ...) for n ensemble members per image."""
        if n < 1:
            raise ValueError(f"repeat count must be >= 1, got {n}")
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def first(self, n: int) -> Condition:
        """The condition of the first n images of the batch."""
        return self._map(lambda t: t[:n])

    def detach(self) -> Condition:
        """The same tensors, cut from the autograd graph."""
        return self._map(Tensor.detach)

    def to(self, *args, **kwargs) -> Condition:
        """Move/cast every tensor like Tensor.to."""
        return self._map(lambda t: t.to(*args, **kwargs))


class FFParser(nn.Module):
    """Learnable Fourier-space filter m -> F^-1[A * F[m]] (MedSegDiff §2.3, Eqs. 5-7).

    A is a complex map per channel over the rfft2 half-spectrum of the level's feature size, stored as a real
    (C, H, W//2+1, 2) parameter (real, imaginary) initialised to 1+0i, so the parser starts as the identity.
    For another feature size A is resized bilinearly in the centred (fftshifted) layout, so DC maps to DC; the
    exact behaviour is for the constructed size. The FFT runs in float32 (half-precision FFTs are restricted).
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        weight = torch.zeros(channels, height, width // 2 + 1, 2)
        weight[..., 0] = 1.0
        self.weight = nn.Parameter(weight)

    def complex_weight(self, height: int, width_half: int) -> Tensor:
        """A as a complex (C, height, width_half) tensor, resized when the feature map differs from the stored size."""
        w = self.weight.float()
        if w.shape[1:3] != (height, width_half):
            w = torch.fft.fftshift(w.permute(3, 0, 1, 2), dim=-2)  # (2, C, H, Wh), zero frequency centred
            w = F.interpolate(w, size=(height, width_half), mode="bilinear", align_corners=True)
            w = torch.fft.ifftshift(w, dim=-2).permute(1, 2, 3, 0)
        return torch.view_as_complex(w.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W), filtered in frequency space."""
        spec = torch.fft.rfft2(x.float(), norm="ortho")
        spec = spec * self.complex_weight(spec.shape[-2], spec.shape[-1])
        return torch.fft.irfft2(spec, s=x.shape[-2:], norm="ortho").to(x.dtype)


class DynamicConditionalFusion(nn.Module):
    """Dynamic conditional encoding (MedSegDiff §2.2, Eq. 4): m_x + (LN(m_I) * LN(m_x)) * m_I.

    The element-wise product of the layer-normalised mask and image features is an attention-like affinity
    (a query-key product without the sum), used as a per-pixel, per-channel gate on the image features (the
    values), so the condition injected into the mask stream adapts to the current noisy estimate.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm_mask = LayerNorm2d(channels)
        self.norm_image = LayerNorm2d(channels)

    def forward(self, mask_feat: Tensor, image_feat: Tensor) -> Tensor:
        """Fuse image features (B, C, H, W) into mask features of the same shape."""
        gate = self.norm_mask(mask_feat) * self.norm_image(image_feat)
        return mask_feat + gate * image_feat


class ConditionEncoder(nn.Module):
    """Image encoder E^I: one feature map per UNet level plus the calibration head's logits; no t, no x_t.

    Level k: (stride-2 conv if k > 0) -> time-free ResBlock -> 1x1 projection to the mask path's width at that
    level. Calibration head: every level projected to a few channels, upsampled to full size, summed,
    then norm -> SiLU -> 3x3 conv to one logit channel.
    """

    def __init__(
        self,
        image_channels: int,
        level_channels: list[int],
        width_ratio: float = 0.5,
        calib_channels: int = 8,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        widths = [max(8, math.ceil(c * width_ratio)) for c in level_channels]
        self.stem = nn.Conv2d(image_channels, widths[0], 3, padding=1)
        self.downs = nn.ModuleList(
            [nn.Identity()]
            + [nn.Conv2d(widths[k - 1], widths[k], 3, stride=2, padding=1) for k in range(1, len(widths))]
        )
        self.blocks = nn.ModuleList(
            [ResBlock(w, dropout=dropout, use_checkpoint=use_checkpoint) for w in widths]
        )
        self.to_features = nn.ModuleList([nn.Conv2d(w, c, 1) for w, c in zip(widths, level_channels)])
        self.to_calib = nn.ModuleList([nn.Conv2d(w, calib_channels, 1) for w in widths])
        self.calib_out = nn.Sequential(
            normalization(calib_channels), nn.SiLU(), nn.Conv2d(calib_channels, 1, 3, padding=1)
        )

    def forward(self, image: Tensor) -> Condition:
        """Image normalised to [-1, 1], (B, C_img, H, W) -> Condition."""
        h = self.stem(image)
        size = image.shape[-2:]
        features: list[Tensor] = []
        calib = None
        for down, block, to_feat, to_cal in zip(self.downs, self.blocks, self.to_features, self.to_calib):
            h = block(down(h))
            features.append(to_feat(h))
            c = to_cal(h)
            if c.shape[-2:] != size:
                c = F.interpolate(c, size=size, mode="bilinear", align_corners=False)
            calib = c if calib is None else calib + c
        return Condition(features, self.calib_out(calib))


class _EncoderBlock(nn.Module):
    """One mask-path encoder step: ResBlock, then self-attention when the level asks for it."""

    def __init__(self, res: ResBlock, attn: nn.Module) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        return self.attn(self.res(h, emb))


class _DecoderBlock(nn.Module):
    """One mask-path decoder step: ResBlock on [h, skip], optional self-attention, optional 2x upsampling."""

    def __init__(self, res: ResBlock, attn: nn.Module, up: nn.Module) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.up = up

    def forward(self, h: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
        """Concatenate the skip on channels, then ResBlock -> attention -> upsample."""
        return self.up(self.attn(self.res(torch.cat([h, skip], dim=1), emb)))


class MedSegDiffUNet(nn.Module):
    """Conditional denoiser eps_theta(x_t, I, t) for segmentation masks (MedSegDiff, Wu et al. 2022).

    Inputs: x (B, mask_channels, H, W) noisy mask; timesteps (B,) real-valued on [0, N-1]; image (B, C, H, W)
    in [0, 1] (normalised inside) or a cached `Condition`. Output: (B, out_channels, H, W) with out_channels =
    2 * mask_channels when learn_sigma (eps and the variance interpolation v of Nichol & Dhariwal 2021, Eq. 15),
    else mask_channels. Any image_size divisible by 2**(len(channel_mult)-1) works; the FF-Parser weight maps are
    stored at the constructed size (other sizes interpolate them, see `FFParser`).
    """

    def __init__(
        self,
        *,
        image_size: int,
        model_channels: int,
        num_res_blocks: int,
        attention_ds: tuple[int, ...] = (),
        channel_mult: tuple[int, ...] | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        learn_sigma: bool = False,
        dropout: float = 0.0,
        image_channels: int = 3,
        mask_channels: int = 1,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        self_condition: bool = False,
        image_concat: bool = False,
        x0_tanh_scale: float | None = None,
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult) if channel_mult is not None else default_channel_mult(image_size)
        attention_ds = tuple(int(d) for d in attention_ds)
        _validate_args(
            image_size, model_channels, num_res_blocks, attention_ds, channel_mult, dropout,
            image_channels, mask_channels, num_classes,
        )
        self.image_size = image_size
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_ds = attention_ds
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.mask_channels = mask_channels
        self.image_channels = image_channels
        self.self_condition = self_condition
        self.image_concat = image_concat
        self.x0_tanh_scale = x0_tanh_scale
        self.learn_sigma = learn_sigma
        self.out_channels = mask_channels * (2 if learn_sigma else 1)
        self.size_multiple = 2 ** (len(channel_mult) - 1)

        widths = [model_channels * m for m in channel_mult]
        emb_dim = 4 * model_channels
        for k, w in enumerate(widths):  # fail early on head settings that do not divide a used width
            if 2**k in attention_ds or k == len(widths) - 1:
                attention_heads(w, num_heads, num_head_channels)

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, dropout, use_scale_shift_norm, use_checkpoint)

        def attn(c: int, ds: int) -> nn.Module:
            if ds not in attention_ds:
                return nn.Identity()
            return AttentionBlock(c, num_heads, num_head_channels, use_checkpoint)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None
        self.cond_encoder = ConditionEncoder(image_channels, widths, dropout=dropout, use_checkpoint=use_checkpoint)

        # Mask encoder: per level num_res_blocks x (ResBlock [+attn]), FF-Parser + fusion, then downsample.
        # self-conditioning (Analog Bits §3): the previous x_0 estimate enters beside x_t as more input channels;
        # image_concat: the image too, so the mask path sees its pixels from the first layer (as SegDiff does)
        in_channels = mask_channels * (2 if self_condition else 1) + (image_channels if image_concat else 0)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.enc_levels = nn.ModuleList()
        self.ff_parsers = nn.ModuleList()
        self.fusions = nn.ModuleList()
        self.downs = nn.ModuleList()
        skip_widths = [widths[0]]
        ch = widths[0]
        for k, w in enumerate(widths):
            ds, res_px = 2**k, image_size // 2**k
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_EncoderBlock(res(ch, w), attn(w, ds)))
                ch = w
                skip_widths.append(ch)
            self.enc_levels.append(blocks)
            self.ff_parsers.append(FFParser(ch, res_px, res_px))
            self.fusions.append(DynamicConditionalFusion(ch))
            if k < len(widths) - 1:
                self.downs.append(Downsample(ch))
                skip_widths.append(ch)

        self.middle_res1 = res(ch, ch)
        self.middle_attn = AttentionBlock(ch, num_heads, num_head_channels, use_checkpoint)
        self.middle_res2 = res(ch, ch)

        # Mask decoder: per level (deepest first) num_res_blocks+1 blocks, each eating one skip.
        self.dec_blocks = nn.ModuleList()
        for k in reversed(range(len(widths))):
            w, ds = widths[k], 2**k
            for i in range(num_res_blocks + 1):
                skip = skip_widths.pop()
                up = Upsample(w) if (k > 0 and i == num_res_blocks) else nn.Identity()
                self.dec_blocks.append(_DecoderBlock(res(ch + skip, w), attn(w, ds), up))
                ch = w
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )

    # ------------------------------------------------------------------ helpers
    def _check_spatial(self, shape: torch.Size, what: str) -> None:
        """Raise ValueError unless a (B, C, H, W) size can pass through every down/up-sampling stage."""
        h, w = shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"{what} spatial size {h}x{w} must be divisible by {self.size_multiple} "
                f"(2**(len(channel_mult)-1) for channel_mult={self.channel_mult})"
            )

    def encode_condition(self, image: Tensor) -> Condition:
        """Image (B, C, H, W) in [0, 1] -> Condition; depends on neither t nor x_t, so compute it once per image."""
        if image.ndim != 4 or image.shape[1] != self.image_channels:
            raise ValueError(
                f"image must be (B, {self.image_channels}, H, W) in [0, 1], got {tuple(image.shape)}"
            )
        self._check_spatial(image.shape, "image")
        image = (image.to(self.conv_in.weight.dtype) - 0.5) / 0.5
        cond = self.cond_encoder(image)
        return cond._replace(image=image) if self.image_concat else cond

    def _embed(self, timesteps: Tensor, batch: int, y: Tensor | None) -> Tensor:
        """Timestep (+ class) embedding, (B, 4 * model_channels)."""
        t = torch.as_tensor(timesteps, device=self.conv_in.weight.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.conv_in.weight.dtype))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this model is class-conditional (num_classes set): pass y")
            if y.shape != (batch,):
                raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("y was given but the model has no class conditioning (num_classes=None)")
        return emb

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        image: Tensor | None = None,
        cond: Condition | None = None,
        y: Tensor | None = None,
        return_calib: bool = False,
        self_cond: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Predict the diffusion target (and the variance value when learn_sigma) for x_t; pass exactly one of `image`
        or a cached `cond`. A self-conditioned model also takes `self_cond`, the previous x_0 estimate divided by the
        mask scale (zeros, the default, when there is none).

        return_calib=True also returns the calibration logits (B, 1, H, W), so training needs one forward call.
        """
        if (image is None) == (cond is None):
            raise ValueError("pass exactly one of image= or cond=")
        if x.ndim != 4 or x.shape[1] != self.mask_channels:
            raise ValueError(f"x must be (B, {self.mask_channels}, H, W), got {tuple(x.shape)}")
        self._check_spatial(x.shape, "x")
        if cond is None:
            cond = self.encode_condition(image)
        if cond.batch_size != x.shape[0]:
            raise ValueError(
                f"condition batch {cond.batch_size} != x batch {x.shape[0]} "
                "(use Condition.repeat_interleave for ensembles)"
            )
        if cond.features[0].shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"condition size {tuple(cond.features[0].shape[-2:])} != x size {tuple(x.shape[-2:])}"
            )
        emb = self._embed(timesteps, x.shape[0], y)
        out = self._denoise(x, emb, cond, self_condition_input(x, self.self_condition, self_cond))
        return (out, cond.calib_logits) if return_calib else out

    def _denoise(self, x: Tensor, emb: Tensor, cond: Condition, fed: Tensor | None) -> Tensor:
        """The mask path on x_t (and the self-conditioning input `fed`, and the image with image_concat)."""
        if fed is not None:
            x = torch.cat([x, fed], dim=1)
        if self.image_concat:
            x = torch.cat([x, cond.image.to(x.dtype)], dim=1)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        skips = [h]
        for k, blocks in enumerate(self.enc_levels):
            for i, block in enumerate(blocks):
                h = block(h, emb)
                if i < len(blocks) - 1:
                    skips.append(h)
            h = self.fusions[k](self.ff_parsers[k](h), cond.features[k].to(h.dtype))
            skips.append(h)
            if k < len(self.downs):
                h = self.downs[k](h)
                skips.append(h)

        h = self.middle_res2(self.middle_attn(self.middle_res1(h, emb)), emb)
        for block in self.dec_blocks:
            h = block(h, skips.pop(), emb)
        return bounded_output(self.out(h), self.mask_channels, self.x0_tanh_scale)


def self_condition_input(x: Tensor, self_condition: bool, self_cond: Tensor | None) -> Tensor | None:
    """The self-conditioning input a network takes beside x_t (Chen, Zhang, Hinton 2022, "Analog Bits", §3): None
    for a network without self-conditioning (then self_cond must be None), zeros for self_cond None (a chain's first
    step), else self_cond (the previous x0 estimate / b)."""
    if not self_condition:
        if self_cond is not None:
            raise ValueError("self_cond was given but the model is not self-conditioned (--self_condition False)")
        return None
    return torch.zeros_like(x) if self_cond is None else self_cond.to(x.dtype)


def bounded_output(out: Tensor, channels: int, scale: float | None) -> Tensor:
    """With `scale` b, the first `channels` output channels as b tanh(.): an x_0 prediction bounded to [-b, b], the
    range of the posterior mean of a {-b, b} mask (its foreground probability is then sigmoid(2 x raw output))."""
    if scale is None:
        return out
    return torch.cat([scale * torch.tanh(out[:, :channels]), out[:, channels:]], dim=1)


def _validate_args(
    image_size: int,
    model_channels: int,
    num_res_blocks: int,
    attention_ds: tuple[int, ...],
    channel_mult: tuple[int, ...],
    dropout: float,
    image_channels: int,
    mask_channels: int,
    num_classes: int | None,
) -> None:
    """Raise ValueError with a readable message for arguments the network cannot be built with."""
    if not channel_mult or any(int(m) != m or m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty tuple of positive integers, got {channel_mult}")
    if not isinstance(image_size, int) or image_size < 2:
        raise ValueError(f"image_size must be an integer >= 2, got {image_size!r}")
    multiple = 2 ** (len(channel_mult) - 1)
    if image_size % multiple:
        lo, hi = image_size // multiple * multiple, (image_size // multiple + 1) * multiple
        raise ValueError(
            f"image_size={image_size} is not divisible by {multiple} = 2**(len(channel_mult)-1) for "
            f"channel_mult={channel_mult}; use e.g. {lo or hi} or {hi}, or pass a shorter channel_mult"
        )
    if not isinstance(model_channels, int) or model_channels < 1:
        raise ValueError(f"model_channels must be a positive integer, got {model_channels!r}")
    if not isinstance(num_res_blocks, int) or num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be a positive integer, got {num_res_blocks!r}")
    if any(d < 1 for d in attention_ds):
        raise ValueError(f"attention_ds holds downsample factors (>= 1), got {attention_ds}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if image_channels < 1 or mask_channels < 1:
        raise ValueError(f"image_channels and mask_channels must be >= 1, got {image_channels}, {mask_channels}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")


class ConcatUNet(nn.Module):
    """A plain time-conditioned UNet denoiser on [x_t, image (, the previous x_0 estimate)] concatenated on the
    channels (SegDiff-style input concatenation, Amit et al. 2021): the plain-UNet baseline's backbone
    (aux_nets.AuxUNet, one residual block per level each way) with a timestep embedding and no separate image
    encoder (`--network unet`). The same call interface as MedSegDiffUNet; its Condition only carries the image,
    and it has no calibration head."""

    def __init__(self, *, image_size: int, model_channels: int, num_res_blocks: int = 1,
                 channel_mult: tuple[int, ...] | None = None, dropout: float = 0.0, learn_sigma: bool = False,
                 image_channels: int = 3, mask_channels: int = 1, self_condition: bool = False,
                 x0_tanh_scale: float | None = None) -> None:
        super().__init__()
        from guided_diffusion.network.aux_nets import AuxNetConfig, AuxUNet

        mult = ",".join(str(m) for m in (channel_mult or default_channel_mult(image_size)))
        cfg = AuxNetConfig(image_size=image_size, num_channels=model_channels, num_res_blocks=num_res_blocks,
                           channel_mult=mult, dropout=dropout)
        self.image_size, self.image_channels, self.mask_channels = image_size, image_channels, mask_channels
        self.self_condition, self.learn_sigma, self.x0_tanh_scale = self_condition, learn_sigma, x0_tanh_scale
        self.out_channels = mask_channels * (2 if learn_sigma else 1)
        in_channels = mask_channels * (2 if self_condition else 1) + image_channels
        self.body = AuxUNet(cfg, in_channels, image_channels, timed=True, out_channels=self.out_channels)

    def encode_condition(self, image: Tensor) -> Condition:
        """The image in [-1, 1] (all this network's condition is)."""
        if image.ndim != 4 or image.shape[1] != self.image_channels:
            raise ValueError(f"image must be (B, {self.image_channels}, H, W) in [0, 1], got {tuple(image.shape)}")
        return Condition([], None, (image.to(self.body.conv_in.weight.dtype) - 0.5) / 0.5)

    def forward(self, x: Tensor, timesteps: Tensor, image: Tensor | None = None, cond: Condition | None = None,
                y: Tensor | None = None, return_calib: bool = False, self_cond: Tensor | None = None):
        """The diffusion target (and the variance value when learn_sigma) for x_t; calib logits are None."""
        if (image is None) == (cond is None):
            raise ValueError("pass exactly one of image= or cond=")
        if y is not None:
            raise ValueError("y was given but the model has no class conditioning")
        cond = self.encode_condition(image) if cond is None else cond
        fed = self_condition_input(x, self.self_condition, self_cond)
        h = torch.cat([x] + ([fed] if fed is not None else []) + [cond.image.to(x.dtype)], dim=1)
        out = bounded_output(self.body._unet(h, self.body._embed(timesteps, x.shape[0])), self.mask_channels,
                             self.x0_tanh_scale)
        return (out, None) if return_calib else out
