"""Tests for --views (samplers.sample_views): mirrored copies of each image, sampled in one batch and mirrored back."""
import pytest
import torch

from dpm_solver import NoiseScheduleVP
from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion
from guided_diffusion.network.unet import Condition
from guided_diffusion.sampling.ensemble import uncertainty
from guided_diffusion.sampling.samplers import (FLIP_VIEWS, FromNoise, OnePass, SamplerSpec, sample_ensemble,
                                                sample_views, view_seed)


def asymmetric_images(b=2, size=8):
    """Images whose masks (channel 0 > 0.5) differ from each of their mirror images and from each other."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, size, size, generator=g)
    images[:, 0, :3, :2] = 1.0  # a block in one corner only
    images[1, 0, -2:, :] = 1.0
    mask = (images[:, :1] > 0.5).float()
    for dims in FLIP_VIEWS[1:]:
        assert not torch.equal(mask, mask.flip(dims))
    assert not torch.equal(mask[0], mask[1])
    return images, mask


class ImageMaskModel(torch.nn.Module):
    """The exact eps for data that is each image's own mask, x0 = 2 m - 1 with m = (channel 0 > 0.5), at real-valued
    t on the discrete schedule DPM-Solver interpolates (its features: zeros, unused)."""

    def __init__(self, diffusion):
        super().__init__()
        self.schedule, self.n = NoiseScheduleVP("discrete", betas=diffusion.betas), diffusion.num_timesteps
        self.encodes = 0

    def encode_condition(self, image):
        self.encodes += 1
        return Condition([torch.zeros_like(image[:, :1])], 2 * (image[:, :1] > 0.5).to(image.dtype) - 1)

    def forward(self, x, t, cond=None, image=None):
        tc = (t.double() + 1) / self.n
        a = self.schedule.marginal_alpha(tc).reshape(-1, 1, 1, 1).to(x.dtype)
        s = self.schedule.marginal_std(tc).reshape(-1, 1, 1, 1).to(x.dtype)
        return (x - a * cond.calib_logits) / s


class Zero(ImageMaskModel):
    """eps = 0: ancestral noise makes every member differ."""

    def forward(self, x, t, cond=None, image=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 10), ("dpm_solver++", 10),
                                           ("sde-dpm_solver++", 10)])
def test_every_view_lands_on_the_images_own_mask_in_one_batch(sampler, steps):
    d = create_diffusion(100, "cosine", False)
    model = ImageMaskModel(d)
    images, mask = asymmetric_images()
    res = sample_views(FromNoise(SamplerSpec(sampler, steps)), model, d, images, 3, seeds=[1, 2], views=4)
    assert res.members.shape == (2, 12, 8, 8)
    # each copy's chain lands on the mirrored mask; mirrored back, every member is the image's own mask
    torch.testing.assert_close(res.members, mask.expand(-1, 12, -1, -1), atol=2e-3, rtol=0)
    assert model.encodes == 1  # the 4 copies of the 2 images went through the encoder as one batch
    assert res.nfe == steps + (sampler != "ddpm" and sampler != "ddim")  # NFE per member, as without views


def test_view_zero_is_the_run_without_views_and_each_other_view_its_own_seeded_mirror_run():
    d = create_diffusion(50, "linear", False)
    images, _ = asymmetric_images(3)
    seeds, spec = [10, 11, 12], SamplerSpec("sde-dpm_solver++", 8)
    got = sample_views(FromNoise(spec), Zero(d), d, images, 2, seeds, views=4).members
    assert got.shape == (3, 8, 8, 8)
    plain = sample_views(FromNoise(spec), Zero(d), d, images, 2, seeds, views=1).members
    torch.testing.assert_close(plain, sample_ensemble(Zero(d), d, images, 2, spec, seeds).members,
                               atol=0, rtol=0)
    torch.testing.assert_close(got[:, :2], plain, atol=0, rtol=0)  # --views 1 and view 0 are the same members
    for v, dims in enumerate(FLIP_VIEWS):
        alone = sample_ensemble(Zero(d), d, images.flip(dims) if dims else images, 2, spec,
                                [view_seed(s, v) for s in seeds]).members
        torch.testing.assert_close(got[:, 2 * v:2 * v + 2], alone.flip(dims) if dims else alone, atol=0, rtol=0)
    assert (got[:, 0] - got[:, 2]).abs().max() > 1e-3  # another view draws other noise
    assert len({view_seed(11, v) for v in range(4)}) == 4


def test_one_pass_network_views_average_mirrored_predictions_and_show_where_they_disagree():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 1, 3, padding=1)  # a random kernel: not mirror-symmetric
    images, _ = asymmetric_images()
    res = sample_views(OnePass(), net, None, images, 2, seeds=[0, 1], views=2)
    with torch.no_grad():
        own, mirrored = torch.sigmoid(net(images)), torch.sigmoid(net(images.flip(-1))).flip(-1)
    torch.testing.assert_close(res.members, torch.cat([own, own, mirrored, mirrored], 1))
    assert uncertainty(res.members, "std").amax() > 1e-3  # one pass per view: the views differ, the map is not 0
    assert res.nfe == 1


def test_views_other_than_1_2_4_are_an_error_naming_the_flag():
    with pytest.raises(ValueError, match=r"--views must be one of 1, 2, 4, got 3"):
        sample_views(OnePass(), torch.nn.Identity(), None, torch.rand(1, 1, 4, 4), 1, [0], views=3)
