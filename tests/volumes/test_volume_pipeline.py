"""End to end on generated volumes: train a few steps, sample (only --model_path), evaluate per case in 3-D, for
the BraTS and the Decathlon layouts; the written masks keep their source's geometry."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_volumes import SHAPE, SPACING

from guided_diffusion.checkpoint import find_latest
from guided_diffusion.data import volumes

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--image_size", "16", "--num_channels", "8", "--num_res_blocks", "1", "--attention_resolutions", "",
         "--diffusion_steps", "20", "--batch_size", "4", "--max_steps", "2", "--save_interval", "2",
         "--log_interval", "1", "--num_workers", "0", "--device", "cpu", "--ema_rate", "0.9"]
SAMPLE = ["--dpm_solver", "True", "--diffusion_steps", "2", "--num_ensemble", "2", "--batch_size", "5",
          "--num_workers", "0", "--device", "cpu"]


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_prediction_folder(pred, data_name, data_dir, split):
    """One mask, probability and uncertainty volume per test case, each on its source image's grid."""
    cases = {c.id: c for c in volumes.find_cases(data_name, data_dir)}
    assert sorted(r["id"] for r in rows(pred / "manifest.csv")) == sorted(split["test"])
    assert {p.name for p in pred.glob("*.nii.gz")} == {f"{c}.nii.gz" for c in split["test"]}
    for case in split["test"]:
        src = nib.load(str(cases[case].image))
        for path, dtype in ((pred / f"{case}.nii.gz", np.uint8), (pred / "prob" / f"{case}.nii.gz", np.float32),
                            (pred / "uncertainty" / f"{case}.nii.gz", np.float32)):
            out = nib.load(str(path))
            assert out.shape == SHAPE and out.get_data_dtype() == dtype
            np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
            np.testing.assert_allclose(out.header.get_zooms()[:3], SPACING, rtol=1e-6)
            assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine) == ("L", "P", "S")
        mask = np.asarray(nib.load(str(pred / f"{case}.nii.gz")).dataobj)
        prob = np.asarray(nib.load(str(pred / "prob" / f"{case}.nii.gz")).dataobj)
        assert set(np.unique(mask)) <= {0, 1} and ((prob > 0.5) == (mask == 1)).all()
        assert 0 <= prob.min() and prob.max() <= 1


@pytest.mark.parametrize("layout,data_name", [("brats", "BRATS"), ("nifti", "NIFTI")])
def test_train_sample_evaluate(volume_sets, tmp_path, run_script, layout, data_name, capsys):
    data_dir, run, pred = volume_sets[layout], tmp_path / "run", tmp_path / "pred"
    run_script("segmentation_train.py", "--data_name", data_name, "--data_dir", data_dir, "--out_dir", run, *TRAIN)
    ckpt = torch.load(find_latest(run), map_location="cpu", weights_only=True)
    data = ckpt["config"]["data"]
    assert ckpt["config"]["model"]["image_channels"] == 4
    assert data["modalities"] == ("t1,t1ce,t2,flair" if layout == "brats" else "FLAIR,T1w,t1gd,T2w")
    assert (data["labels"], data["slice_axis"], data["norm_percentiles"]) == ("", 2, "0.5,99.5")
    split = json.loads((run / "split.json").read_text())
    assert set(ckpt["split"]["test"]) == set(split["test"]) and split["test"]

    run_script("segmentation_sample.py", "--model_path", run, "--out_dir", pred, *SAMPLE)
    assert json.loads((pred / "split.json").read_text())["test"] == split["test"]
    check_prediction_folder(pred, data_name, data_dir, split)
    manifest = rows(pred / "manifest.csv")
    assert all(int(r["slices"]) == SHAPE[2] and 0 < int(r["sampled_slices"]) <= SHAPE[2] for r in manifest)
    settings = json.loads((pred / "sampling.json").read_text())["settings"]
    assert settings["modalities"] == data["modalities"] and settings["data_name"] == data_name

    capsys.readouterr()
    run_script("segmentation_sample.py", "--model_path", run, "--out_dir", pred, *SAMPLE)  # a rerun: all done
    assert "0 cases sampled" in capsys.readouterr().out
    # --views 2: every slice also sampled mirrored; the volumes keep the contract
    run_script("segmentation_sample.py", "--model_path", run, "--out_dir", tmp_path / "pred2", *SAMPLE, "--views", 2)
    check_prediction_folder(tmp_path / "pred2", data_name, data_dir, split)
    assert {r["views"] for r in rows(tmp_path / "pred2" / "manifest.csv")} == {"2"}

    run_script("segmentation_env.py", "--inp_pth", pred, "--data_name", data_name, "--data_dir", data_dir)
    out = capsys.readouterr().out
    assert "hd95 (mm)" in out and "assd (mm)" in out and "cases, macro average" in out
    table = rows(pred / "evaluation.csv")
    assert sorted(r["id"] for r in table) == sorted(split["test"])
    assert all(r["spacing_mm"] == "1x1.2x2.5" and r["shape"] == "24x20x12" for r in table)
    report = json.loads((pred / "evaluation.json").read_text())
    assert report["settings"]["surface_unit"] == "mm" and report["n_cases"] == len(split["test"])
    assert set(report["metrics"]) >= {"dice", "iou", "hd95", "assd", "sensitivity", "specificity", "ece"}
    # the same scores from a folder of label volumes (--out_pth), the core labels too
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    for case in volumes.find_cases(data_name, data_dir):
        if case.id in split["test"]:
            (labels_dir / f"{case.id}.nii.gz").write_bytes(case.mask.read_bytes())
    run_script("segmentation_env.py", "--inp_pth", pred, "--out_pth", labels_dir, "--csv", tmp_path / "b.csv",
               "--json", tmp_path / "b.json")
    assert [r["dice"] for r in rows(tmp_path / "b.csv")] == [r["dice"] for r in table]
    run_script("segmentation_env.py", "--inp_pth", pred, "--out_pth", labels_dir, "--labels", "1",
               "--csv", tmp_path / "c.csv", "--json", tmp_path / "c.json")
    assert [int(r["gt_voxels"]) for r in rows(tmp_path / "c.csv")] < [int(r["gt_voxels"]) for r in table]


def test_prediction_of_another_grid_is_an_error(volume_sets, tmp_path, run_script):
    from guided_diffusion.evaluation.scoring import EvaluationError

    case = volumes.find_cases("BRATS", volume_sets["brats"])[0]
    pred = tmp_path / "pred"
    pred.mkdir()
    img = nib.load(str(case.mask))
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 10), np.uint8), img.affine), str(pred / f"{case.id}.nii.gz"))
    with pytest.raises(EvaluationError, match="is 24x20x10 but its ground truth .* is 24x20x12"):
        run_script("segmentation_env.py", "--inp_pth", pred, "--data_name", "BRATS", "--data_dir",
                   volume_sets["brats"], "--split", "all", "--allow_missing", "True")


@pytest.mark.slow
def test_scripts_as_users_run_them(volume_sets, tmp_path):
    """The three commands (and the generator) in subprocesses, on a Decathlon folder with one file per channel."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SEG_DEBUG", None)

    def script(name, *args):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    data, run, pred = tmp_path / "msd", tmp_path / "run", tmp_path / "pred"
    script("make_synthetic_volumes.py", "--layout", "nifti", "--out_dir", data, "--cases", 4, "--shape", "24,20,12",
           "--channels_layout", "split")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_volumes.py"), "--layout", "nifti",
                        "--out_dir", data], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not empty" in r.stderr
    script("segmentation_train.py", "--data_name", "NIFTI", "--data_dir", data, "--out_dir", run,
           "--modalities", "FLAIR,T2w", "--skip_empty_slices", "0.5", *TRAIN)
    script("segmentation_sample.py", "--model_path", run, "--out_dir", pred, *SAMPLE)
    split = json.loads((run / "split.json").read_text())
    check_prediction_folder(pred, "NIFTI", data, split)
    r = script("segmentation_env.py", "--inp_pth", pred, "--data_name", "NIFTI", "--data_dir", data)
    assert "hd95 (mm)" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "segmentation_train.py"), "--data_name", "NIFTI",
                        "--data_dir", data, "--out_dir", tmp_path / "bad", "--slice_axis", "3", *TRAIN], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: --slice_axis must be 0, 1 or 2 (an axis of the 3-D " \
                                                     "volume; 2 is axial), got 3"


@pytest.mark.slow
def test_torchrun_shards_cases(volume_sets, tmp_path, run_script):
    """Two processes split the cases between them (whole cases each) and write what one process writes."""
    run, one, two = tmp_path / "run", tmp_path / "one", tmp_path / "two"
    run_script("segmentation_train.py", "--data_name", "BRATS", "--data_dir", volume_sets["brats"], "--out_dir", run,
               *TRAIN)
    flags = [*SAMPLE, "--split", "all", "--seed", "3"]
    run_script("segmentation_sample.py", "--model_path", run, "--out_dir", one, *flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("SEG_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "scripts" / "segmentation_sample.py"), "--model_path", str(run), "--out_dir",
                        str(two), *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(rows(two / "manifest.csv")) == 6 and "6 cases sampled" in r.stdout
    for path in sorted(one.glob("*.nii.gz")):
        a = np.asarray(nib.load(str(one / "prob" / path.name)).dataobj)
        b = np.asarray(nib.load(str(two / "prob" / path.name)).dataobj)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_auxiliary_networks_refuse_volumes(volume_sets, tmp_path, run_script):
    """ADDPM's pre-segmentation network takes RGB images: a one-line error before anything is written."""
    with pytest.raises(ValueError, match="--data_name BRATS: the pre-segmentation network takes 3-channel images"):
        run_script("train_preseg_network.py", "--data_name", "BRATS", "--data_dir", volume_sets["brats"],
                   "--out_dir", tmp_path / "pre", "--image_size", "16", "--num_channels", "8", "--max_steps", "1",
                   "--num_workers", "0", "--device", "cpu")
    assert not (tmp_path / "pre").exists()
