"""Tests for guided_diffusion.data.datasets: layouts, bad input, splits, loading, transforms, preload, real data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from image_files import blob, error_text, make_folder, write_image, write_mask
from PIL import Image

from guided_diffusion.data import datasets as D
from guided_diffusion.data.datasets import DataError, Pair

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
KVASIR_REAL = SHARED / "Kvasir-SEG"
ISIC_REAL = SHARED / "ISIC-2017-256"


# ------------------------------------------------------------------------------------------ fixtures
def make_isic2016(root: Path, train=("ISIC_0000000", "ISIC_0000001", "ISIC_0000002"),
                  test=("ISIC_0000010", "ISIC_0000011"), csvs: bool = True) -> Path:
    """ISIC 2016 Part3B layout: masks beside images, header-less ground-truth CSVs."""
    for part, ids in (("Training", train), ("Test", test)):
        folder = root / f"ISBI2016_ISIC_Part3B_{part}_Data"
        for i, sample_id in enumerate(ids):
            write_image(folder / f"{sample_id}.jpg", seed=i)
            write_mask(folder / f"{sample_id}_Segmentation.png", blob())
        if csvs:
            rows = "".join(f"{i},{'benign' if k % 2 else 'malignant'}\n" for k, i in enumerate(ids))
            (root / f"ISBI2016_ISIC_Part3B_{part}_GroundTruth.csv").write_text(rows)
    return root


def make_isic2017(root: Path, parts=("Training", "Validation", "Test_v2"), per_part: int = 3) -> Path:
    """ISIC 2017 Task 1 layout with the clutter the real folders ship (superpixels, metadata, Part 2)."""
    for p, part in enumerate(parts):
        data = root / f"ISIC-2017_{part}_Data"
        truth = root / f"ISIC-2017_{part}_Part1_GroundTruth"
        for k in range(per_part):
            sample_id = f"ISIC_{p * 100 + k:07d}"
            write_image(data / f"{sample_id}.jpg", seed=k)
            write_image(data / f"{sample_id}_superpixels.png", seed=k)
            write_mask(truth / f"{sample_id}_segmentation.png", blob())
        (data / f"ISIC-2017_{part}_Data_metadata.csv").write_text("image_id,age\n")
        (truth / "LICENSE.txt").write_text("CC\n")
        (root / f"ISIC-2017_{part}_Part2_GroundTruth").mkdir()
    return root


# ------------------------------------------------------------------------------------------ ISIC
def test_isic2016_csv_keeps_first_row_and_official_split(tmp_path):
    root = make_isic2016(tmp_path)
    pairs, official = D.find_pairs("ISIC", root)
    ids = [p.id for p in pairs]
    assert "ISIC_0000000" in ids and "ISIC_0000010" in ids  # first CSV rows are data, not headers
    assert ids == sorted(ids) and len(ids) == 5
    assert official == {"train": ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"], "val": [],
                        "test": ["ISIC_0000010", "ISIC_0000011"]}
    first = pairs[0]
    assert first.image.name == "ISIC_0000000.jpg" and first.mask.name == "ISIC_0000000_Segmentation.png"
    split = D.resolve_split("isic", root)
    assert split["source"] == "official" and split["data_name"] == "ISIC" and split["val"] == []


def test_isic2016_csv_lists_only_its_ids(tmp_path):
    root = make_isic2016(tmp_path)
    write_image(root / "ISBI2016_ISIC_Part3B_Training_Data" / "ISIC_0000099.jpg")  # not in the CSV
    pairs, _ = D.find_pairs("ISIC", root)
    assert "ISIC_0000099" not in {p.id for p in pairs}


def test_isic2016_without_csv_pairs_folders(tmp_path):
    root = make_isic2016(tmp_path, csvs=False)
    pairs, official = D.find_pairs("ISIC", root)
    assert len(pairs) == 5 and official["test"] == ["ISIC_0000010", "ISIC_0000011"]


def test_isic2016_csv_row_with_missing_image(tmp_path):
    root = make_isic2016(tmp_path)
    (root / "ISBI2016_ISIC_Part3B_Training_Data" / "ISIC_0000001.jpg").unlink()
    with pytest.raises(DataError) as exc:
        D.find_pairs("ISIC", root)
    assert "ISIC_0000001.jpg" in error_text(exc) and "ISBI2016_ISIC_Part3B_Training_GroundTruth.csv" in str(exc.value)


def test_isic2016_csv_row_with_missing_mask(tmp_path):
    root = make_isic2016(tmp_path)
    (root / "ISBI2016_ISIC_Part3B_Test_Data" / "ISIC_0000011_Segmentation.png").unlink()
    with pytest.raises(DataError) as exc:
        D.find_pairs("ISIC", root)
    assert "ISIC_0000011_Segmentation.png" in error_text(exc)


def test_isic2017_three_parts_official_split_ignores_clutter(tmp_path):
    root = make_isic2017(tmp_path)
    pairs, official = D.find_pairs("ISIC", root)
    assert len(pairs) == 9
    assert not any("superpixels" in p.image.name for p in pairs)
    assert official == {"train": [f"ISIC_{k:07d}" for k in range(3)],
                        "val": [f"ISIC_{100 + k:07d}" for k in range(3)],
                        "test": [f"ISIC_{200 + k:07d}" for k in range(3)]}
    assert all(p.mask.parent.name == "ISIC-2017_Test_v2_Part1_GroundTruth" for p in pairs if p.id in official["test"])
    assert [p.id for p in D.list_pairs("ISIC", root, "val")] == official["val"]


def test_isic2017_training_only_has_no_official_split(tmp_path):
    root = make_isic2017(tmp_path, parts=("Training",), per_part=10)
    pairs, official = D.find_pairs("ISIC", root)
    assert len(pairs) == 10 and official is None
    split = D.resolve_split("ISIC", root, seed=3)
    assert split["source"] == "seeded" and split["seed"] == 3
    assert all(split[k] for k in D.SPLITS)


def test_isic2018_layout(tmp_path):
    data, truth = tmp_path / "ISIC2018_Task1-2_Training_Input", tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    for k in range(3):
        write_image(data / f"ISIC_{k:07d}.jpg")
        write_mask(truth / f"ISIC_{k:07d}_segmentation.png", blob())
    attributes = tmp_path / "ISIC2018_Task2_Training_GroundTruth_v3"
    write_mask(attributes / "ISIC_0000000_attribute_globules.png", blob())
    pairs, official = D.find_pairs("ISIC", tmp_path)
    assert [p.id for p in pairs] == [f"ISIC_{k:07d}" for k in range(3)] and official is None


def test_isic_image_without_ground_truth(tmp_path):
    root = make_isic2017(tmp_path, parts=("Training",))
    (root / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000001_segmentation.png").unlink()
    with pytest.raises(DataError) as exc:
        D.find_pairs("ISIC", root)
    assert "ISIC_0000001.jpg" in error_text(exc) and "1 image(s)" in str(exc.value)


def test_isic_no_image_folders(tmp_path):
    make_folder(tmp_path, ["a"])
    with pytest.raises(DataError) as exc:
        D.find_pairs("ISIC", tmp_path)
    assert str(tmp_path) in error_text(exc) and "FOLDER" in str(exc.value)


# ------------------------------------------------------------------------------------ Kvasir, folder
def test_kvasir_noisy_jpeg_masks_are_binary(tmp_path):
    mask = np.zeros((40, 48), dtype=bool)
    mask[8:30, 10:40] = True
    for k in range(3):
        write_image(tmp_path / "images" / f"cju{k}.jpg", size=(48, 40), seed=k)
        write_mask(tmp_path / "masks" / f"cju{k}.jpg", mask, rgb=True)
    raw = np.asarray(Image.open(tmp_path / "masks" / "cju0.jpg"))
    assert raw.ndim == 3 and len(np.unique(raw)) > 2  # the fixture really is noisy
    pairs, official = D.find_pairs("KVASIR", tmp_path)
    assert [p.id for p in pairs] == ["cju0", "cju1", "cju2"] and official is None
    loaded = D.load_mask(pairs[0].mask)
    assert loaded.dtype == bool and loaded.shape == (40, 48)
    assert (loaded != mask).mean() < 0.01


def test_folder_mask_suffixes_and_extensions(tmp_path):
    stems = ["plain", "a", "b", "c", "d"]
    for i, stem in enumerate(stems):
        write_image(tmp_path / "images" / f"{stem}{['.png', '.jpg', '.jpeg', '.bmp', '.tif'][i]}", seed=i)
    for name in ["plain.png", "a_mask.png", "b_segmentation.png", "c_Segmentation.tiff", "d_Mask.bmp"]:
        write_mask(tmp_path / "masks" / name, blob())
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    (tmp_path / "images" / "._plain.png").write_bytes(b"AppleDouble junk")
    pairs, official = D.find_pairs("FOLDER", tmp_path)
    assert [p.id for p in pairs] == sorted(stems) and official is None
    assert {p.id: p.mask.name for p in pairs}["c"] == "c_Segmentation.tiff"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1"])
def test_load_image_modes_give_rgb(tmp_path, mode):
    path = write_image(tmp_path / f"x_{mode}.png", size=(9, 7), mode=mode)
    img = D.load_image(path)
    assert img.mode == "RGB" and img.size == (9, 7)


def test_load_image_16bit_grayscale(tmp_path):
    arr = (np.arange(70, dtype=np.uint16).reshape(7, 10) * 900)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    img = np.asarray(D.load_image(path))
    assert img.shape == (7, 10, 3) and img.max() > 200 and img.min() == 0


def test_load_mask_threshold_rule_and_label_masks(tmp_path):
    arr = np.array([[0, 128, 129, 255]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "m.png")
    assert D.load_mask(tmp_path / "m.png").tolist() == [[False, False, True, True]]
    assert D.load_mask(tmp_path / "m.png", threshold=0).tolist() == [[False, True, True, True]]
    Image.fromarray(np.array([[0, 1, 1, 0]], dtype=np.uint8)).save(tmp_path / "labels.png")
    assert D.load_mask(tmp_path / "labels.png").tolist() == [[False, True, True, False]]


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_data_name_names_flag():
    with pytest.raises(DataError) as exc:
        D.find_pairs("LIDC", "/nowhere")  # (BRATS is a layout now: data/volumes.py)
    assert "--data_name" in error_text(exc) and all(n in str(exc.value) for n in D.DATA_NAMES)


@pytest.mark.parametrize("name", ["ISIC", "KVASIR", "FOLDER"])
def test_missing_data_dir(tmp_path, name):
    with pytest.raises(DataError) as exc:
        D.find_pairs(name, tmp_path / "absent")
    assert str(tmp_path / "absent") in error_text(exc)
    with pytest.raises(DataError):
        D.ensure_dataset(name, tmp_path / "absent")


@pytest.mark.parametrize("missing", ["images", "masks"])
def test_missing_subfolder(tmp_path, missing):
    (tmp_path / ({"images", "masks"} - {missing}).pop()).mkdir()
    with pytest.raises(DataError) as exc:
        D.find_pairs("FOLDER", tmp_path)
    assert str(tmp_path / missing) in error_text(exc)


def test_images_without_masks_named_and_counted(tmp_path):
    make_folder(tmp_path, [f"img{k}" for k in range(6)], mask_stems=["img0"])
    with pytest.raises(DataError) as exc:
        D.find_pairs("FOLDER", tmp_path)
    text = error_text(exc)
    assert "5 image(s)" in text and "img1.png" in text and "and 2 more" in text and str(tmp_path / "masks") in text


def test_mask_without_image(tmp_path):
    make_folder(tmp_path, ["a"], mask_stems=["a", "ghost"])
    with pytest.raises(DataError) as exc:
        D.find_pairs("KVASIR", tmp_path)
    assert "ghost.png" in error_text(exc) and "1 mask(s)" in str(exc.value)


def test_two_masks_for_one_image(tmp_path):
    make_folder(tmp_path, ["a"], mask_stems=["a", "a_mask"])
    with pytest.raises(DataError) as exc:
        D.find_pairs("FOLDER", tmp_path)
    assert "a_mask.png" in error_text(exc)


def test_empty_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError) as exc:
        D.find_pairs("FOLDER", tmp_path)
    assert str(tmp_path) in error_text(exc)


def test_corrupt_files_raise_when_loaded(tmp_path):
    make_folder(tmp_path, ["good", "bad"])
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "masks" / "bad.png").write_bytes(b"not a png")
    pairs, _ = D.find_pairs("FOLDER", tmp_path)  # listing does not decode
    bad_image, bad_mask = tmp_path / "images" / "bad.png", tmp_path / "masks" / "bad.png"
    for loader, path in ((D.load_image, bad_image), (D.load_mask, bad_mask)):
        with pytest.raises(DataError) as exc:
            loader(path)
        assert str(path) in error_text(exc)
    with pytest.raises(DataError):
        D.SegmentationDataset(pairs, 8)[0]  # "bad" sorts first


def test_truncated_jpeg(tmp_path):
    path = write_image(tmp_path / "t.jpg", size=(64, 64))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as exc:
        D.load_image(path)
    assert str(path) in error_text(exc)


def test_size_mismatch_names_both_paths(tmp_path):
    image = write_image(tmp_path / "images" / "a.png", size=(12, 10))
    mask = write_mask(tmp_path / "masks" / "a.png", np.zeros((5, 6), dtype=bool))
    with pytest.raises(DataError) as exc:
        D.SegmentationDataset([Pair("a", image, mask)], 8)[0]
    assert str(image) in error_text(exc) and str(mask) in str(exc.value)


# ------------------------------------------------------------------------------------------ splits
def test_make_split_deterministic_disjoint_covering():
    ids = [f"id{k:03d}" for k in range(50)]
    split = D.make_split(ids, seed=1)
    assert split == D.make_split(list(reversed(ids)), seed=1)  # input order does not matter
    assert split != D.make_split(ids, seed=2)
    parts = [set(split[k]) for k in D.SPLITS]
    assert sum(map(len, parts)) == 50 and set().union(*parts) == set(ids)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (35, 5, 10)
    for key in D.SPLITS:
        assert split[key] == sorted(split[key])


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_make_split_small_sets_nonempty(n):
    split = D.make_split([str(k) for k in range(n)])
    assert all(split[k] for k in D.SPLITS) and sum(len(split[k]) for k in D.SPLITS) == n


@pytest.mark.parametrize("n,k", [(100, 5), (23, 4), (7, 3)])
def test_fold_split_tests_every_id_once(n, k):
    ids = [f"id{j:03d}" for j in range(n)]
    splits = [D.make_fold_split(ids, k, i, seed=3) for i in range(k)]
    tests = [set(s["test"]) for s in splits]
    assert sum(map(len, tests)) == n and set().union(*tests) == set(ids)  # disjoint, covering
    assert max(map(len, tests)) - min(map(len, tests)) <= 1
    for s in splits:
        parts = [set(s[key]) for key in D.SPLITS]
        assert sum(map(len, parts)) == n and set().union(*parts) == set(ids) and all(parts[:1])
        assert len(s["val"]) == round(0.1 * (n - len(s["test"])))
        assert all(s[key] == sorted(s[key]) for key in D.SPLITS)
    # the same seed in any input order gives the same folds, another seed other folds
    assert D.make_fold_split(list(reversed(ids)), k, 1, seed=3) == splits[1]
    assert D.make_fold_split(ids, k, 1, seed=4) != splits[1]


def test_fold_split_is_the_seeded_permutation_cut_in_k():
    ids = [str(j) for j in range(10)]  # sorted as strings: "0" < "1" < ... < "9"
    order = [ids[i] for i in np.random.default_rng(0).permutation(10)]
    s = D.make_fold_split(ids, 4, 1, seed=0)  # bounds 0, 2 (2.5 rounds to 2), 5, 8 (7.5 rounds to 8), 10
    assert s["test"] == sorted(order[2:5])
    rest = order[:2] + order[5:]
    assert s["val"] == sorted(rest[:1]) and s["train"] == sorted(rest[1:])


def test_fold_split_bad_flags():
    ids = [str(j) for j in range(10)]
    for folds, fold in ((1, 0), (3, 3), (3, -1)):
        with pytest.raises(ValueError, match="--fold"):
            D.make_fold_split(ids, folds, fold)
    with pytest.raises(ValueError, match="--folds 10 needs more than 10 ids"):
        D.make_fold_split(ids, 10, 0)
    from guided_diffusion.config import DataConfig
    with pytest.raises(ValueError, match="--folds must be 0"):
        DataConfig(folds=1)
    with pytest.raises(ValueError, match=r"--fold must be in \[0, 2\] for --folds 3, got 3"):
        DataConfig(folds=3, fold=3)
    with pytest.raises(ValueError, match=r"--fold must be in \[0, 0\] for --folds 0, got 1"):
        DataConfig(fold=1)


def test_resolve_split_folds(tmp_path):
    root = make_folder(tmp_path / "f", [f"s{j:02d}" for j in range(12)])
    split = D.resolve_split("FOLDER", root, seed=2, folds=3, fold=2)
    ids = [p.id for p in D.list_pairs("FOLDER", root, "all")]
    assert {k: split[k] for k in D.SPLITS} == D.make_fold_split(ids, 3, 2, seed=2)
    assert (split["source"], split["folds"], split["fold"], split["seed"]) == ("fold", 3, 2, 2)
    assert {k: split[k] for k in D.SPLITS} != {k: D.resolve_split("FOLDER", root, seed=2)[k] for k in D.SPLITS}
    official = make_isic2017(tmp_path / "isic")
    with pytest.raises(DataError, match="--folds 3: .* has an official ISIC split"):
        D.resolve_split("ISIC", official, folds=3, fold=0)


def test_split_save_load_roundtrip(tmp_path):
    split = {**D.make_split([str(k) for k in range(10)], seed=4), "source": "seeded", "seed": 4, "data_name": "FOLDER"}
    path = tmp_path / "run" / "split.json"
    D.save_split(split, path)
    assert D.load_split(path) == split
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp file left


def test_load_split_missing_or_corrupt(tmp_path):
    for path, content in ((tmp_path / "absent.json", None), (tmp_path / "bad.json", "{not json"),
                          (tmp_path / "shape.json", '{"train": []}'),
                          (tmp_path / "leak.json", '{"train": ["a"], "val": [], "test": ["a"]}')):
        if content is not None:
            path.write_text(content)
        with pytest.raises(DataError) as exc:
            D.load_split(path)
        assert str(path) in error_text(exc)


def test_resolve_split_from_file(tmp_path):
    root = make_folder(tmp_path / "data", [f"s{k}" for k in range(6)])
    path = tmp_path / "split.json"
    D.save_split({"train": ["s0", "s1", "s2"], "val": ["s3"], "test": ["s4", "s5"], "seed": 7}, path)
    split = D.resolve_split("FOLDER", root, split_file=path)
    assert split["source"] == "file" and split["test"] == ["s4", "s5"] and split["seed"] == 7
    assert [p.id for p in D.list_pairs("FOLDER", root, "test", split_file=path)] == ["s4", "s5"]
    D.save_split({"train": ["s0"], "val": [], "test": ["nope"]}, path)
    with pytest.raises(DataError) as exc:
        D.resolve_split("FOLDER", root, split_file=path)
    assert str(path) in error_text(exc) and "nope" in str(exc.value)


def test_list_pairs_splits(tmp_path):
    root = make_folder(tmp_path, [f"s{k:02d}" for k in range(20)])
    parts = {k: D.list_pairs("FOLDER", root, k, seed=5) for k in D.SPLITS}
    assert sum(len(v) for v in parts.values()) == 20 == len(D.list_pairs("FOLDER", root, "all"))
    assert [p.id for p in parts["test"]] == D.resolve_split("FOLDER", root, seed=5)["test"]
    with pytest.raises(DataError) as exc:
        D.list_pairs("FOLDER", root, "holdout")
    assert "holdout" in error_text(exc)


def test_list_pairs_empty_split(tmp_path):
    root = make_isic2016(tmp_path)
    with pytest.raises(DataError) as exc:
        D.list_pairs("ISIC", root, "val")
    assert "val" in error_text(exc)


# ------------------------------------------------------------------------------------------ dataset
def test_dataset_item_shapes_types_ranges(tmp_path):
    root = tmp_path
    write_image(root / "images" / "wide.jpg", size=(30, 17))
    write_mask(root / "masks" / "wide.png", blob((30, 17)))
    write_image(root / "images" / "gray.png", size=(20, 20), mode="L")
    write_mask(root / "masks" / "gray.png", blob((20, 20)))
    pairs, _ = D.find_pairs("FOLDER", root)
    for augment in (False, True):
        ds = D.SegmentationDataset(pairs, 16, augment=augment)
        assert len(ds) == 2
        for k in range(2):
            item = ds[k]
            assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
            assert item["mask"].shape == (1, 16, 16) and item["mask"].dtype == torch.float32
            assert 0 <= item["image"].min() and item["image"].max() <= 1
            assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
            assert item["orig_size"].dtype == torch.long
        assert ds[0]["id"] == "gray" and ds[0]["orig_size"].tolist() == [20, 20]
        assert ds[1]["orig_size"].tolist() == [17, 30]


def test_mask_resize_is_nearest_not_dilated(tmp_path):
    mask = np.zeros((64, 64), dtype=bool)
    mask[:, 21] = True  # 1-pixel-wide line
    mask[40:50, 40:50] = True
    image = write_image(tmp_path / "img.png", size=(64, 64))
    path = write_mask(tmp_path / "m.png", mask)
    small = D.SegmentationDataset([Pair("m", image, path)], 32)[0]["mask"][0]
    line_cols = small[:, :18].sum(0)
    assert (line_cols > 0).sum() <= 1  # bilinear-then-threshold would smear the line over 2+ columns
    assert small[20:25, 20:25].sum() == 25 and small.sum() <= mask.sum() / 4 + 32
    same = D.SegmentationDataset([Pair("m", image, path)], 64)[0]["mask"][0]
    assert torch.equal(same.bool(), torch.from_numpy(mask))
    big = D.SegmentationDataset([Pair("m", image, path)], 128)[0]["mask"][0]
    assert torch.equal(big.bool(), torch.from_numpy(mask.repeat(2, 0).repeat(2, 1)))


def test_augmentation_shares_geometry_and_keeps_mask_binary(tmp_path):
    mask = np.zeros((48, 64), dtype=bool)
    mask[5:30, 8:40] = True
    mask[35:45, 50:60] = True
    write_mask(tmp_path / "images" / "a.png", mask)  # grayscale image equal to the mask
    write_mask(tmp_path / "masks" / "a.png", mask)
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 32, augment=True)
    torch.manual_seed(0)
    flips = set()
    for _ in range(12):
        item = ds[0]
        m = item["mask"][0]
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        agree = ((item["image"].mean(0) > 0.5) == m.bool()).float().mean()
        assert agree > 0.95
        flips.add(tuple(m.flatten()[:64].tolist()))
    assert len(flips) > 3  # it really is random


# ------------------------------------------------------------------------------------------ real data
def _check_real(pairs: list[Pair]) -> None:
    """Every real pair loads, its mask is binary and matches the image size."""
    for pair in pairs:
        image, mask = D.load_image(pair.image), D.load_mask(pair.mask)
        assert mask.dtype == bool and mask.shape == (image.height, image.width)
        assert 0 < mask.mean() < 1


@pytest.mark.skipif(not KVASIR_REAL.is_dir(), reason="../shared/data/Kvasir-SEG absent")
def test_real_kvasir():
    pairs, official = D.find_pairs("KVASIR", KVASIR_REAL)
    assert len(pairs) == 100 and official is None
    _check_real(pairs[::10])
    split = D.resolve_split("KVASIR", KVASIR_REAL)
    assert split["source"] == "seeded" and (len(split["train"]), len(split["val"]), len(split["test"])) == (70, 10, 20)
    item = D.SegmentationDataset(pairs[:1], 64)[0]
    assert item["orig_size"].tolist() == list(D.load_mask(pairs[0].mask).shape)


@pytest.mark.skipif(not ISIC_REAL.is_dir(), reason="../shared/data/ISIC-2017-256 absent")
def test_real_isic2017():
    pairs, official = D.find_pairs("ISIC", ISIC_REAL)
    assert len(pairs) == 100 and official is None
    assert all(p.id.startswith("ISIC_") and len(p.id) == 12 for p in pairs)
    _check_real(pairs[::10])
    item = D.SegmentationDataset(pairs[:1], 64, augment=True)[0]
    assert item["orig_size"].tolist() == [256, 256] and set(item["mask"].unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------- preload
def test_preload_shape_keeps_twice_the_image_size_and_never_enlarges():
    assert D.preload_shape(2848, 4288, 256) == (512, round(4288 * 512 / 2848))
    assert D.preload_shape(4288, 2848, 256) == (round(4288 * 512 / 2848), 512)  # portrait: short side is W
    assert D.preload_shape(767, 1022, 256) == (512, round(1022 * 512 / 767))
    assert D.preload_shape(300, 400, 256) == (300, 400)  # smaller than 2 x 256 on its short side: as it is
    assert D.preload_shape(5, 5000, 2) == (4, 4000)


def _items(ds, seeds):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(ds[s % len(ds)])
    return out


def test_preloaded_items_equal_decoded_ones_when_nothing_is_reduced(tmp_path):
    root = make_folder(tmp_path, ["a", "b", "c"], ext=".jpg")  # 12x10 images: below 2 x 16 on every side
    pairs, _ = D.find_pairs("FOLDER", root)
    for augment in (False, True):
        plain = D.SegmentationDataset(pairs, 16, augment=augment)
        pre = D.SegmentationDataset(pairs, 16, augment=augment)
        held = pre.preload(threads=2, progress=False)
        assert held == 3 * 4 * 12 * 10
        kept = [(img.clone(), mask.clone()) for img, mask, _ in pre._cache]
        for x, y in zip(_items(plain, range(9)), _items(pre, range(9))):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
            assert x["id"] == y["id"] and torch.equal(x["orig_size"], y["orig_size"])
        # reading items (augmented too) never writes into the shared copies
        assert all(torch.equal(a, img) and torch.equal(b, mask) for (a, b), (img, mask, _) in zip(kept, pre._cache))


def test_preload_reduces_large_jpegs_and_keeps_what_the_model_sees(tmp_path):
    height, width = 600, 800
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - 280) ** 2 / 200 ** 2 + (xx - 420) ** 2 / 260 ** 2 < 1
    smooth = np.stack([xx * 255 // width, yy * 255 // height, np.where(mask, 200, 60)], -1).astype(np.uint8)
    (tmp_path / "images").mkdir()
    Image.fromarray(smooth).save(tmp_path / "images" / "big.jpg", quality=95)
    write_mask(tmp_path / "masks" / "big.png", mask)
    pairs, _ = D.find_pairs("FOLDER", tmp_path)
    pre = D.SegmentationDataset(pairs, 32)
    assert pre.preload_bytes() == 4 * 64 * round(800 * 64 / 600)
    pre.preload(threads=1, progress=False)
    img, m, orig = pre._cache[0]
    assert img.shape == (3, 64, 85) and m.shape == (1, 64, 85) and orig == (600, 800)
    x, y = D.SegmentationDataset(pairs, 32)[0], pre[0]
    assert y["orig_size"].tolist() == [600, 800]
    assert (x["image"] - y["image"]).abs().mean() < 0.01  # two antialiased reductions ~ one
    inter = (x["mask"] * y["mask"]).sum()
    assert 2 * inter / (x["mask"].sum() + y["mask"].sum()) > 0.97


def test_preload_reports_bad_files_before_training(tmp_path):
    make_folder(tmp_path, ["a", "b"])
    write_mask(tmp_path / "masks" / "b.png", np.zeros((4, 4), dtype=bool))  # size differs from its image
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8)
    with pytest.raises(DataError, match=r"images[/\\]b\.png is 12x10 but mask .*b\.png is 4x4"):
        ds.preload(progress=False)
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"images[/\\]a\.png: cannot read the image \(cannot identify image file\)"):
        D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0][:1], 8).preload(progress=False)


def test_maybe_preload_modes(tmp_path, monkeypatch):
    make_folder(tmp_path, ["a", "b"])
    pairs, _ = D.find_pairs("FOLDER", tmp_path)
    said = []
    ds = D.SegmentationDataset(pairs, 8)
    assert D.maybe_preload(ds, "auto", log=said.append, progress=False) and ds._cache is not None
    assert "preloaded 2 training pairs" in said[-1]
    monkeypatch.setattr(D, "PRELOAD_AUTO_GIB", 1e-9)
    ds = D.SegmentationDataset(pairs, 8)
    assert not D.maybe_preload(ds, "auto", log=said.append, progress=False) and ds._cache is None
    assert "not preloading" in said[-1] and "--preload True" in said[-1]
    assert D.maybe_preload(ds, "True", log=said.append, progress=False) and ds._cache is not None
    ds = D.SegmentationDataset(pairs, 8)
    assert not D.maybe_preload(ds, "false", log=said.append, progress=False) and ds._cache is None
    with pytest.raises(ValueError, match="--preload must be auto, True or False, got 'yes please'"):
        D.maybe_preload(ds, "yes please")


def test_available_cpus_is_shared_by_the_local_processes(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = D.available_cpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert D.available_cpus() == max(1, alone // 2)


# ------------------------------------------------------------------- issue 14: masks read as empty
@pytest.fixture
def fresh_notes(monkeypatch):
    """Forget the once-per-process notes, so a test sees its own."""
    monkeypatch.setattr(D, "_NOTED", set(), raising=False)
    monkeypatch.delenv("RANK", raising=False)


def square32() -> np.ndarray:
    """A 32x32 mask with a 16x16 square on the JPEG 8x8 grid."""
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    return mask


def _save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


_SQ = square32()
_LABEL_FILES = {  # name -> what is written; every one must read as the square
    "01.png": _SQ.astype(np.uint8),
    "02.png": _SQ.astype(np.uint8) * 2,
    "0124.png": np.where(_SQ, np.array([1, 2, 4] * 11, dtype=np.uint8)[None, :32], 0).astype(np.uint8),
    "01.jpg": _SQ.astype(np.uint8),
    "02.jpg": _SQ.astype(np.uint8) * 2,
    "01_16bit.png": _SQ.astype(np.uint16),
    "0255_16bit.png": _SQ.astype(np.uint16) * 255,
    "0_65535_16bit.png": _SQ.astype(np.uint16) * 65535,
    "0_4095_12bit.png": _SQ.astype(np.uint16) * 4095,
    "01_float.tif": _SQ.astype(np.float32),
    "red.png": np.stack([_SQ * 255, 0 * _SQ, 0 * _SQ], -1).astype(np.uint8),
    "blue.png": np.stack([0 * _SQ, 0 * _SQ, _SQ * 255], -1).astype(np.uint8),
    "white_rgb.png": np.stack([_SQ * 255] * 3, -1).astype(np.uint8),
}


@pytest.mark.parametrize("name", sorted(_LABEL_FILES))
def test_label_map_deep_and_coloured_masks_read_their_foreground(tmp_path, fresh_notes, name):
    path = _save(tmp_path / name, _LABEL_FILES[name], **({"quality": 75} if name.endswith(".jpg") else {}))
    mask = D.load_mask(path)
    assert mask.dtype == bool and mask.shape == (32, 32)
    assert (mask != _SQ).mean() < 0.02 if name.endswith(".jpg") else np.array_equal(mask, _SQ)


def test_label_maps_are_noted_once_naming_the_first_file(tmp_path, fresh_notes, capsys):
    for k in range(3):
        _save(tmp_path / f"m{k}.png", _SQ.astype(np.uint8) * 2)
    assert all(D.load_mask(tmp_path / f"m{k}.png").sum() == 256 for k in range(3))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(tmp_path / "m0.png") in err[0] and "label map" in err[0] and "label > 0" in err[0]


def test_0_255_masks_read_as_before_without_a_note(tmp_path, fresh_notes, capsys):
    arr = np.array([[0, 1, 31, 128, 129, 255]], dtype=np.uint8)  # largest 255: the > 128 rule, not a label map
    assert D.load_mask(_save(tmp_path / "m.png", arr)).tolist() == [[False] * 4 + [True] * 2]
    assert D.load_mask(_save(tmp_path / "gray.png", _SQ.astype(np.uint8) * 255)).sum() == 256
    assert D.load_mask(_save(tmp_path / "dark.png", _SQ.astype(np.uint8) * 100)).sum() == 0  # not a label map
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("preload", ["auto", "False"])
def test_all_empty_training_masks_stop_before_training(tmp_path, fresh_notes, preload):
    make_folder(tmp_path, ["a", "b", "c"])
    for stem in "abc":
        write_mask(tmp_path / "masks" / f"{stem}.png", np.zeros((10, 12), dtype=bool))
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8)
    with pytest.raises(DataError) as exc:
        D.maybe_preload(ds, preload, log=lambda _: None, progress=False)
    text = error_text(exc)
    assert text.startswith(f"all 3 training masks in {tmp_path / 'masks'} are empty (every pixel is 0)")
    for stem in "abc":  # 0/100: no pixel above 128 and too bright for a label map
        _save(tmp_path / "masks" / f"{stem}.png", blob().astype(np.uint8) * 100)
    with pytest.raises(DataError, match="largest, 100, is too large for a label map"):
        D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8).check_masks(progress=False)


def test_some_empty_masks_are_counted_once(tmp_path, fresh_notes):
    make_folder(tmp_path, ["a", "b", "c"])
    write_mask(tmp_path / "masks" / "b.png", np.zeros((10, 12), dtype=bool))
    said = []
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8)
    assert not D.maybe_preload(ds, "False", log=said.append, progress=False)
    assert said == ["note: 1 of 3 training masks are empty (no foreground): b.png"]
    said.clear()
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8)
    assert D.maybe_preload(ds, "True", log=said.append, progress=False)
    assert said[-1] == "note: 1 of 3 training masks are empty (no foreground): b.png" and len(said) == 2


def test_check_masks_after_preload_reads_nothing_again(tmp_path, monkeypatch):
    make_folder(tmp_path, ["a", "b"])
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8)
    ds.preload(threads=1, progress=False)
    monkeypatch.setattr(D, "_read_mask", lambda *a, **k: pytest.fail("mask read twice"))
    assert ds.check_masks(progress=False) == 0


# ------------------------------------------------------------------- issue 14: ISIC 2016 CSVs
def test_isic2016_empty_test_csv_is_an_error_not_a_seeded_split(tmp_path):
    root = make_isic2016(tmp_path)
    table = root / "ISBI2016_ISIC_Part3B_Test_GroundTruth.csv"
    table.write_text("\n")
    with pytest.raises(DataError) as exc:
        D.resolve_split("ISIC", root)
    assert error_text(exc).startswith(f"{table} lists no images, but it defines the official test split of ")


def test_isic2016_csv_listing_some_images_warns_once(tmp_path, fresh_notes, capsys):
    test_ids = [f"ISIC_00001{k:02d}" for k in range(8)]
    root = make_isic2016(tmp_path, test=test_ids)
    (root / "ISBI2016_ISIC_Part3B_Test_GroundTruth.csv").write_text("ISIC_0000100,benign\nISIC_0000101,malignant\n")
    assert D.resolve_split("ISIC", root)["test"] == test_ids[:2]  # the official CSV defines the split
    D.list_pairs("ISIC", root, "test")
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: ISBI2016_ISIC_Part3B_Test_GroundTruth.csv lists 2 of the 8 images in "
                   f"{root / 'ISBI2016_ISIC_Part3B_Test_Data'}; the 6 others are left out "
                   "(ISIC_0000102, ISIC_0000103, ISIC_0000104 and 3 more)"]


# ------------------------------------------------------------------- issue 14: corrupt files in workers
@pytest.mark.parametrize("which", ["images", "masks"])
def test_corrupt_file_in_a_loader_worker_names_the_file(tmp_path, which):
    from torch.utils.data import DataLoader

    make_folder(tmp_path, ["a", "b"])
    bad = tmp_path / which / "b.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a download cut short
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8)
    batches = iter(DataLoader(ds, batch_size=1, num_workers=1))
    try:
        with pytest.raises(DataError) as exc:
            list(batches)
    finally:
        batches._shutdown_workers()  # now, not when a later test's garbage collection finds it
    what = "image" if which == "images" else "mask"
    own = str(exc.value).splitlines()[-1]  # torch's "Caught DataError in DataLoader worker ..." ends with it
    assert re.fullmatch(rf"guided_diffusion\.data\.datasets\.DataError: {re.escape(str(bad))}: "
                        rf"cannot read the {what} \(\S.*\)", own), own
    with pytest.raises(DataError) as exc:  # in this process: the same message, one line, the path first
        ds[1]
    assert own.endswith(f"DataError: {error_text(exc)}")


def test_unexpected_failure_reading_a_pair_names_its_files(tmp_path, monkeypatch):
    make_folder(tmp_path, ["a"])
    monkeypatch.setattr(D, "load_image", lambda path: (_ for _ in ()).throw(RuntimeError("boom\nmore")))
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8)
    with pytest.raises(DataError) as exc:
        ds[0]
    assert error_text(exc) == (f"{tmp_path / 'images' / 'a.png'}: cannot load it with its mask "
                               f"{tmp_path / 'masks' / 'a.png'} (RuntimeError: boom more)")


# ------------------------------------------------------------------- issue 14: preload progress
def test_preload_progress_is_plain_lines_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SEG_PROGRESS_SECONDS", raising=False)  # one line at the end, none in between
    make_folder(tmp_path, ["a", "b", "c"])
    ds = D.SegmentationDataset(D.find_pairs("FOLDER", tmp_path)[0], 8)
    ds.preload(threads=1, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.startswith("preload: 3/3 img (100%), elapsed ")
    assert len(err.splitlines()) == 1
