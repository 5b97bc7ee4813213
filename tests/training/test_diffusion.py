"""Tests for guided_diffusion.training.diffusion: its checkpoint, learn_sigma False, flags, the training CLI."""
import functools
from pathlib import Path

import pytest
from tiny_runs import CPU, tiny

from guided_diffusion.checkpoint import find_latest, load_checkpoint
from guided_diffusion.training.diffusion import DiffusionTrainer


SEED_CMD = ("--data_name ISIC --data_dir ISIC --out_dir runs/isic --image_size 256 --num_channels 128 "
            "--class_cond False --num_res_blocks 2 --num_heads 1 --learn_sigma True --use_scale_shift_norm False "
            "--attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear "
            "--rescale_learned_sigmas False --rescale_timesteps False --lr 1e-4 --batch_size 16").split()


def test_checkpoint_is_self_describing(tmp_path, syn_dir):
    DiffusionTrainer(*tiny(tmp_path, syn_dir), CPU).run()
    ckpt = load_checkpoint(find_latest(tmp_path))
    assert ckpt["step"] == 4 and Path(ckpt["path"]).name == "model_0000004.pt"
    for key in ("model", "ema", "optimizer", "scaler", "rng", "config", "split"):
        assert key in ckpt
    assert ckpt["config"]["model"]["image_size"] == 16 and ckpt["config"]["diffusion"]["diffusion_steps"] == 50
    assert set(ckpt["split"]["train"]).isdisjoint(ckpt["split"]["test"])
    assert (tmp_path / "split.json").is_file() and (tmp_path / "log.csv").read_text().count("\n") == 5
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_cross_validation_fold_is_the_runs_split(tmp_path, syn_dir):
    from guided_diffusion.data import datasets

    mc, dc, data, tc = tiny(tmp_path, syn_dir, max_steps=1)
    data.folds, data.fold = 3, 2
    DiffusionTrainer(mc, dc, data, tc, CPU).run()
    saved, ckpt = datasets.load_split(tmp_path / "split.json"), load_checkpoint(find_latest(tmp_path))
    ids = [p.id for p in datasets.list_pairs("SYNTHETIC", syn_dir, "all")]
    assert {k: saved[k] for k in datasets.SPLITS} == datasets.make_fold_split(ids, 3, 2)
    assert (ckpt["config"]["data"]["folds"], ckpt["config"]["data"]["fold"]) == (3, 2)
    assert ckpt["split"]["test"] == saved["test"]


def test_learn_sigma_false_trains(tmp_path, syn_dir):
    t = DiffusionTrainer(*tiny(tmp_path, syn_dir, learn_sigma=False, max_steps=2), CPU)
    t.run()
    assert t.model.out_channels == 1


def test_resume_with_contradicting_flag_is_an_error(tmp_path, syn_dir):
    mc, dc, data, tc = tiny(tmp_path, syn_dir, max_steps=2)
    DiffusionTrainer(mc, dc, data, tc, CPU).run()
    mc.num_channels = 16
    with pytest.raises(ValueError, match="--num_channels 16 contradicts"):
        DiffusionTrainer(mc, dc, data, tc, CPU)


def test_seed_command_parses_unchanged(load_script):
    segmentation_train = load_script("segmentation_train.py")
    args = segmentation_train.build_parser().parse_args(SEED_CMD)
    assert (args.image_size, args.num_channels, args.learn_sigma, args.use_scale_shift_norm) == (256, 128, True, False)
    assert args.attention_resolutions == "16" and args.lr == 1e-4 and args.max_steps > 0


@pytest.mark.slow
def test_cli_trains_and_reports_bad_input(tmp_path, syn_dir, script):
    train = functools.partial(script, "segmentation_train.py", timeout=300)  # in a subprocess, as users run it
    small = ["--image_size", "16", "--num_channels", "8", "--num_res_blocks", "1", "--diffusion_steps", "20",
             "--batch_size", "2", "--num_workers", "0", "--device", "cpu"]
    r = train("--data_name", "SYNTHETIC", "--data_dir", str(syn_dir), "--out_dir", str(tmp_path / "ok"),
              "--max_steps", "2", "--log_interval", "1", *small)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ok" / "model_0000002.pt").is_file()
    r = train("--data_name", "KVASIR", "--data_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "x"),
              *small)
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = train("--data_name", "SYNTHETIC", "--data_dir", str(syn_dir), "--out_dir", str(tmp_path / "y"),
              "--class_cond", "True", *small)
    assert r.returncode == 2 and "--class_cond" in r.stderr
    r = train("--learn_sigma", "maybe")
    assert r.returncode == 2 and "learn_sigma" in r.stderr
    r = train("--data_name", "SYNTHETIC", "--data_dir", str(syn_dir), "--out_dir", str(tmp_path / "z"),
              "--preload", "maybe", *small)
    assert r.returncode == 2 and r.stderr.strip() == "error: --preload must be auto, True or False, got 'maybe'"
    assert not (tmp_path / "z").exists()  # refused before anything was written
