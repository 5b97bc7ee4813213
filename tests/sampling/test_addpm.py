"""Tests for guided_diffusion.sampling.addpm: the forward jump, truncated chains, the denoiser, the sample script."""
import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dpm_solver import NoiseScheduleVP
from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion
from guided_diffusion.network.unet import Condition
from guided_diffusion.sampling import addpm, pipeline
from guided_diffusion.sampling.samplers import SamplerSpec, sample_ensemble


# ----- mocks -----------------------------------------------------------------------------------------
class PointMass(torch.nn.Module):
    """Exact eps for data that is the constant mask c, at real-valued t (DPM-Solver's interpolated schedule);
    records every timestep it is called at."""

    def __init__(self, diffusion, c):
        super().__init__()
        self.schedule = NoiseScheduleVP("discrete", betas=diffusion.betas)
        self.n, self.c, self.image_channels = diffusion.num_timesteps, c, 3
        self.calls: list[float] = []

    def encode_condition(self, image):
        return Condition([image.mean(1, keepdim=True)], image[:, :1] * 8 - 4)  # head logits: image channel 0

    def forward(self, x, t, cond=None):
        assert cond is None or cond.features[0].shape[0] == x.shape[0]
        self.calls.append(float(t[0]))
        tc = (t.double() + 1) / self.n
        a = self.schedule.marginal_alpha(tc).reshape(-1, 1, 1, 1).to(x.dtype)
        s = self.schedule.marginal_std(tc).reshape(-1, 1, 1, 1).to(x.dtype)
        return (x - a * self.c) / s


class Smooth(PointMass):
    """A deterministic, image-dependent, not exact eps: any change of the path shows in the output."""

    def forward(self, x, t, cond=None):
        self.calls.append(float(t[0]))
        return 0.3 * torch.tanh(x) + 0.2 * cond.features[0] + 1e-3 * t.reshape(-1, 1, 1, 1)


class ZeroNoise:
    """A NoiseSource that draws zeros: the chain then follows its mean exactly."""

    def __init__(self, batch):
        self.batch = batch

    def __call__(self, shape):
        return torch.zeros((self.batch, *shape), dtype=torch.float64)


class RecordingDenoiser(torch.nn.Module):
    """Logits = 4 x_t; records the batch, t and images of each call."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, image):
        self.seen.append((x.shape[0], t.clone(), image.clone()))
        return 4 * x


class ConstPreseg:
    """A pre-segmenter that outputs a fixed probability map and counts one evaluation."""
    nfe, label = 1, "const"

    def __init__(self, p):
        self.p = p

    def __call__(self, images, cond):
        return torch.full_like(images[:, :1], self.p)


# ----- the math, step by step -------------------------------------------------------------------------
def test_forward_jump_is_the_marginal_at_exactly_pre_t():
    d = create_diffusion(100, "linear", False)
    x0 = torch.ones(4, 1, 8, 8, dtype=torch.float64)
    eps = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    ac = d.alphas_cumprod
    for pre_t in (1, 30, 100):
        want = ac[pre_t - 1].sqrt() * x0 + (1 - ac[pre_t - 1]).sqrt() * eps  # x_{pre_t}: alpha_bar at index pre_t-1
        torch.testing.assert_close(addpm.forward_jump(d, x0, pre_t, eps), want, rtol=0, atol=1e-12)
    # the jump's marginal: mean sqrt(ab) x0, std sqrt(1 - ab) (DDPM eq. 4)
    big = addpm.forward_jump(d, torch.ones(1, 1, 256, 256), 30, torch.randn(1, 1, 256, 256))
    assert abs(big.mean() - ac[29].sqrt()) < 0.02 and abs(big.std() - (1 - ac[29]).sqrt()) < 0.02


def test_start_mask_thresholds_the_preseg_or_keeps_it_soft():
    p = torch.tensor([0.2, 0.5, 0.51, 0.9])
    assert addpm.start_mask(p).tolist() == [-1, -1, 1, 1]
    torch.testing.assert_close(addpm.start_mask(p, soft=True), 2 * p - 1)


CHAINS = [("ddpm", 0), ("ddpm", 7), ("ddim", 5), ("dpm_solver++", 4), ("dpm_solver", 3)]


@pytest.mark.parametrize("sampler,steps", CHAINS)
@pytest.mark.parametrize("pre_t,stop_t", [(30, 12), (100, 0), (13, 12)])
def test_chain_starts_at_pre_t_and_lands_on_stop_t(sampler, steps, pre_t, stop_t):
    """With zero noise and the exact point-mass model every chain follows x_t = sqrt(ab_t) c: its end tells
    exactly which level it landed on, its calls which level it started from."""
    from guided_diffusion.sampling.samplers import SAMPLER_FNS

    d = create_diffusion(100, "linear", False)
    steps = min(steps or pre_t, pre_t - stop_t)
    c, ac = 0.6, d.alphas_cumprod
    model = PointMass(d, c)
    spec = SamplerSpec(sampler, steps, t_start=pre_t, t_end=stop_t)
    spec.validate(100)
    x = addpm.forward_jump(d, torch.full((2, 1, 4, 4), c, dtype=torch.float64), pre_t,
                           torch.zeros(2, 1, 4, 4, dtype=torch.float64))
    out = SAMPLER_FNS[sampler](model, d, x, spec, ZeroNoise(2))
    want = ac[stop_t - 1].sqrt() * c if stop_t > 0 else torch.tensor(c, dtype=torch.float64)
    atol = 1e-5 if sampler.startswith("dpm") else 1e-9  # the solver's schedule is built from float32 betas
    torch.testing.assert_close(out, torch.full_like(out, float(want)), rtol=0, atol=atol)
    if stop_t > 0:  # one level off is far outside that tolerance
        assert abs(float(ac[stop_t].sqrt() - ac[stop_t - 1].sqrt())) * c > 100 * atol
    assert model.calls[0] == pytest.approx(pre_t - 1, abs=1e-9)  # the first call sees x_{pre_t}: index pre_t - 1
    if sampler in ("ddpm", "ddim"):
        assert model.calls[-1] == stop_t and len(model.calls) == steps  # its step lands on x_{stop_t}
        if sampler == "ddpm" and steps == pre_t - stop_t:
            assert model.calls == list(range(pre_t - 1, stop_t - 1, -1))
    else:
        assert all(stop_t - 1 - 1e-9 <= t <= pre_t - 1 + 1e-9 for t in model.calls)
        assert len(model.calls) == steps + (stop_t == 0)  # denoise_to_zero only when the chain ends on x_0


def test_truncated_ddpm_adds_the_noise_of_its_last_level():
    """Stopping above x_0 the last step is the posterior q(x_stop | x_{stop+1}, x_0) with its noise (the chain's
    x_stop is a sample at level stop_t, not a mean); a chain to x_0 adds none at its last step."""
    d = create_diffusion(50, "linear", False)
    model = PointMass(d, 0.0)
    for stop_t, draws in ((10, 20), (0, 19)):
        count = []

        def noise(shape):
            count.append(1)
            return torch.zeros((1, *shape), dtype=torch.float64)

        spec = SamplerSpec("ddpm", 20, t_start=stop_t + 20, t_end=stop_t)
        from guided_diffusion.sampling.samplers import sample_ddpm
        sample_ddpm(model, d, torch.zeros(1, 1, 2, 2, dtype=torch.float64), spec, noise)
        assert len(count) == draws


def test_spec_validation_names_the_addpm_flags():
    with pytest.raises(ValueError, match="--pre_t must be in 1..100"):
        SamplerSpec("ddpm", 5, t_start=101, t_end=0).validate(100)
    with pytest.raises(ValueError, match="--stop_t must be in 0..29"):
        SamplerSpec("ddpm", 5, t_start=30, t_end=30).validate(100)
    with pytest.raises(ValueError, match="--steps must be in 1..18"):
        SamplerSpec("ddpm", 50, t_start=30, t_end=12).validate(100)
    with pytest.raises(ValueError, match="--pre_t must be >= 2"):
        SamplerSpec("dpm_solver++", 1, t_start=1, t_end=0).validate(100)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 6), ("dpm_solver++", 3)])
def test_denoiser_runs_once_per_member_on_x_stop_t(sampler, steps):
    d = create_diffusion(40, "cosine", False)
    model, den = PointMass(d, 0.2), RecordingDenoiser()
    images = torch.rand(2, 3, 8, 8)
    spec = SamplerSpec(sampler, steps, t_start=16, t_end=9)
    res = addpm.sample_addpm_ensemble(model, d, images, 3, spec, [1, 2], ConstPreseg(0.9), den)
    assert len(den.seen) == 1  # one call for all members of all images
    batch, t, seen_images = den.seen[0]
    assert batch == 6 and t.tolist() == [8.0] * 6  # level stop_t = 9 is index 8
    torch.testing.assert_close(seen_images, images.repeat_interleave(3, dim=0))
    assert res.members.shape == (2, 3, 8, 8) and 0 <= float(res.members.min()) <= float(res.members.max()) <= 1
    # the truncated solver ends at t = 9/N and spends no denoise_to_zero evaluation
    assert res.nfe_parts == {"preseg": 1, "chain": steps, "denoiser": 1} and res.nfe == steps + 2


def test_head_preseg_costs_no_evaluation_and_members_differ_only_by_noise():
    d = create_diffusion(40, "linear", False)
    model = Smooth(d, 0.0)
    images = torch.rand(3, 3, 8, 8)
    spec = SamplerSpec("ddpm", 10, t_start=12, t_end=0)
    res = addpm.sample_addpm_ensemble(model, d, images, 4, spec, [5, 6, 7], addpm.HeadPreseg())
    assert res.nfe_parts == {"preseg": 0, "chain": 10, "denoiser": 0}
    assert (res.members[0, 0] - res.members[0, 1]).abs().max() > 1e-4  # different noise, different members
    alone = addpm.sample_addpm_ensemble(model, d, images[1:2], 4, spec, [6], addpm.HeadPreseg())
    torch.testing.assert_close(res.members[1:2], alone.members)  # independent of batching


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddpm", 9), ("ddim", 6), ("dpm_solver++", 5)])
def test_pre_t_T_stop_t_0_without_denoiser_is_the_plain_sampler(sampler, steps, monkeypatch):
    d = create_diffusion(50, "cosine", False)
    images = torch.rand(2, 3, 8, 8)
    plain_model, addpm_model = Smooth(d, 0.0), Smooth(d, 0.0)
    plain = sample_ensemble(plain_model, d, images, 3, SamplerSpec(sampler, steps), [3, 4])
    spec = SamplerSpec(sampler, steps, t_start=50, t_end=0)
    res = addpm.sample_addpm_ensemble(addpm_model, d, images, 3, spec, [3, 4], addpm.HeadPreseg())
    assert addpm_model.calls == plain_model.calls and res.nfe == plain.nfe
    # x_T ~ q(x_T | x0_pre) differs from pure noise eps only by sqrt(ab_T) x0_pre + (sqrt(1 - ab_T) - 1) eps
    eps = torch.randn(6, 1, 8, 8)
    x_T = addpm.forward_jump(d, torch.ones_like(eps), 50, eps)
    assert (x_T - eps).abs().max() < 2 * float(d.alphas_cumprod[-1].sqrt()) < 3e-3
    assert (res.members - plain.members).abs().mean() < 1e-2  # (a solver near t = T amplifies it by 1/alpha_T)
    # and started from the same x_T the two are the same computation, bit for bit
    monkeypatch.setattr(addpm, "forward_jump", lambda diffusion, x0, pre_t, eps: eps)
    same = addpm.sample_addpm_ensemble(addpm_model, d, images, 3, spec, [3, 4], addpm.HeadPreseg())
    assert torch.equal(same.members, plain.members)


def test_denoiser_pairing_with_stop_t_is_checked():
    d = create_diffusion(40, "linear", False)
    model, images = PointMass(d, 0.0), torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="--stop_t 9 ends the chain on a noisy mask"):
        addpm.sample_addpm_ensemble(model, d, images, 1, SamplerSpec("ddpm", 3, t_start=12, t_end=9), [0],
                                    addpm.HeadPreseg())
    with pytest.raises(ValueError, match="--denoiser_path would not be used"):
        addpm.sample_addpm_ensemble(model, d, images, 1, SamplerSpec("ddpm", 3, t_start=12, t_end=0), [0],
                                    addpm.HeadPreseg(), RecordingDenoiser())


def test_sample_flags_resolve_to_the_truncated_chain():
    cfg = pipeline.SampleConfig(sampler="addpm", pre_t=300, stop_t=250)
    spec = pipeline.resolve_spec(cfg, None, 1000)
    assert (spec.sampler, spec.steps, spec.t_start, spec.t_end) == ("ddpm", 50, 300, 250)
    spec = pipeline.resolve_spec(pipeline.SampleConfig(sampler="addpm", addpm_inner="dpm_solver++", steps=3), None, 1000)
    assert (spec.sampler, spec.steps, spec.t_start, spec.t_end) == ("dpm_solver++", 3, 300, 250)  # 3T/10, T/4
    spec = pipeline.resolve_spec(pipeline.SampleConfig(sampler="addpm", dpm_solver=True), 5, 1000)
    assert (spec.sampler, spec.steps) == ("dpm_solver++", 5)
    with pytest.raises(ValueError, match="--pre_t, --denoiser_path belong to --sampler addpm"):
        pipeline.resolve_spec(pipeline.SampleConfig(sampler="ddpm", pre_t=3, denoiser_path="x"), None, 1000)
    with pytest.raises(ValueError, match="--addpm_inner must be one of"):
        pipeline.resolve_spec(pipeline.SampleConfig(sampler="addpm", addpm_inner="euler"), None, 1000)
    with pytest.raises(ValueError, match="--preseg head and --preseg_path p disagree"):
        pipeline.preseg_source(pipeline.SampleConfig(preseg="head", preseg_path="p"))


# ----- through segmentation_sample.py, on conftest's `runs` (diffusion + preseg + denoiser checkpoints) ---
def sample_args(runs, out, *more):
    return ["--model_path", runs / "diff", "--out_dir", out, "--sampler", "addpm", "--num_ensemble", 2,
            "--max_images", 3, "--batch_size", 2, "--num_workers", 0, "--device", "cpu", *more]


def manifest(out):
    return list(csv.DictReader(open(out / "manifest.csv")))


@pytest.mark.parametrize("inner,preseg,nfe", [("ddpm", "net", "1+2+1"), ("dpm_solver++", "head", "0+2+1")])
def test_sample_script_addpm_writes_masks_uncertainty_and_nfe(runs, tmp_path, inner, preseg, nfe, run_script):
    out = tmp_path / "pred"
    pre = ["--preseg_path", runs / "preseg"] if preseg == "net" else ["--preseg", "head"]
    run_script("segmentation_sample.py", *sample_args(runs, out, "--pre_t", 12, "--stop_t", 10, "--addpm_inner",
                                                      inner, *pre, "--denoiser_path", runs / "den"))
    rows = manifest(out)
    assert len(rows) == 3 and {r["sampler"] for r in rows} == {f"addpm-{inner}"}
    assert {(r["steps"], r["nfe"], r["pre_t"], r["stop_t"]) for r in rows} == {("2", str(eval(nfe)), "12", "10")}
    for r in rows:
        mask = np.array(Image.open(out / f"{r['id']}.png"))
        assert set(np.unique(mask)) <= {0, 255}
        assert (out / "prob" / f"{r['id']}.png").is_file() and (out / "uncertainty" / f"{r['id']}.png").is_file()


def test_addpm_with_views_samples_the_mirrored_copies_at_the_same_nfe(runs, tmp_path, run_script):
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ("--pre_t", 12, "--stop_t", 10, "--preseg_path", runs / "preseg", "--denoiser_path", runs / "den")
    run_script("segmentation_sample.py", *sample_args(runs, one, *flags))
    run_script("segmentation_sample.py", *sample_args(runs, two, *flags, "--views", 2))
    a, b = manifest(one), manifest(two)
    assert [r["id"] for r in b] == [r["id"] for r in a] and {r["views"] for r in b} == {"2"}
    assert [(r["nfe"], r["nfe_preseg"], r["nfe_chain"], r["nfe_denoiser"]) for r in b] == \
        [(r["nfe"], r["nfe_preseg"], r["nfe_chain"], r["nfe_denoiser"]) for r in a]
    prob = [[np.array(Image.open(out / "prob" / f"{r['id']}.png")) for r in a] for out in (one, two)]
    assert any(not np.array_equal(x, y) for x, y in zip(*prob))  # the mirrored copies' members are fused in


def test_no_ground_truth_reaches_the_model_at_sampling_time(runs, tmp_path, run_script):
    """Same images, different masks (inverted): the sampled folders are identical, so masks are never read
    into the model's inputs (the split is the diffusion run's, so the same images are sampled)."""
    flipped = tmp_path / "flipped"
    shutil.copytree(runs / "data", flipped)
    for m in (flipped / "masks").iterdir():
        arr = np.array(Image.open(m))
        Image.fromarray((255 - arr).astype(np.uint8)).save(m)
        assert m.read_bytes() != (runs / "data" / "masks" / m.name).read_bytes()
    outs = []
    for k, data in enumerate((runs / "data", flipped)):
        out = tmp_path / f"o{k}"
        run_script("segmentation_sample.py", *sample_args(runs, out, "--data_dir", data, "--pre_t", 12, "--stop_t",
                                                          10, "--preseg_path", runs / "preseg", "--denoiser_path",
                                                          runs / "den"))
        outs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) == 9
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_addpm_user_errors_are_one_line(runs, tmp_path, script, run_script):
    r = script("segmentation_sample.py", *sample_args(runs, tmp_path / "o", "--pre_t", 12, "--stop_t", 10, "--preseg",
                                                      "head", "--denoiser_path", runs / "preseg"), timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--denoiser_path" in r.stderr and "is a pre-segmentation network checkpoint" in r.stderr
    for more, match in ((["--stop_t", 10, "--preseg", "head"], "give --denoiser_path"),
                        (["--stop_t", 5], "needs a pre-segmentation"),
                        (["--stop_t", 11, "--preseg", "head", "--denoiser_path", runs / "den"], "above the denoiser"),
                        (["--pre_t", 41, "--preseg", "head"], "--pre_t must be in 1..40")):
        with pytest.raises(ValueError, match=match):
            run_script("segmentation_sample.py", *sample_args(runs, tmp_path / "o", *more))
