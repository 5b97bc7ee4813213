"""Tests for guided_diffusion.training.auxiliary: preseg/denoiser checkpoints, resume, wrong-kind, schedule errors."""
import pytest
import torch
from tiny_runs import TINY_AUX_FLAGS

from guided_diffusion.checkpoint import CheckpointError, load_checkpoint
from guided_diffusion.network.aux_nets import DENOISER, PRESEG, load_aux
from guided_diffusion.sampling import addpm, pipeline
from guided_diffusion.training import auxiliary


def test_aux_checkpoints_are_self_describing_and_reuse_the_split(runs):
    pre, den = load_checkpoint(runs / "preseg"), load_checkpoint(runs / "den")
    diff = load_checkpoint(runs / "diff")
    assert pre["kind"] == PRESEG and den["kind"] == DENOISER and pre["step"] == den["step"] == 2
    for ck in (pre, den):
        for key in ("model", "ema", "optimizer", "rng", "config", "split"):
            assert key in ck
        assert ck["split"] == diff["split"] and ck["config"]["data"]["data_name"] == "SYNTHETIC"
        assert ck["config"]["net"]["image_size"] == 16
    assert den["config"]["denoiser"] == {"T": 10, "diffusion_steps": 40, "noise_schedule": "cosine", "mask_scale": 1.0}
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
                *TINY_AUX_FLAGS] + [str(x) for kv in more.items() for x in (f"--{kv[0]}", kv[1])]
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
