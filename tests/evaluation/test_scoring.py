"""Tests for guided_diffusion.evaluation.scoring and segmentation_env.py: pairing, loading, reports, every error."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from guided_diffusion.evaluation import scoring as E
from guided_diffusion.data.datasets import DataError

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture
def env_script(load_script):
    """scripts/segmentation_env.py as a module, to call main() in-process (faster than a subprocess)."""
    return load_script("segmentation_env.py")


@pytest.fixture
def cli(script):
    """cli(*args): the script run as users do, from the repository root."""
    return lambda *args: script("segmentation_env.py", *args, timeout=120)


def save(path: Path, mask: np.ndarray, **kw) -> Path:
    """Write a bool mask as 0/255 (or a uint8 map as is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask
    Image.fromarray(arr).save(path, **kw)
    return path


def square(shape=(40, 50), top=10, left=10, size=10) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


def folder_hash(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under a folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(pred: Path, gt: Path | None = None, **kw) -> E.EvalResult:
    """evaluate() with a ground-truth folder and small bootstrap."""
    kw.setdefault("n_boot", 50)
    return E.evaluate(E.EvalOptions(inp_pth=pred, out_pth=gt, progress=False, **kw))


def run_data(pred: Path, data_name: str, data: Path, **kw) -> E.EvalResult:
    """evaluate() with a data set's ground truth and small bootstrap."""
    return E.evaluate(E.EvalOptions(inp_pth=pred, data_name=data_name, data_dir=data, n_boot=20, progress=False, **kw))


@pytest.fixture
def isic(tmp_path):
    """Three ISIC ground truths (_Segmentation) and predictions (ISIC_<id>.png) shifted by 0, 1, 2 px."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i in range(3):
        save(gt / f"ISIC_000000{i}_Segmentation.png", square())
        save(pred / f"ISIC_000000{i}.png", square(left=10 + i))
    return pred, gt


# ---------------------------------------------------------------- ids and pairing


@pytest.mark.parametrize("name,isic,expected", [
    ("ISIC_0000001_Segmentation.png", True, "ISIC_0000001"),
    ("ISIC_0000001_segmentation.png", True, "ISIC_0000001"),
    ("pred_ISIC_0012345_v2.png", True, "ISIC_0012345"),
    ("cju0qkwl35piu0993l0dewei2.png", True, None),
    ("cju0qkwl35piu0993l0dewei2.jpg", False, "cju0qkwl35piu0993l0dewei2"),
    ("case7_mask.png", False, "case7"),
    ("case7_Segmentation.png", False, "case7"),
    ("case7.png", False, "case7"),
])
def test_file_id(name, isic, expected):
    assert E.file_id(name, isic) == expected


def test_isic_pairing_and_metrics(isic):
    res = run(*isic)
    t = res.per_image.set_index("id")
    assert list(t.index) == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert t["dice"].tolist() == pytest.approx([1.0, 0.9, 0.8])
    assert t["hd95"].tolist()[0] == 0.0
    assert res.summary["metrics"]["dice"]["mean"] == pytest.approx(0.9)
    assert res.summary["n_images"] == 3 and "ece" not in res.summary["metrics"]


def test_sampler_side_files_are_ignored(isic):
    pred, gt = isic
    (pred / "manifest.csv").write_text("id,sampler,steps,nfe,seconds\nISIC_0000000,dpm,50,50,1.0\n")
    (pred / "split.json").write_text("{}")
    save(pred / "overlays" / "ISIC_0000000.png", square())  # subfolders are not predictions
    save(pred / ".hidden_ISIC_0000001.png", square())
    res = run(pred, gt)
    assert len(res.per_image) == 3 and res.summary["counts"]["ignored_predictions"] == 0
    res2 = run(pred, gt)  # its own evaluation.csv/json are not predictions either
    assert res2.per_image["dice"].tolist() == res.per_image["dice"].tolist()


def test_stem_pairing_with_mask_suffix_and_extra_predictions(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "a_mask.png", square())
    save(gt / "b.png", square())
    save(pred / "a.png", square())
    save(pred / "b.jpg", square(), quality=95)
    save(pred / "zzz.png", square())
    res = run(pred, gt)
    assert res.per_image["id"].tolist() == ["a", "b"] and res.per_image["dice"].tolist() == [1.0, 1.0]
    assert res.summary["counts"]["ignored_predictions"] == 1
    assert any("1 predictions without ground truth ignored: zzz.png" in n for n in res.notes)


def test_ground_truth_beside_images_uses_the_masks(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"  # ISIC 2016 keeps ISIC_x.jpg beside ISIC_x_Segmentation.png
    save(gt / "ISIC_0000001.jpg", np.zeros((40, 50, 3), np.uint8))
    save(gt / "ISIC_0000001_Segmentation.png", square())
    save(pred / "ISIC_0000001.png", square())
    res = run(pred, gt)
    assert len(res.per_image) == 1 and res.per_image["dice"][0] == 1.0
    assert any("1 images beside their masks" in n for n in res.notes)


def test_missing_prediction_is_an_error_listing_ids(isic):
    pred, gt = isic
    (pred / "ISIC_0000001.png").unlink()
    with pytest.raises(E.EvaluationError, match=r"1 ground truths have no prediction .*ISIC_0000001 .*--allow_missing"):
        run(pred, gt)


def test_allow_missing_scores_empty_mask(isic):
    pred, gt = isic
    (pred / "ISIC_0000001.png").unlink()
    res = run(pred, gt, allow_missing=True)
    row = res.per_image.set_index("id").loc["ISIC_0000001"]
    assert row["missing"] and row["dice"] == 0.0 and row["sensitivity"] == 0.0 and math.isnan(row["hd95"])
    assert res.summary["counts"]["missing_predictions"] == 1
    assert any("1 ground truths have no prediction, scored as empty masks" in n for n in res.notes)
    assert res.summary["metrics"]["hd95"]["n_nan"] == 1


def test_two_predictions_for_one_id(isic):
    pred, gt = isic
    save(pred / "ISIC_0000002_v2.png", square())
    dup = r"several predictions for one id .*ISIC_0000002: ISIC_0000002.png, ISIC_0000002_v2.png"
    with pytest.raises(E.EvaluationError, match=dup):
        run(pred, gt)


def test_two_ground_truths_for_one_id(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "a.png", square())
    save(gt / "a.jpg", square())
    save(pred / "a.png", square())
    with pytest.raises(E.EvaluationError, match="several ground truths for one id"):
        run(pred, gt)


def test_nothing_to_pair(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "a.png", square())
    save(pred / "b.png", square())
    with pytest.raises(E.EvaluationError, match=r"nothing to pair.*predictions: b.*ground truth: a"):
        run(pred, gt, allow_missing=True)


def test_empty_folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    with pytest.raises(E.EvaluationError, match=r"--out_pth: no ground-truth masks"):
        run(pred, gt)
    save(gt / "a.png", square())
    (pred / "notes.txt").write_text("x")
    with pytest.raises(E.EvaluationError, match=r"--inp_pth: no prediction masks"):
        run(pred, gt)
    with pytest.raises(E.EvaluationError, match=r"--inp_pth: folder not found"):
        run(tmp_path / "nope", gt)
    with pytest.raises(E.EvaluationError, match=r"--out_pth: folder not found"):
        run(pred, tmp_path / "nope")


def test_ground_truth_source_must_be_one(tmp_path):
    with pytest.raises(E.EvaluationError, match="either --out_pth"):
        E.evaluate(E.EvalOptions(inp_pth=tmp_path))
    with pytest.raises(E.EvaluationError, match="either --out_pth"):
        E.evaluate(E.EvalOptions(inp_pth=tmp_path, out_pth=tmp_path, data_name="KVASIR", data_dir=tmp_path))
    with pytest.raises(E.EvaluationError, match="--data_dir is required"):
        E.evaluate(E.EvalOptions(inp_pth=tmp_path, data_name="KVASIR"))
    with pytest.raises(E.EvaluationError, match="--data_dir needs --data_name"):
        E.evaluate(E.EvalOptions(inp_pth=tmp_path, out_pth=tmp_path, data_dir=tmp_path))


def test_unreadable_mask_names_the_file(isic):
    pred, gt = isic
    (pred / "ISIC_0000001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="ISIC_0000001.png"):
        run(pred, gt)


def photo(shape=(40, 50), seed=0) -> np.ndarray:
    """An RGB photo-like image: smooth colour gradients with noise (what an images folder holds)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = np.stack([90 + 80 * xx / shape[1], 60 + 60 * yy / shape[0], 70 + 40 * (xx + yy) / sum(shape)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def test_images_given_as_ground_truth_are_an_error_naming_the_file(tmp_path):
    gt, pred = tmp_path / "images", tmp_path / "pred"
    for k in ("a", "b"):
        save(gt / f"{k}.png", photo(seed=ord(k)))
        save(pred / f"{k}.png", square())
    with pytest.raises(E.EvaluationError, match=r"^ground truth .*a\.png is not a mask \(\d+ grey levels, \d+% of its "
                                                r"pixels mid-tone, as in a photo\): --out_pth must give the "
                                                r"ground-truth masks, not the images$"):
        run(pred, gt)
    # masks stay masks: JPEG noise, a red foreground, a small anti-aliased (resized) mask, a label map
    save(gt / "a.jpg", square(), quality=60)
    (gt / "a.png").unlink()
    red = np.zeros((40, 50, 3), np.uint8)
    red[square()] = (255, 0, 0)
    save(gt / "b.png", red)
    big = np.zeros((400, 500), np.uint8)
    big[100:300, 150:380] = 255
    save(gt / "c.png", np.asarray(Image.fromarray(big).resize((50, 40), Image.BILINEAR)))
    save(gt / "d.png", square().astype(np.uint8) * 2)
    for k in ("c", "d"):
        save(pred / f"{k}.png", square())
    assert len(run(pred, gt).per_image) == 4


def test_the_synthetic_sets_images_are_no_ground_truth(tmp_path):
    from guided_diffusion.data.datasets import make_synthetic
    data = make_synthetic(tmp_path / "data", num_images=4)
    pred = tmp_path / "pred"
    for path in (data / "masks").glob("*.png"):
        save(pred / path.name, np.asarray(Image.open(path)))
    assert run(pred, data / "masks").summary["metrics"]["dice"]["mean"] == 1.0
    with pytest.raises(E.EvaluationError, match="is not a mask"):
        run(pred, data / "images")


@pytest.mark.skipif(not (SHARED / "Kvasir-SEG").is_dir(), reason="shared Kvasir-SEG sample absent")
def test_real_photos_as_ground_truth_are_an_error(tmp_path):
    images = SHARED / "Kvasir-SEG" / "images"
    for f in sorted(images.glob("*.jpg"))[:2]:
        save(tmp_path / "pred" / f"{f.stem}.png", square())
    with pytest.raises(E.EvaluationError, match="is not a mask"):
        run(tmp_path / "pred", images, allow_missing=True)


def test_predictions_scored_against_themselves_are_an_error(isic, tmp_path):
    pred, gt = isic
    with pytest.raises(E.EvaluationError, match=r"^--inp_pth and --out_pth are the same folder"):
        run(pred, pred / ".")
    data = folder_dataset(tmp_path / "data")  # --inp_pth the data set's own mask folder
    with pytest.raises(E.EvaluationError, match=r"holds the ground truth itself \(.*s\d\.png is its own prediction\)"):
        run_data(data / "masks", "FOLDER", data, split="all")


# ---------------------------------------------------------------- binarisation and sizes


def test_jpeg_noisy_masks_score_as_their_clean_versions(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    g, p = square((64, 64), 7, 9, 29), square((64, 64), 13, 11, 29)  # edges off the 8x8 JPEG grid
    save(gt / "a.jpg", g, quality=75)
    save(pred / "a.jpg", np.stack([p.astype(np.uint8) * 255] * 3, -1), quality=75)  # 3-channel JPEG
    noisy = np.asarray(Image.open(gt / "a.jpg"))
    assert len(np.unique(noisy)) > 2  # JPEG did add noise
    res = run(pred, gt)
    from guided_diffusion.evaluation.metrics import segmentation_metrics
    assert res.per_image.iloc[0][["dice", "iou", "hd95"]].tolist() == pytest.approx(
        [segmentation_metrics(p, g)[k] for k in ("dice", "iou", "hd95")])


def test_probability_predictions_and_threshold(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "a.png", square((10, 10), 0, 0, 5))
    prob = np.zeros((10, 10), np.uint8)
    prob[0:5, 0:5] = 200  # > 128: foreground
    prob[5:10, 0:5] = 100  # foreground only below threshold 100
    prob[0:5, 5:10] = 128  # exactly 128 is background (strict >)
    save(pred / "a.png", prob)
    assert run(pred, gt).per_image["dice"][0] == 1.0
    assert run(pred, gt, threshold=99).per_image["dice"][0] == pytest.approx(2 * 25 / (75 + 25))
    assert run(pred, gt, threshold=127).per_image["dice"][0] == pytest.approx(2 * 25 / (50 + 25))


def test_prediction_of_another_size_is_resized_nearest(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    save(gt / "a.png", square((40, 40), 8, 8, 16))
    save(pred / "a.png", square((20, 20), 4, 4, 8))  # the same square at half size
    res = run(pred, gt)
    assert res.per_image["dice"][0] == 1.0 and bool(res.per_image["resized"][0])
    assert res.summary["counts"]["resized"] == 1
    assert any("1 images had a prediction or map of another size" in n for n in res.notes)
    with pytest.raises(E.EvaluationError, match=r"--strict: .*a.png is 20x20, ground truth is 40x40"):
        run(pred, gt, strict=True)


# ---------------------------------------------------------------- probability and uncertainty maps


def test_probability_and_uncertainty_maps(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    g = square((10, 10), 2, 2, 4)
    p = square((10, 10), 2, 3, 4)  # errors: column 2 and column 6
    for k in ("a", "b"):
        save(gt / f"{k}.png", g)
        save(pred / f"{k}.png", p)
    save(pred / "prob" / "a.png", np.where(p, 255, 0).astype(np.uint8))  # confident everywhere
    unc = np.zeros((10, 10), np.uint8)
    unc[:, 2] = unc[:, 6] = 204  # 0.8: flags both error columns plus 12 correct pixels
    save(pred / "uncertainty" / "a.png", unc)
    res = run(pred, gt)
    a = res.per_image.set_index("id").loc["a"]
    assert a["ece"] == pytest.approx(8 / 100)  # 8 wrong pixels at confidence 1
    assert a["unc_error_dice"] == pytest.approx(2 * 8 / (20 + 8))
    b = res.per_image.set_index("id").loc["b"]
    assert math.isnan(b["ece"]) and math.isnan(b["unc_error_dice"])
    assert res.summary["metrics"]["ece"]["n"] == 1
    assert any("probability maps found for 1 of 2 images" in n for n in res.notes)
    assert run(pred, gt, unc_threshold=0.9).per_image.set_index("id").loc["a", "unc_error_dice"] == 0.0


# ---------------------------------------------------------------- reports


def test_reports_csv_and_json(isic, tmp_path):
    pred, gt = isic
    save(gt / "ISIC_0000009_Segmentation.png", np.zeros((40, 50), bool))
    save(pred / "ISIC_0000009.png", np.zeros((40, 50), bool))
    res = run(pred, gt, csv=tmp_path / "out" / "m.csv", json=tmp_path / "out" / "s.json")
    table = pd.read_csv(tmp_path / "out" / "m.csv")
    assert list(table.columns[:12]) == ["id", "dice", "iou", "threshold_jaccard", "sensitivity", "specificity",
                                        "accuracy", "precision", "hd95", "assd", "ece", "unc_error_dice"]
    assert len(table) == 4 and table["hd95"].isna().sum() == 1
    summary = json.loads((tmp_path / "out" / "s.json").read_text())  # strict JSON: NaN became null
    assert summary["metrics"]["hd95"]["n_nan"] == 1 and summary["counts"]["undefined_surface_distance"] == 1
    assert summary["counts"]["empty_ground_truth"] == 1
    assert set(summary["metrics"]["dice"]) == {"mean", "std", "median", "ci95_low", "ci95_high", "n", "n_nan"}
    assert summary["metrics"]["dice"]["mean"] == pytest.approx((1 + 0.9 + 0.8 + 1) / 4)
    assert "hd95/assd undefined (an empty mask) for 1 images" in " ".join(res.notes)
    text = E.format_table(res.summary)
    assert "dice" in text and "hd95 (px)" in text and "95% CI" in text


def test_unwritable_report_is_a_clear_error(isic, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(E.EvaluationError, match="cannot write"):
        run(*isic, csv=blocker / "m.csv")


def test_progress_bar_for_large_folders(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for i in range(E.PROGRESS_MIN_IMAGES):
        save(gt / f"m{i}.png", square((8, 8), 1, 1, 3))
        save(pred / f"m{i}.png", square((8, 8), 1, 1, 3))
    E.evaluate(E.EvalOptions(inp_pth=pred, out_pth=gt, n_boot=10, progress=True))
    n = E.PROGRESS_MIN_IMAGES  # off a terminal: plain lines (guided_diffusion.progress), not a bar's redraws
    assert f"evaluating: {n}/{n} img (100%)" in capsys.readouterr().err


# ---------------------------------------------------------------- data sets


def folder_dataset(root: Path, n: int = 10) -> Path:
    """A FOLDER layout (images/, masks/) of n pairs with ids s0..s{n-1}."""
    for i in range(n):
        save(root / "images" / f"s{i}.png", np.full((24, 24, 3), 90, np.uint8))
        save(root / "masks" / f"s{i}.png", square((24, 24), 4, 4, 10 + i % 5))
    return root


def test_dataset_split_from_prediction_folder(tmp_path):
    data, pred = folder_dataset(tmp_path / "data"), tmp_path / "pred"
    split = {"train": [f"s{i}" for i in range(6)], "val": ["s6"], "test": ["s7", "s8", "s9"]}
    (pred / "uncertainty").mkdir(parents=True)
    (pred / "split.json").write_text(json.dumps(split))
    for i in range(10):
        save(pred / f"s{i}.png", square((24, 24), 4, 4, 10 + i % 5))
    res = run_data(pred, "FOLDER", data)
    assert res.per_image["id"].tolist() == ["s7", "s8", "s9"] and (res.per_image["dice"] == 1.0).all()
    assert res.summary["counts"]["ignored_predictions"] == 7
    assert any("split from" in n for n in res.notes)
    res = run_data(pred, "FOLDER", data, split="all")
    assert len(res.per_image) == 10


def test_dataset_default_split_warns_and_split_file_wins(tmp_path):
    data, pred = folder_dataset(tmp_path / "data"), tmp_path / "pred"
    for i in range(10):
        save(pred / f"s{i}.png", square((24, 24), 4, 4, 10 + i % 5))
    res = run_data(pred, "KVASIR", data)
    assert any(n.startswith("warning: no --split_file and no split.json") for n in res.notes)
    assert len(res.per_image) == 2  # the seeded default: 20% of 10
    res = run_data(pred, "KVASIR", data, split="all")
    assert len(res.per_image) == 10 and not res.notes  # no split, so no split warning
    sf = tmp_path / "my_split.json"
    sf.write_text(json.dumps({"train": ["s0"], "val": [], "test": ["s1", "s2", "s3", "s4"]}))
    res = run_data(pred, "KVASIR", data, split_file=sf)
    assert res.per_image["id"].tolist() == ["s1", "s2", "s3", "s4"]
    assert not any("warning" in n for n in res.notes)


def test_dataset_errors(tmp_path):
    pred = tmp_path / "pred"
    save(pred / "s0.png", square())
    with pytest.raises(E.EvaluationError, match="--data_dir: folder not found"):
        E.evaluate(E.EvalOptions(inp_pth=pred, data_name="FOLDER", data_dir=tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(E.EvaluationError, match="no generated synthetic set"):  # evaluation never generates data
        E.evaluate(E.EvalOptions(inp_pth=pred, data_name="SYNTHETIC", data_dir=tmp_path / "empty"))
    assert not any((tmp_path / "empty").iterdir())
    with pytest.raises(DataError):
        E.evaluate(E.EvalOptions(inp_pth=pred, data_name="FOLDER", data_dir=tmp_path / "empty"))


# ---------------------------------------------------------------- the script


def test_script_flags_in_process(isic, tmp_path, capsys, env_script):
    pred, gt = isic
    env_script.main(["--inp_pth", str(pred), "--out_pth", str(gt), "--n_boot", "30", "--strict", "True",
                        "--json", str(tmp_path / "s.json"), "--csv", str(tmp_path / "m.csv")])
    out = capsys.readouterr().out
    assert "dice" in out and "0.9000" in out and "wrote" in out
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["n_boot"] == 30


@pytest.mark.parametrize("argv,message", [
    (["--threshold", "300"], "--threshold"),
    (["--unc_threshold", "1.0"], "--unc_threshold"),
    (["--n_boot", "0"], "--n_boot"),
    (["--data_name", "MNIST"], "--data_name"),
    (["--strict", "maybe"], "--strict"),
])
def test_script_rejects_bad_flag_values(isic, argv, message, capsys, env_script):
    pred, gt = isic
    with pytest.raises(SystemExit) as exc:
        env_script.main(["--inp_pth", str(pred), "--out_pth", str(gt), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_isic_end_to_end_reads_only(isic, cli):
    pred, gt = isic
    save(pred / "prob" / "ISIC_0000000.png", np.where(square(), 255, 0).astype(np.uint8))
    before_pred, before_gt = folder_hash(pred), folder_hash(gt)
    r = cli("--inp_pth", str(pred), "--out_pth", str(gt))
    assert r.returncode == 0, r.stderr
    assert "dice" in r.stdout and "ece" in r.stdout
    assert folder_hash(gt) == before_gt
    after = folder_hash(pred)
    assert set(after) - set(before_pred) == {E.DEFAULT_CSV, E.DEFAULT_JSON}  # the only files written
    assert {k: after[k] for k in before_pred} == before_pred
    table = pd.read_csv(pred / E.DEFAULT_CSV)
    assert table["id"].tolist() == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]


@pytest.mark.slow
def test_cli_folder_dataset_end_to_end(tmp_path, cli):
    data, pred = folder_dataset(tmp_path / "data"), tmp_path / "pred"
    (pred).mkdir()
    split = {"train": [f"s{i}" for i in range(8)], "val": [], "test": ["s8", "s9"]}
    (pred / "split.json").write_text(json.dumps(split))
    for i in (8, 9):
        save(pred / f"s{i}.png", square((24, 24), 4, 4, 10 + i % 5))
    before = folder_hash(data)
    r = cli("--inp_pth", str(pred), "--data_name", "FOLDER", "--data_dir", str(data), "--split", "test",
            "--csv", str(tmp_path / "m.csv"), "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    assert folder_hash(data) == before
    assert json.loads((tmp_path / "s.json").read_text())["metrics"]["dice"]["mean"] == 1.0


@pytest.mark.slow
def test_cli_error_is_one_line_exit_2(isic, cli):
    pred, gt = isic
    (pred / "ISIC_0000002.png").unlink()
    r = cli("--inp_pth", str(pred), "--out_pth", str(gt))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "ISIC_0000002" in r.stderr and not (pred / E.DEFAULT_CSV).exists()


@pytest.mark.parametrize("case", ["no_folder", "strict", "unreadable", "photo", "same"])
def test_script_errors_are_one_line_exit_2(isic, case, capsys, env_script):
    from guided_diffusion.cli import run_cli
    pred, gt = isic
    args = ["--inp_pth", str(pred), "--out_pth", str(gt)]
    if case == "no_folder":
        args[3] = str(gt.parent / "nope")
    elif case == "strict":
        save(pred / "ISIC_0000002.png", square((20, 25)))
        args.append("--strict")
    elif case == "photo":
        save(gt / "ISIC_0000001_Segmentation.png", photo((40, 50)))
    elif case == "same":
        args[3] = str(pred / ".." / pred.name)
    else:
        (gt / "ISIC_0000001_Segmentation.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: env_script.main(args))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert {"no_folder": "--out_pth", "strict": "--strict", "unreadable": "ISIC_0000001_Segmentation.png",
            "photo": "ISIC_0000001_Segmentation.png is not a mask", "same": "are the same folder"}[case] in err
    assert not (pred / E.DEFAULT_CSV).exists()


# ---------------------------------------------------------------- real data (skipped when absent)


@pytest.mark.skipif(not (SHARED / "ISIC-2017-256").is_dir(), reason="shared ISIC sample absent")
def test_real_isic_ground_truth_against_itself(tmp_path):
    data = SHARED / "ISIC-2017-256"
    masks = sorted((data / "ISIC-2017_Training_Part1_GroundTruth").glob("ISIC_*_segmentation.png"))[:15]
    for m in masks:  # predictions named as the sampler names them: ISIC_<id>.png
        Image.open(m).convert("L").save(tmp_path / m.name.replace("_segmentation", ""))
    res = E.evaluate(E.EvalOptions(inp_pth=tmp_path, data_name="ISIC", data_dir=data, split="all",
                                   allow_missing=True, n_boot=20, progress=False))
    done = res.per_image[~res.per_image["missing"]]
    assert len(done) == len(masks) and (done["dice"] == 1.0).all() and (done["hd95"] == 0.0).all()


@pytest.mark.skipif(not (SHARED / "Kvasir-SEG").is_dir(), reason="shared Kvasir-SEG sample absent")
def test_real_kvasir_jpeg_masks(tmp_path):
    gt = SHARED / "Kvasir-SEG" / "masks"
    files = sorted(gt.glob("*.jpg"))[:4]
    for f in files:  # clean 0/255 predictions from the noisy 3-channel JPEG masks
        arr = np.asarray(Image.open(f).convert("L")) > 128
        save(tmp_path / "pred" / f"{f.stem}.png", arr)
    res = run(tmp_path / "pred", gt, allow_missing=True)
    done = res.per_image[~res.per_image["missing"]]
    assert len(done) == 4 and (done["dice"] == 1.0).all() and (done["assd"] == 0.0).all()
