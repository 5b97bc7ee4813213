"""Tests for guided_diffusion.sampling.samplers: spacing, respacing, every sampler on point-mass data, bf16 autocast."""
import pytest
import torch

from dpm_solver import NoiseScheduleVP
from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion
from guided_diffusion.network.unet import Condition
from guided_diffusion.sampling import pipeline
from guided_diffusion.sampling.samplers import (SOLVER_ALGORITHMS, SamplerSpec, respaced, sample_ensemble,
                                                spaced_timesteps)


class PointMassModel(torch.nn.Module):
    """The exact eps for data that is the constant mask value c: eps = (x - alpha_t c) / sigma_t.

    Noise levels at real-valued t come from the same discrete schedule DPM-Solver interpolates."""

    def __init__(self, diffusion, c, learn_sigma=False):
        super().__init__()
        self.schedule = NoiseScheduleVP("discrete", betas=diffusion.betas)
        self.n, self.c, self.learn_sigma = diffusion.num_timesteps, c, learn_sigma
        self.encodes, self.calls, self.image_channels = 0, 0, 3

    def encode_condition(self, image):
        self.encodes += 1
        return Condition([image.mean(1, keepdim=True)], image[:, :1])

    def forward(self, x, t, cond=None, image=None):
        self.calls += 1
        assert cond is not None and cond.features[0].shape[0] == x.shape[0]
        tc = (t.double() + 1) / self.n
        a = self.schedule.marginal_alpha(tc).reshape(-1, 1, 1, 1).to(x.dtype)
        s = self.schedule.marginal_std(tc).reshape(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a * self.c) / s
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


def test_spaced_timesteps_cover_both_ends():
    for steps in (1, 2, 7, 50, 100):
        ts = spaced_timesteps(100, steps)
        assert ts[0] == 99 and ts == sorted(ts, reverse=True) and len(ts) == steps
        if steps > 1:
            assert ts[-1] == 0


def test_respacing_all_steps_is_identity_and_keeps_alpha_bar():
    d = create_diffusion(100, "linear", True)
    torch.testing.assert_close(respaced(d, list(range(100))).betas, d.betas)
    keep = spaced_timesteps(100, 10)
    r = respaced(d, keep)
    torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[sorted(keep)])


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddpm", 10), ("ddim", 10), ("dpm_solver", 10),
                                           ("dpm_solver++", 10), ("dpm_solver++", 5), ("sde-dpm_solver++", 10)])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_every_sampler_lands_on_point_mass_data_and_counts_nfe(sampler, steps, learn_sigma):
    d = create_diffusion(100, "cosine", learn_sigma)
    c = 0.6
    model = PointMassModel(d, c, learn_sigma)
    images = torch.rand(2, 3, 8, 8)
    res = sample_ensemble(model, d, images, 3, SamplerSpec(sampler, steps), seeds=[1, 2])
    assert res.members.shape == (2, 3, 8, 8)
    torch.testing.assert_close(res.members, torch.full_like(res.members, (c + 1) / 2), atol=2e-3, rtol=0)
    # the solvers spend one more evaluation denoising from t = 1/N to x_0
    assert res.nfe == model.calls == steps + (sampler in SOLVER_ALGORITHMS)
    assert model.encodes == 1  # image features once per batch, reused by every step and member


@pytest.mark.parametrize("sampler", ["ddpm", "sde-dpm_solver++"])
def test_stochastic_samplers_differ_per_member_and_reproduce_per_image(sampler):
    d = create_diffusion(50, "linear", False)

    class Zero(PointMassModel):  # predicts eps = 0: ancestral noise makes the members differ
        def forward(self, x, t, cond=None, image=None):
            return torch.zeros_like(x)

    model = Zero(d, 0.0)
    images = torch.rand(3, 3, 8, 8)
    spec = SamplerSpec(sampler, 20)
    a = sample_ensemble(model, d, images, 4, spec, seeds=[10, 11, 12]).members
    assert (a[0, 0] - a[0, 1]).abs().max() > 1e-3
    # image 1 alone, with its seed, gives the same members as inside the batch
    b = sample_ensemble(model, d, images[1:2], 4, spec, seeds=[11]).members
    torch.testing.assert_close(a[1:2], b)


def test_spec_validation_names_the_flag():
    d = create_diffusion(20, "linear", False)
    with pytest.raises(ValueError, match="--steps"):
        SamplerSpec("ddim", 50).validate(d.num_timesteps)
    with pytest.raises(ValueError, match="--sampler"):
        SamplerSpec("euler", 5).validate(20)
    with pytest.raises(ValueError, match="--order"):
        SamplerSpec("dpm_solver++", 5, order=4).validate(20)
    with pytest.raises(ValueError, match="sde-dpm_solver.. runs --method multistep with --order 1 or 2"):
        SamplerSpec("sde-dpm_solver++", 5, order=3).validate(20)
    with pytest.raises(ValueError, match="--method singlestep"):
        SamplerSpec("sde-dpm_solver++", 5, method="singlestep").validate(20)


def test_bf16_autocast_runs_the_network_in_bf16_and_returns_fp32_members():
    """--amp bf16: the network's convolutions run in bf16 (outputs differ from fp32), the solver's arithmetic and
    the members stay fp32, and a stochastic sampler's members stay close to the fp32 ones."""
    from guided_diffusion.config import DiffusionConfig, ModelConfig, create_gaussian_diffusion, create_model

    dc = DiffusionConfig(diffusion_steps=40)
    torch.manual_seed(0)
    model = create_model(ModelConfig(image_size=16, num_channels=8, num_res_blocks=1, attention_resolutions="8"),
                         dc).eval()
    with torch.no_grad():
        for p in model.parameters():  # the output layers start at zero: give them weights
            if not p.abs().sum():
                p.normal_(0, 0.1)
    diffusion, images, cpu = create_gaussian_diffusion(dc), torch.rand(2, 3, 16, 16), torch.device("cpu")
    members = {}
    for amp in ("none", "bf16"):
        with torch.no_grad(), pipeline.sampling_autocast(amp, cpu):
            members[amp] = sample_ensemble(model, diffusion, images, 3, SamplerSpec("sde-dpm_solver++", 10),
                                           seeds=[1, 2]).members
    assert members["bf16"].dtype == members["none"].dtype == torch.float32
    gap = (members["bf16"] - members["none"]).abs().max().item()
    assert 0 < gap < 0.1, gap
    with pytest.raises(ValueError, match="--amp must be auto, none or bf16, got 'fp8'"):
        pipeline.sampling_autocast("fp8", cpu)
