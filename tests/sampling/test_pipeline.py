"""Tests for guided_diffusion.sampling.pipeline: flags against the checkpoint, and segmentation_sample.py end to end."""
import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.sampling import pipeline
from guided_diffusion.sampling.samplers import SamplerSpec, sample_ensemble


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


# ----- end to end through the scripts, on a tiny trained checkpoint (conftest's `trained`) -----------------
def read(p):
    return np.array(Image.open(p))


@pytest.mark.slow
def test_sample_script_writes_the_contract_and_resumes(trained, script):
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


@pytest.mark.slow
def test_sample_script_is_reproducible_with_seed(trained, script):
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


@pytest.mark.slow
def test_channels_last_sampling_with_warmup_gives_the_same_masks(trained, script):
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sample_script_bad_inputs_are_one_line_errors(trained, tmp_path, script):
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
