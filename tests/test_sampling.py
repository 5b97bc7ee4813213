import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpm_solver import NoiseScheduleVP
from guided_diffusion.sampling import pipeline
from guided_diffusion.diffusion.gaussian_diffusion import create_diffusion
from guided_diffusion.sampling.samplers import (SOLVER_ALGORITHMS, SamplerSpec, respaced, sample_ensemble,
                                                spaced_timesteps)
from guided_diffusion.network.unet import Condition

ROOT = Path(__file__).resolve().parents[1]


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


def test_seed_fast_command_means_dpm_solver_pp_on_trained_schedule():
    cfg = pipeline.SampleConfig(dpm_solver=True)
    spec = pipeline.resolve_spec(cfg, 50, 1000)
    assert (spec.sampler, spec.steps, spec.order, spec.method) == ("dpm_solver++", 50, 2, "multistep")
    assert pipeline.resolve_spec(pipeline.SampleConfig(), 1000, 1000).sampler == "ddpm"
    assert pipeline.resolve_spec(pipeline.SampleConfig(), None, 1000).steps == 1000
    ckpt = {"path": "m.pt", "config": {"model": {"image_size": 64}, "diffusion": {"diffusion_steps": 1000}}}
    pipeline.check_flags_against_checkpoint({"diffusion_steps": 50, "image_size": 64}, ckpt, dpm_solver=True)
    with pytest.raises(ValueError, match="--diffusion_steps 50 contradicts"):
        pipeline.check_flags_against_checkpoint({"diffusion_steps": 50}, ckpt, dpm_solver=False)
    with pytest.raises(ValueError, match="--image_size 256 contradicts"):
        pipeline.check_flags_against_checkpoint({"image_size": 256}, ckpt, dpm_solver=True)


# ----- end to end through the scripts, on a tiny trained checkpoint ---------------------------------
def script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from guided_diffusion.data.datasets import make_synthetic
    base = tmp_path_factory.mktemp("run")
    make_synthetic(base / "data", num_images=20)
    r = script("segmentation_train.py", "--data_name", "SYNTHETIC", "--data_dir", base / "data", "--out_dir",
               base / "run", "--image_size", 16, "--num_channels", 8, "--num_res_blocks", 1,
               "--diffusion_steps", 40, "--batch_size", 4, "--max_steps", 2, "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return base


def read(p):
    return np.array(Image.open(p))


def test_sample_script_writes_the_contract_and_resumes(trained):
    out = trained / "pred"
    common = ["--model_path", trained / "run", "--out_dir", out, "--num_ensemble", 3, "--batch_size", 2,
              "--num_workers", 0, "--device", "cpu", "--max_images", 3]
    r = script("segmentation_sample.py", *common, "--sampler", "dpm_solver++", "--steps", 4, "--save_overlays",
               "True", "--fusion", "staple")
    assert r.returncode == 0, r.stderr
    import csv
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 3 and {"id", "sampler", "steps", "nfe", "seconds"} <= set(rows[0])
    assert rows[0]["nfe"] == "5" and rows[0]["sampler"] == "dpm_solver++"
    from guided_diffusion.data.datasets import list_pairs, load_image
    pairs = {p.id: p for p in list_pairs("SYNTHETIC", trained / "data", "test", split_file=out / "split.json")}
    for row in rows:
        mask = read(out / f"{row['id']}.png")
        w, h = load_image(pairs[row["id"]].image).size
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        for sub in ("prob", "uncertainty", "overlays"):
            assert (out / sub / f"{row['id']}.png").is_file()
    # test images are exactly the training run's test split
    import json
    split = json.load(open(trained / "run" / "split.json"))
    assert {r["id"] for r in rows} <= set(split["test"])
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    r = script("segmentation_sample.py", *common, "--sampler", "dpm_solver++", "--steps", 4,
               "--save_overlays", "True")
    assert r.returncode == 0 and "3 of 3 images already" in r.stdout
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    # the evaluation script accepts the folder as it is
    r = script("segmentation_env.py", "--inp_pth", out, "--data_name", "SYNTHETIC", "--data_dir", trained / "data",
               "--allow_missing")
    assert r.returncode == 0, r.stderr


def test_sample_script_is_reproducible_with_seed(trained):
    outs = []
    for k in range(2):
        out = trained / f"rep{k}"
        r = script("segmentation_sample.py", "--model_path", trained / "run", "--out_dir", out, "--sampler", "ddpm",
                   "--steps", 5, "--num_ensemble", 2, "--max_images", 2, "--batch_size", 2 - k, "--seed", 7,
                   "--num_workers", 0, "--device", "cpu")
        assert r.returncode == 0, r.stderr
        outs.append({p.name: read(p) for p in sorted((out / "prob").glob("*.png"))})
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) == 2
    for name in outs[0]:  # batch size 2 vs 1: same pixels
        assert np.abs(outs[0][name].astype(int) - outs[1][name]).max() <= 1


def test_channels_last_sampling_with_warmup_gives_the_same_masks(trained):
    common = ["--model_path", trained / "run", "--sampler", "sde-dpm_solver++", "--steps", 3, "--num_ensemble", 2,
              "--max_images", 3, "--batch_size", 2, "--num_workers", 0, "--device", "cpu", "--seed", 3]
    r = script("segmentation_sample.py", *common, "--out_dir", trained / "eager")
    assert r.returncode == 0, r.stderr
    r = script("segmentation_sample.py", *common, "--out_dir", trained / "fast", "--channels_last", "True",
               "--warmup", 1)
    assert r.returncode == 0, r.stderr
    for sub in ("prob", "uncertainty"):
        eager = {p.name: read(p).astype(int) for p in sorted((trained / "eager" / sub).glob("*.png"))}
        fast = {p.name: read(p).astype(int) for p in sorted((trained / "fast" / sub).glob("*.png"))}
        assert eager.keys() == fast.keys() and len(eager) == 3
        for name in eager:  # the warm-up draws from fresh per-image generators: the timed noise is unchanged
            assert np.abs(eager[name] - fast[name]).max() <= 1, (sub, name)


def test_compile_wraps_the_denoising_forward(trained, eager_compile):
    """--compile hands the network's forward to torch.compile and the compiled model samples what the eager one
    does, with no graph breaks in the denoising step."""
    calls, counters = eager_compile
    ckpt = next((trained / "run").glob("model_*.pt"))
    eager = pipeline.load_model(str(ckpt), torch.device("cpu"))
    compiled = pipeline.load_model(str(ckpt), torch.device("cpu"), compile=True, channels_last=True)
    assert len(calls) == 1 and calls[0].__name__ == "forward"
    images = torch.rand(2, 3, 16, 16)
    spec = SamplerSpec("dpm_solver++", 3)
    a = sample_ensemble(eager.model, eager.diffusion, images, 2, spec, seeds=[1, 2]).members
    b = sample_ensemble(compiled.model, compiled.diffusion, images, 2, spec, seeds=[1, 2]).members
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_sample_script_bad_inputs_are_one_line_errors(trained, tmp_path):
    r = script("segmentation_sample.py", "--model_path", tmp_path / "missing.pt", "--out_dir", tmp_path / "o")
    assert r.returncode == 2 and "missing.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = script("segmentation_sample.py", "--model_path", bad, "--out_dir", tmp_path / "o")
    assert r.returncode == 2 and "bad.pt" in r.stderr
    r = script("segmentation_sample.py", "--model_path", trained / "run", "--out_dir", tmp_path / "o",
               "--num_channels", 64, "--device", "cpu")
    assert r.returncode == 2 and "--num_channels 64 contradicts" in r.stderr
    r = script("segmentation_sample.py", "--model_path", trained / "run", "--out_dir", tmp_path / "o",
               "--fusion", "max", "--device", "cpu")
    assert r.returncode == 2 and "--fusion" in r.stderr


def test_benchmark_compares_against_the_ddpm_reference(trained, tmp_path):
    from guided_diffusion.reports import benchmark
    assert benchmark.parse_configs("ddpm:40, dpm_solver++:4") == [("ddpm", 40), ("dpm_solver++", 4)]
    with pytest.raises(ValueError, match="--configs"):
        benchmark.parse_configs("ddpm")
    r = script("benchmark_sampling.py", "--model_path", trained / "run", "--out_dir", tmp_path / "b", "--configs",
               "ddpm:1000,ddim:4,dpm_solver++:3,sde-dpm_solver++:3", "--num_ensemble", 2, "--max_images", 2,
               "--ensemble_check", "dpm_solver++:3", "--device", "cpu", "--plot", "True", "--plot_dir",
               tmp_path / "fig", "--plot_images", 2)
    assert r.returncode == 0, r.stderr
    import csv
    rows = list(csv.DictReader(open(tmp_path / "b" / "benchmark.csv")))
    assert [(x["sampler"], x["steps"], x["nfe"]) for x in rows] == [("ddpm", "40", "40"), ("ddim", "4", "4"),
                                                                     ("dpm_solver++", "3", "4"),
                                                                     ("sde-dpm_solver++", "3", "4")]
    ref = rows[0]
    assert float(ref["dice_delta"]) == 0 and float(ref["speedup"]) == 1
    for x in rows:
        assert float(x["dice_delta"]) == pytest.approx(float(x["dice"]) - float(ref["dice"]))
    assert "ensemble cost" in (tmp_path / "b" / "benchmark.md").read_text()
    # --plot: the two figures, complete PNGs, nothing half-written beside them
    for name in ("quant.png", "qual.png"):
        with Image.open(tmp_path / "fig" / name) as im:
            im.load()
            assert im.size[0] > 200 and im.size[1] > 100
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["qual.png", "quant.png"]


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
