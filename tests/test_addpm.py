"""ADDPM: the forward jump, the truncated chain's ends, the denoiser call, the reduction to the plain sampler,
no ground truth at sampling time, the auxiliary networks' training and checkpoints, and the benchmark rows."""
import csv
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpm_solver import NoiseScheduleVP
from guided_diffusion.sampling import addpm, pipeline
from guided_diffusion.training import auxiliary
from guided_diffusion.network.aux_nets import DENOISER, PRESEG, AuxNetConfig, DenoiserNet, load_aux
from guided_diffusion.checkpoint import CheckpointError, load_checkpoint
from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion
from guided_diffusion.sampling.samplers import SamplerSpec, sample_ensemble
from guided_diffusion.network.unet import Condition

ROOT = Path(__file__).resolve().parents[1]


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


# ----- the auxiliary networks, trained through the scripts ---------------------------------------------
def load_script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *args):
    load_script(name).main([str(a) for a in args])


TINY = ["--image_size", 16, "--num_channels", 8, "--num_workers", 0, "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from guided_diffusion.data.datasets import make_synthetic
    base = tmp_path_factory.mktemp("addpm")
    make_synthetic(base / "data", num_images=20)
    run_script("segmentation_train.py", "--data_name", "SYNTHETIC", "--data_dir", base / "data", "--out_dir",
               base / "diff", "--num_res_blocks", 1, "--diffusion_steps", 40, "--noise_schedule", "cosine",
               "--learn_sigma", "False", "--batch_size", 4, "--max_steps", 2, *TINY)
    # the seed's flags (--batch_size 12 --lr 0.001 [--T]) with the diffusion run's split, data and schedule
    run_script("train_preseg_network.py", "--batch_size", 12, "--lr", 0.001, "--split_from", base / "diff",
               "--out_dir", base / "preseg", "--max_steps", 2, *TINY)
    run_script("train_denoising_network.py", "--batch_size", 12, "--lr", 0.001, "--T", 10, "--split_from",
               base / "diff", "--out_dir", base / "den", "--max_steps", 2, *TINY)
    return base


def test_aux_checkpoints_are_self_describing_and_reuse_the_split(runs):
    pre, den = load_checkpoint(runs / "preseg"), load_checkpoint(runs / "den")
    diff = load_checkpoint(runs / "diff")
    assert pre["kind"] == PRESEG and den["kind"] == DENOISER and pre["step"] == den["step"] == 2
    for ck in (pre, den):
        for key in ("model", "ema", "optimizer", "rng", "config", "split"):
            assert key in ck
        assert ck["split"] == diff["split"] and ck["config"]["data"]["data_name"] == "SYNTHETIC"
        assert ck["config"]["net"]["image_size"] == 16
    assert den["config"]["denoiser"] == {"T": 10, "diffusion_steps": 40, "noise_schedule": "cosine"}
    assert (runs / "preseg" / "split.json").read_text() == (runs / "diff" / "split.json").read_text()
    assert (runs / "den" / "log.csv").is_file()


def test_wrong_kind_of_checkpoint_is_a_clear_error(runs):
    with pytest.raises(CheckpointError, match="is a pre-segmentation network checkpoint, not a denoising network"):
        load_aux(runs / "preseg", DENOISER, torch.device("cpu"), flag="--denoiser_path")
    with pytest.raises(CheckpointError, match="--preseg_path .* is a diffusion model checkpoint"):
        load_aux(runs / "diff", PRESEG, torch.device("cpu"), flag="--preseg_path")
    with pytest.raises(CheckpointError, match="--model_path .* is a denoising network checkpoint"):
        pipeline.load_model(str(runs / "den"), torch.device("cpu"))


def test_denoiser_schedule_and_T_are_checked_against_the_diffusion_model(runs):
    den = load_aux(runs / "den", DENOISER, torch.device("cpu"))
    lm = pipeline.load_model(str(runs / "diff"), torch.device("cpu"))
    addpm.check_denoiser(den, lm.diffusion_cfg, 10)
    with pytest.raises(ValueError, match="--stop_t 11 is above the denoiser's --T 10"):
        addpm.check_denoiser(den, lm.diffusion_cfg, 11)
    den.ckpt["config"]["denoiser"]["noise_schedule"] = "linear"
    with pytest.raises(ValueError, match="trained on the 40-step linear schedule but the diffusion model uses "
                                         "the 40-step cosine"):
        addpm.check_denoiser(den, lm.diffusion_cfg, 10)


def test_aux_training_resumes_exactly_and_refuses_contradicting_flags(runs, tmp_path):
    def flags(out, steps, **more):
        parser = __import__("argparse").ArgumentParser()
        auxiliary.add_common_args(parser)
        auxiliary.add_denoiser_args(parser)
        argv = ["--split_from", runs / "diff", "--out_dir", out, "--max_steps", steps, "--batch_size", 4, "--T", 10,
                *TINY] + [str(x) for kv in more.items() for x in (f"--{kv[0]}", kv[1])]
        return vars(parser.parse_args([str(a) for a in argv]))

    auxiliary.train_aux(DENOISER, flags(tmp_path / "a", 3))
    auxiliary.train_aux(DENOISER, flags(tmp_path / "b", 1))
    auxiliary.train_aux(DENOISER, flags(tmp_path / "b", 3))
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    with pytest.raises(ValueError, match="--num_channels 16 contradicts the checkpoint"):
        auxiliary.plan_run(DENOISER, flags(tmp_path / "b", 4, num_channels=16))
    with pytest.raises(ValueError, match="--noise_schedule linear contradicts the --split_from run"):
        auxiliary.plan_run(DENOISER, flags(tmp_path / "c", 4, noise_schedule="linear"))
    with pytest.raises(ValueError, match="--T must be in 1..40"):
        auxiliary.plan_run(DENOISER, flags(tmp_path / "c", 4, T=41))


def sample_args(runs, out, *more):
    return ["--model_path", runs / "diff", "--out_dir", out, "--sampler", "addpm", "--num_ensemble", 2,
            "--max_images", 3, "--batch_size", 2, "--num_workers", 0, "--device", "cpu", *more]


def manifest(out):
    return list(csv.DictReader(open(out / "manifest.csv")))


@pytest.mark.parametrize("inner,preseg,nfe", [("ddpm", "net", "1+2+1"), ("dpm_solver++", "head", "0+2+1")])
def test_sample_script_addpm_writes_masks_uncertainty_and_nfe(runs, tmp_path, inner, preseg, nfe):
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


def test_no_ground_truth_reaches_the_model_at_sampling_time(runs, tmp_path):
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


def test_addpm_user_errors_are_one_line(runs, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "segmentation_sample.py"),
                        *map(str, sample_args(runs, tmp_path / "o", "--pre_t", 12, "--stop_t", 10, "--preseg",
                                              "head", "--denoiser_path", runs / "preseg"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--denoiser_path" in r.stderr and "is a pre-segmentation network checkpoint" in r.stderr
    for more, match in ((["--stop_t", 10, "--preseg", "head"], "give --denoiser_path"),
                        (["--stop_t", 5], "needs a pre-segmentation"),
                        (["--stop_t", 11, "--preseg", "head", "--denoiser_path", runs / "den"], "above the denoiser"),
                        (["--pre_t", 41, "--preseg", "head"], "--pre_t must be in 1..40")):
        with pytest.raises(ValueError, match=match):
            run_script("segmentation_sample.py", *sample_args(runs, tmp_path / "o", *more))


def test_benchmark_has_addpm_rows(runs, tmp_path):
    out = tmp_path / "b"
    common = ["--model_path", runs / "diff", "--out_dir", out, "--num_ensemble", 2, "--max_images", 2,
              "--ensemble_check", "", "--device", "cpu", "--pre_t", 12, "--stop_t", 10, "--denoiser_path", runs / "den"]
    run_script("benchmark_sampling.py", *common, "--configs", "ddpm:1000,addpm-ddpm:0,addpm-dpm_solver++:2",
               "--preseg", f"{runs / 'preseg'},head")
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert [(r["sampler"], r["steps"], r["nfe"], r["nfe_parts"]) for r in rows] == [
        ("ddpm", "40", "40", ""), ("addpm-ddpm (preseg)", "2", "4", "1+2+1"), ("addpm-ddpm (head)", "2", "3", "0+2+1"),
        ("addpm-dpm_solver++ (preseg)", "2", "4", "1+2+1"), ("addpm-dpm_solver++ (head)", "2", "3", "0+2+1")]
    assert float(rows[0]["dice_delta"]) == 0
    text = (out / "benchmark.md").read_text()
    assert "| addpm-ddpm (preseg) | 2 | 2 | 4 = 1+2+1 |" in text and "chain from x_12 to x_10" in text
    # --reuse: finished rows are read back from their manifests, not resampled
    before = {p: p.stat().st_mtime_ns for p in out.rglob("synth_*.png")}
    run_script("benchmark_sampling.py", *common, "--configs", "ddpm:1000,addpm-ddpm:0", "--preseg", runs / "preseg",
               "--reuse", "True")
    again = list(csv.DictReader(open(out / "benchmark.csv")))
    keys = ("sampler", "steps", "nfe", "nfe_parts", "dice")
    assert [tuple(r[k] for k in keys) for r in again] == [tuple(r[k] for k in keys) for r in rows[:2]]
    assert float(again[1]["seconds_per_image"]) == pytest.approx(float(rows[1]["seconds_per_image"]), abs=1e-3)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("synth_*.png")}
    from guided_diffusion.reports import benchmark
    from guided_diffusion.sampling.pipeline import SamplingSummary
    other = SamplingSummary("addpm-ddpm", 2, 2, images=0, skipped=0, seconds=0.0, nfe=0, nfe_parts={},
                            settings={"pre_t": 12, "stop_t": 9, "preseg": "head"}, out_dir="")
    with pytest.raises(ValueError, match="--reuse: .* holds masks sampled with"):
        benchmark.manifest_cost(out / "addpm-ddpm-0-n2-head", [r["id"] for r in manifest(out / "ddpm-40-n2")],
                                other)


def test_denoiser_net_is_time_conditioned():
    net = DenoiserNet(AuxNetConfig(image_size=16, num_channels=8)).eval()
    for p in net.parameters():  # move off the zero-initialised residual branches
        torch.nn.init.normal_(p, std=0.1)
    x, image = torch.randn(2, 1, 16, 16), torch.rand(2, 3, 16, 16)
    assert not torch.allclose(net(x, torch.tensor([1.0, 1.0]), image), net(x, torch.tensor([9.0, 9.0]), image))
    assert not torch.allclose(net(x, torch.tensor([1.0, 1.0]), image), net(x, torch.tensor([1.0, 1.0]), 1 - image))
