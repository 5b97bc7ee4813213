"""scripts/benchmark_quality.py: trains the diffusion models and the plain UNet for the same minutes, samples,
scores and writes the table and the figure (tiny models, seconds of training)."""
import csv

import pytest

from guided_diffusion.reports import quality


@pytest.mark.slow
def test_quality_benchmark_reports_every_model_against_the_unet(tmp_path, run_script):
    from guided_diffusion.data.datasets import make_synthetic

    make_synthetic(tmp_path / "data", num_images=20)
    out = tmp_path / "q"
    run_script("benchmark_quality.py", "--data_name", "SYNTHETIC", "--data_dir", tmp_path / "data", "--image_size", 16,
               "--minutes", 0.02, "--out_dir", out, "--ablations", "seed-eps", "--ddpm_images", 2,
               "--num_ensemble", 2, "--max_images", 3, "--device", "cpu", "--samplers", "ddim:1,dpm_solver++:3,seed:3",
               "--ablation_samplers", "dpm_solver++:3",
               "--diffusion_flags", "--diffusion_steps 20 --num_channels 8", "--unet_flags", "--num_channels 8")
    rows = list(csv.DictReader(open(out / "quality.csv")))
    assert [(r["model"], r["sampler"], r["steps"], r["NFE"]) for r in rows] == [
        ("plain UNet", "preseg", "1", "1"), ("diffusion", "ddim", "1", "1"), ("diffusion", "dpm_solver++", "3", "4"),
        ("diffusion", "dpm_solver++ (seed)", "3", "4"), ("seed-eps", "dpm_solver++", "3", "4")]
    assert all(r["images"] == "3" for r in rows) and rows[0]["Dice − UNet [95% CI]"] == ""
    text = (out / "quality.md").read_text()
    assert "On the first 2 test images, with DDPM over all T steps" in text and "| diffusion | ddpm | 20 | 20 |" in text
    assert (out / "quality.png").stat().st_size > 0
    # the seed's --dpm_solver True --diffusion_steps K is DPM-Solver++ with K steps: the same masks
    a, b = (out / "samples" / "diffusion" / d for d in ("dpm_solver++-3-n2", "dpm_solver++-3-n2-seed"))
    assert [p.read_bytes() for p in sorted(a.glob("*.png"))] == [p.read_bytes() for p in sorted(b.glob("*.png"))]
    # a re-run trains nothing more and resamples nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")}
    run_script("benchmark_quality.py", "--data_name", "SYNTHETIC", "--data_dir", tmp_path / "data", "--image_size", 16,
               "--minutes", 0.02, "--out_dir", out, "--ablations", "seed-eps", "--ddpm_images", 2,
               "--num_ensemble", 2, "--max_images", 3, "--device", "cpu", "--samplers", "ddim:1,dpm_solver++:3,seed:3",
               "--ablation_samplers", "dpm_solver++:3",
               "--diffusion_flags", "--diffusion_steps 20 --num_channels 8", "--unet_flags", "--num_channels 8")
    assert before == {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")}
    # --views 2: the same models, every row (the UNet's too) sampled again with mirrored copies, each row against the
    # UNet with the same views; pool_quality.py then tells the views apart
    run_script("benchmark_quality.py", "--data_name", "SYNTHETIC", "--data_dir", tmp_path / "data", "--image_size", 16,
               "--minutes", 0.02, "--out_dir", out, "--ddpm_images", 0, "--num_ensemble", 2, "--max_images", 3,
               "--device", "cpu", "--samplers", "dpm_solver++:3,seed:3", "--views", 2,
               "--diffusion_flags", "--diffusion_steps 20 --num_channels 8", "--unet_flags", "--num_channels 8")
    rows = list(csv.DictReader(open(out / "quality.csv")))
    assert [(r["model"], r["sampler"]) for r in rows] == [
        ("plain UNet", "preseg (views2)"), ("diffusion", "dpm_solver++ (views2)"),
        ("diffusion", "dpm_solver++ (seed+views2)")]
    assert before == {p: p.stat().st_mtime_ns for p in before}  # nothing retrained or resampled in the old rows
    import pandas as pd
    from guided_diffusion.reports.pooling import compare
    dice = {name: pd.read_csv(out / "samples" / name / "eval" / "evaluation.csv", index_col="id")["dice"]
            for name in ("plain_UNet/preseg-1-n2", "plain_UNet/preseg-1-n2-views2", "diffusion/dpm_solver++-3-n2",
                         "diffusion/dpm_solver++-3-n2-views2")}
    solver2 = dice["diffusion/dpm_solver++-3-n2-views2"]
    assert float(rows[1]["Dice − UNet [95% CI]"].split()[0]) == pytest.approx(
        (solver2 - dice["plain_UNet/preseg-1-n2-views2"]).mean(), abs=5e-5)
    pooled = {p.name: p.mean for p in compare([out], n_boot=10)}
    assert pooled["dpm_solver++ 3 (views2) − UNet with 2 views"] == pytest.approx(
        (solver2 - dice["plain_UNet/preseg-1-n2-views2"]).mean())
    assert pooled["dpm_solver++ 3 (views2) − the one-view UNet"] == pytest.approx(
        (solver2 - dice["plain_UNet/preseg-1-n2"]).mean())
    assert pooled["UNet with 2 views − UNet"] == pytest.approx(
        (dice["plain_UNet/preseg-1-n2-views2"] - dice["plain_UNet/preseg-1-n2"]).mean())
    assert pooled["dpm_solver++ 3 (views2) − dpm_solver++ 3"] == pytest.approx(
        (solver2 - dice["diffusion/dpm_solver++-3-n2"]).mean())
    assert pooled["dpm_solver++ 3 − UNet"] == pytest.approx(
        (dice["diffusion/dpm_solver++-3-n2"] - dice["plain_UNet/preseg-1-n2"]).mean())


@pytest.mark.slow
def test_extra_seeds_train_the_main_model_and_the_unet_again_and_pool_their_paired_differences(tmp_path, run_script):
    import numpy as np
    import pandas as pd

    from guided_diffusion.data.datasets import make_synthetic

    make_synthetic(tmp_path / "data", num_images=20)
    out = tmp_path / "q"
    run_script("benchmark_quality.py", "--data_name", "SYNTHETIC", "--data_dir", tmp_path / "data", "--image_size", 16,
               "--minutes", 0.01, "--out_dir", out, "--ddpm_images", 0, "--num_ensemble", 2, "--max_images", 4,
               "--device", "cpu", "--samplers", "ddim:1", "--extra_seeds", "3",
               "--diffusion_flags", "--diffusion_steps 20 --num_channels 8", "--unet_flags", "--num_channels 8")
    assert (out / "seed3" / "models" / "diffusion").is_dir() and (out / "seed3" / "models" / "unet").is_dir()
    assert load_checkpoint_seed(out / "seed3" / "models" / "diffusion") == 3
    assert load_checkpoint_seed(out / "seed3" / "models" / "unet") == 3

    def dice(root, model):
        folder = root / "samples" / model
        table = pd.read_csv(next(folder.glob("*/eval/evaluation.csv"))).set_index("id")
        return table["dice"]

    diffs = [dice(root, "diffusion") - dice(root, "plain_UNet") for root in (out, out / "seed3")]
    assert not np.allclose(diffs[0], diffs[1])  # two different seeds' models
    rows = list(csv.DictReader(open(out / "quality_seeds.csv")))
    assert [(r["model"], r["sampler"]) for r in rows] == [("plain UNet", "preseg"), ("diffusion", "ddim")]
    per_seed = [float(v) for v in rows[1]["Dice − UNet per seed"].split(" / ")]
    np.testing.assert_allclose(per_seed, [d.mean() for d in diffs], atol=1e-4)
    pooled = float(rows[1]["Dice − UNet over seeds [95% CI]"].split(" [")[0])
    assert pooled == pytest.approx(((diffs[0] + diffs[1].loc[diffs[0].index]) / 2).mean(), abs=1e-4)
    unet = [float(v) for v in rows[0]["Dice per seed"].split(" / ")]
    np.testing.assert_allclose(unet, [dice(root, "plain_UNet").mean() for root in (out, out / "seed3")], atol=1e-4)
    assert "Over the training seeds 0, 3" in (out / "quality.md").read_text()


@pytest.mark.slow
def test_jobs_train_the_models_side_by_side_in_subprocesses_on_one_split(tmp_path, run_script):
    from guided_diffusion.data.datasets import load_split, make_synthetic

    make_synthetic(tmp_path / "data", num_images=20)
    out = tmp_path / "q"
    args = ["--data_name", "SYNTHETIC", "--data_dir", tmp_path / "data", "--image_size", 16, "--minutes", 0.01,
            "--out_dir", out, "--ddpm_images", 3, "--num_ensemble", 2, "--max_images", 3, "--device", "cpu",
            "--samplers", "ddim:1", "--extra_seeds", "1", "--split_seed", 4, "--jobs", 2,
            "--diffusion_flags", "--diffusion_steps 20 --num_channels 8", "--unet_flags", "--num_channels 8"]
    run_script("benchmark_quality.py", *args)
    for root in (out, out / "seed1"):
        for name in ("diffusion", "unet"):
            assert "done: step" in (root / "models" / f"{name}.log").read_text()  # trained in a subprocess
        assert load_split(root / "models" / "diffusion" / "split.json") == \
            load_split(root / "models" / "unet" / "split.json")
    assert load_checkpoint_seed(out / "seed1" / "models" / "unet") == 1
    rows = list(csv.DictReader(open(out / "quality.csv")))
    # DDPM on every test image (--ddpm_images = --max_images): a row of the main table, not a second table
    assert [(r["model"], r["sampler"], r["images"]) for r in rows] == [
        ("plain UNet", "preseg", "3"), ("diffusion", "ddim", "3"), ("diffusion", "ddpm", "3")]
    assert "On the first" not in (out / "quality.md").read_text()
    bad = tmp_path / "bad"
    (bad / "models").mkdir(parents=True)
    (bad / "models" / "unet").write_text("a file where the UNet's run folder goes")
    with pytest.raises(RuntimeError, match=r"training failed: plain UNet in .*unet \(exit 2: error: "):
        run_script("benchmark_quality.py", *args[:9], bad, *args[10:])


def load_checkpoint_seed(run) -> int:
    from guided_diffusion.checkpoint import load_checkpoint

    return load_checkpoint(run)["config"]["train"]["seed"]


def test_bad_quality_flags_fail_before_any_training(tmp_path):
    base = quality.QualityConfig(data_name="SYNTHETIC", data_dir=str(tmp_path / "d"), out_dir=str(tmp_path / "q"))
    for change, needle in (({"ablations": "nope"}, "--ablations: unknown 'nope'"),
                           ({"samplers": "euler:3"}, "--samplers: unknown sampler 'euler'"),
                           ({"minutes": 0.0}, "--minutes must be > 0"),
                           ({"jobs": 0}, "--jobs must be >= 1"),
                           ({"views": 3}, "--views must be one of 1, 2, 4, got 3"),
                           ({"extra_seeds": "0,1"}, "--extra_seeds 0,1 repeats a seed"),
                           ({"extra_seeds": "one"}, "--extra_seeds must be comma-separated integers"),
                           ({"diffusion_flags": "--prediction score"}, "--prediction must be")):
        cfg = quality.QualityConfig(**{**vars(base), **change})
        with pytest.raises((ValueError, SystemExit)) as exc:
            quality.run_quality(cfg)
        assert exc.type is SystemExit or needle in str(exc.value), (change, exc.value)
    assert not (tmp_path / "q").exists()


def test_folds_reach_both_trainers(tmp_path):
    base = dict(data_name="SYNTHETIC", data_dir=str(tmp_path / "d"), out_dir=str(tmp_path / "q"))
    plain = quality.QualityConfig(**base)
    assert "--folds" not in quality.diffusion_argv(plain, "main", "") and "--folds" not in quality.unet_job(plain).argv
    cfg = quality.QualityConfig(**base, folds=5, fold=4)
    for argv in (quality.diffusion_argv(cfg, "main", ""), list(quality.unet_job(cfg).argv)):
        i = argv.index("--folds")
        assert argv[i:i + 4] == ["--folds", "5", "--fold", "4"]
    with pytest.raises(ValueError, match="--fold must be in"):
        quality.diffusion_argv(quality.QualityConfig(**base, folds=5, fold=5), "main", "")


def test_every_ablation_is_a_valid_model_that_differs_from_the_main_one(tmp_path):
    from guided_diffusion.config import parse_train_args

    cfg = quality.QualityConfig(data_name="SYNTHETIC", data_dir=str(tmp_path / "d"), out_dir=str(tmp_path / "q"))

    def configs(name, flags):
        model, diffusion, _, train = parse_train_args(quality.diffusion_argv(cfg, name, flags))
        return {**vars(model), **vars(diffusion), **{k: v for k, v in vars(train).items() if k != "out_dir"}}

    main = configs("main", "")
    for name, (what, flags) in quality.ABLATIONS.items():
        changed = {k for k, v in configs(name, flags).items() if main[k] != v}
        assert changed and what, name  # a row whose flags change nothing would report noise as an effect
        assert name not in (quality.MAIN, "unet"), "an ablation's folder would collide with the main or UNet run"
    seed = configs("seed-eps", quality.ABLATIONS["seed-eps"][1])
    assert (seed["prediction"], seed["learn_sigma"], seed["mask_scale"], seed["network"], seed["image_concat"]) == \
        ("eps", True, 1.0, "medsegdiff", False)
