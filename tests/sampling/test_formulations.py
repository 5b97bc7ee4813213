"""Every sampler with every prediction target, mask scale and self-conditioning (samplers.py, addpm.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from dpm_solver import NoiseScheduleVP
from guided_diffusion.diffusion.gaussian_diffusion import PREDICTIONS, create_diffusion, training_target
from guided_diffusion.network.unet import Condition
from guided_diffusion.sampling import addpm
from guided_diffusion.sampling.ensemble import fuse, uncertainty
from guided_diffusion.sampling.outputs import PredictionWriter
from guided_diffusion.sampling.samplers import SOLVER_ALGORITHMS, SamplerSpec, sample_ensemble

SAMPLER_STEPS = [("ddpm", 100), ("ddpm", 10), ("ddim", 10), ("dpm_solver", 10), ("dpm_solver++", 10),
                 ("sde-dpm_solver++", 10), ("ddim", 1)]


class ExactDenoiser(torch.nn.Module):
    """The exact prediction of `kind` for data that is the fixed mask x0 (a point mass), at real-valued t on the
    schedule DPM-Solver interpolates; with `self_condition` it also takes, and records, the fed-back estimate."""

    def __init__(self, diffusion, x0, kind, learn_sigma=False, self_condition=False):
        super().__init__()
        self.schedule = NoiseScheduleVP("discrete", betas=diffusion.betas)
        self.n, self.x0, self.kind, self.learn_sigma = diffusion.num_timesteps, x0, kind, learn_sigma
        self.self_condition, self.image_channels = self_condition, 3
        self.calls, self.fed = 0, []

    def encode_condition(self, image):
        return Condition([image.mean(1, keepdim=True)], image[:, :1] * 8 - 4)

    def forward(self, x, t, cond=None, self_cond=None):
        self.calls += 1
        if self.self_condition:
            self.fed.append(self_cond.clone())
        else:
            assert self_cond is None
        tc = (t.double() + 1) / self.n
        a = self.schedule.marginal_alpha(tc).reshape(-1, 1, 1, 1).to(x.dtype)
        s = self.schedule.marginal_std(tc).reshape(-1, 1, 1, 1).to(x.dtype)
        x0 = self.x0.to(x.dtype).expand_as(x)
        out = training_target(self.kind, x0, (x - a * x0) / s, a, s)
        return torch.cat([out, torch.zeros_like(out)], 1) if self.learn_sigma else out


def pattern(size=8):
    m = torch.zeros(1, 1, size, size)
    m[..., 2:6, 1:5] = 1
    return m


@pytest.mark.parametrize("sampler,steps", SAMPLER_STEPS)
@pytest.mark.parametrize("kind", PREDICTIONS)
def test_every_sampler_with_every_target_lands_on_the_data(sampler, steps, kind):
    b = 0.1
    d = create_diffusion(100, "cosine", kind == "eps", prediction=kind, mask_scale=b)
    x0 = 0.7 * d.mask_to_x0(pattern())  # inside (-b, b): no clipping at work
    model = ExactDenoiser(d, x0, kind, learn_sigma=kind == "eps")
    res = sample_ensemble(model, d, torch.rand(2, 3, 8, 8), 3, SamplerSpec(sampler, steps), seeds=[1, 2])
    want = d.x0_to_probability(x0).expand_as(res.members)
    # one step from x_T: an eps model's x0 = (x_T - s eps) / a divides float32 rounding by a = sqrt(alpha_bar_T)
    atol = 1e-2 if (kind, steps) == ("eps", 1) else 2e-3
    torch.testing.assert_close(res.members, want, atol=atol, rtol=0)
    assert res.nfe == model.calls == steps + (sampler in SOLVER_ALGORITHMS)


@pytest.mark.parametrize("kind", PREDICTIONS)
@pytest.mark.parametrize("inner", ["ddpm", "ddim", "dpm_solver++", "sde-dpm_solver++"])
def test_addpm_chain_with_every_target_lands_on_the_data(kind, inner):
    d = create_diffusion(100, "linear", False, prediction=kind, mask_scale=0.5)
    x0 = 0.6 * d.mask_to_x0(pattern())
    model = ExactDenoiser(d, x0, kind)
    chain = SamplerSpec(inner, 5, t_start=40, t_end=0)
    res = addpm.sample_addpm_ensemble(model, d, torch.rand(2, 3, 8, 8), 2, chain, [3, 4], addpm.HeadPreseg())
    torch.testing.assert_close(res.members, d.x0_to_probability(x0).expand_as(res.members), atol=2e-3, rtol=0)
    assert res.nfe_parts == {"preseg": 0, "chain": model.calls, "denoiser": 0}


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("dpm_solver++", 5), ("ddpm", 5), ("sde-dpm_solver++", 4)])
def test_self_conditioning_feeds_the_previous_estimate_and_counts_every_call(sampler, steps):
    b = 0.2
    d = create_diffusion(60, "linear", False, prediction="x0", mask_scale=b)
    x0 = 1.5 * d.mask_to_x0(pattern())  # outside [-b, b]: the fed-back estimate is the clipped one
    model = ExactDenoiser(d, x0, "x0", self_condition=True)
    res = sample_ensemble(model, d, torch.rand(1, 3, 8, 8), 2, SamplerSpec(sampler, steps), seeds=[5])
    assert res.nfe == model.calls == len(model.fed) == steps + (sampler in SOLVER_ALGORITHMS)
    assert torch.equal(model.fed[0], torch.zeros_like(model.fed[0]))  # nothing to feed at a chain's first step
    clipped = d.clip_x0(x0) / b  # the exact model's estimate, clipped to the mask range, divided by b
    for fed in model.fed[1:]:
        torch.testing.assert_close(fed, clipped.expand_as(fed), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.members, d.x0_to_probability(x0).expand_as(res.members), atol=2e-3, rtol=0)


@pytest.mark.parametrize("b", [0.1, 1.0])
def test_mask_scale_round_trips_through_sampling_to_0_255_masks(tmp_path, b):
    d = create_diffusion(50, "linear", False, prediction="v", mask_scale=b)
    m = pattern(16)
    model = ExactDenoiser(d, d.mask_to_x0(m), "v")
    res = sample_ensemble(model, d, torch.rand(1, 3, 16, 16), 3, SamplerSpec("dpm_solver++", 8), seeds=[0])
    with PredictionWriter(tmp_path) as writer:
        writer.write("img", fuse(res.members)[0], uncertainty(res.members)[0], (16, 16))
    mask = np.asarray(Image.open(tmp_path / "img.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, m[0, 0].numpy() == 1)
    prob = np.asarray(Image.open(tmp_path / "prob" / "img.png"))
    assert set(np.unique(prob)) == {0, 255}  # the exact model is sure of every pixel


def test_ddim_time_difference_steps_below_the_next_level_and_still_lands_on_the_data():
    d = create_diffusion(100, "linear", False, prediction="x0", mask_scale=0.1)
    x0 = 0.5 * d.mask_to_x0(pattern())
    seen = []

    class Recording(ExactDenoiser):
        def forward(self, x, t, cond=None, self_cond=None):
            seen.append((float(t[0]), x.detach().clone()))
            return super().forward(x, t, cond, self_cond)

    images = torch.rand(1, 3, 8, 8)
    plain = sample_ensemble(Recording(d, x0, "x0"), d, images, 1, SamplerSpec("ddim", 5), seeds=[0])
    plain_calls = list(seen)
    seen.clear()
    shifted = sample_ensemble(Recording(d, x0, "x0"), d, images, 1, SamplerSpec("ddim", 5, td=1.0), seeds=[0])
    assert [t for t, _ in seen] == [t for t, _ in plain_calls]  # the network sees the same nominal levels ...
    assert not torch.allclose(seen[1][1], plain_calls[1][1])  # ... but a less noisy input
    torch.testing.assert_close(shifted.members, plain.members, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="--td is DDIM's time difference"):
        SamplerSpec("dpm_solver++", 5, td=1.0).validate(100)
