"""data/volumes.py: both layouts, normalisation, slicing, the split by case, and the one-line errors."""
import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from image_files import error_text
from tiny_volumes import SHAPE, SPACING

from guided_diffusion.config import DataConfig, ModelConfig
from guided_diffusion.data import datasets, volumes
from guided_diffusion.data.datasets import DataError
from guided_diffusion.data.synthetic_volumes import affine_for


def spec_of(data_name, data_dir, **flags):
    return volumes.volume_spec(DataConfig(data_name=data_name, data_dir=str(data_dir), **flags))


# ------------------------------------------------------------------------------------------ normalisation
def test_normalisation_closed_form():
    rng = np.random.default_rng(0)
    x = np.zeros((10, 9, 8), dtype=np.float32)
    inside = rng.random(x.shape) < 0.6
    x[inside] = rng.gamma(2.0, 300.0, int(inside.sum())) + 1.0
    z = volumes.normalize_channel(x, 0.0, 100.0)  # no clipping: exactly the z-score of the nonzero voxels
    np.testing.assert_allclose(z[inside], (x[inside] - x[inside].mean()) / x[inside].std(), rtol=1e-5, atol=1e-5)
    assert z[inside].mean() == pytest.approx(0.0, abs=1e-5) and z[inside].std() == pytest.approx(1.0, abs=1e-5)
    assert (z[~inside] == 0).all()

    z = volumes.normalize_channel(x, 0.5, 99.5)  # clipped to the percentiles of the nonzero voxels, then z-scored
    lo, hi = np.percentile(x[inside].astype(np.float64), [0.5, 99.5])
    clipped = np.clip(x[inside].astype(np.float64), lo, hi)
    np.testing.assert_allclose(z[inside], (clipped - clipped.mean()) / clipped.std(), rtol=1e-5, atol=1e-5)
    assert z[inside].mean() == pytest.approx(0.0, abs=1e-5) and z[inside].std() == pytest.approx(1.0, abs=1e-5)
    assert (z[~inside] == 0).all()
    assert (volumes.normalize_channel(np.zeros((3, 3, 3))) == 0).all()  # no brain: all 0
    assert (volumes.normalize_channel(np.full((3, 3, 3), 7.0)) == 0).all()  # constant: all 0, not NaN


def test_every_loaded_channel_is_normalised(volume_sets):
    spec = spec_of("BRATS", volume_sets["brats"])
    case = datasets.find_pairs("BRATS", volume_sets["brats"])[0][0]
    vol = volumes.load_case(case, spec)
    raw = np.asarray(nib.load(str(dict((n, p) for n, p, _ in case.channels)["t2"])).dataobj)
    assert vol.image.shape == (4, *SHAPE) and vol.mask.shape == SHAPE and vol.mask.any()
    for c in range(4):
        inside = vol.image[c] != 0
        assert (inside == (raw != 0)).all()  # the background stays 0, the head is what was nonzero
        assert vol.image[c][inside].mean() == pytest.approx(0, abs=1e-4)
        assert vol.image[c][inside].std() == pytest.approx(1, abs=1e-4)


# ------------------------------------------------------------------------------------------ layouts
def test_layouts_read_the_same_volumes(volume_sets):
    """BraTS files, Decathlon 4-D images and per-channel images of one generator give the same channels."""
    four = spec_of("NIFTI", volume_sets["nifti"])
    split = spec_of("NIFTI", volume_sets["split"])
    assert four.modalities == split.modalities == ("FLAIR", "T1w", "t1gd", "T2w")  # dataset.json's names
    a = volumes.load_case(volumes.find_cases("NIFTI", volume_sets["nifti"])[0], four)
    b = volumes.load_case(volumes.find_cases("NIFTI", volume_sets["split"])[0], split)
    np.testing.assert_allclose(a.image, b.image)
    brats = spec_of("BRATS", volume_sets["brats"], modalities="flair,t1,t1ce,t2")
    c = volumes.load_case(volumes.find_cases("BRATS", volume_sets["brats"])[0], brats)
    np.testing.assert_allclose(a.image, c.image, atol=0.05)  # BraTS files are int16 (rounded intensities)
    assert (a.mask == b.mask).all() and (a.mask == c.mask).all()
    picked = spec_of("NIFTI", volume_sets["nifti"], modalities="t2w,0")  # by name (any case) or by number
    assert picked.modalities == ("T2w", "FLAIR")
    d = volumes.load_case(volumes.find_cases("NIFTI", volume_sets["nifti"])[0], picked)
    np.testing.assert_allclose(d.image, a.image[[3, 0]])


def test_labels_pick_the_foreground(volume_sets):
    case = volumes.find_cases("BRATS", volume_sets["brats"])[0]
    labels = np.asarray(nib.load(str(case.mask)).dataobj)
    whole = volumes.load_case(case, spec_of("BRATS", volume_sets["brats"])).mask
    core = volumes.load_case(case, spec_of("BRATS", volume_sets["brats"], labels="1,4")).mask
    assert (whole == (labels > 0)).all() and (core == np.isin(labels, [1, 4])).all() and core.sum() < whole.sum()


def test_slices_round_trip_along_every_axis():
    vol = np.arange(24 * 20 * 12).reshape(SHAPE)
    for axis in range(3):
        s = volumes.to_slices(vol, axis)
        assert s.shape[0] == SHAPE[axis]
        assert (s[5] == np.take(vol, 5, axis=axis)).all()
        assert (volumes.from_slices(s, axis) == vol).all()


def test_split_is_by_case(volume_sets):
    """No case is on both sides of the split, and every slice of a case is where its case is."""
    d = volume_sets["brats"]
    split = datasets.resolve_split("BRATS", d, seed=0)
    assert split["data_name"] == "BRATS" and split["test"] and split["train"]
    cases = {c.id for c in volumes.find_cases("BRATS", d)}
    parts = [set(split[k]) for k in datasets.SPLITS]
    assert set().union(*parts) == cases and sum(map(len, parts)) == len(cases)  # case ids, disjoint
    spec = spec_of("BRATS", d)
    seen = {}
    for part in datasets.SPLITS:
        ds = volumes.VolumeSliceDataset(datasets.list_pairs("BRATS", d, part, seed=0), spec, 16)
        ds.load(progress=False, log=lambda _: None)
        for k in range(len(ds)):
            case = ds[k]["id"].split("@")[0]
            assert case in split[part]
            assert seen.setdefault(case, part) == part
    assert set(seen) == cases


def test_training_slices(volume_sets):
    d = volume_sets["nifti"]
    cases = volumes.find_cases("NIFTI", d)
    ds = volumes.VolumeSliceDataset(cases[:2], spec_of("NIFTI", d), 16, augment=True)
    ds.load(progress=False, log=lambda _: None)
    item = ds[0]
    assert item["image"].shape == (4, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["orig_size"].tolist() == [SHAPE[0], SHAPE[1]]
    kept_all = len(ds)
    skip = volumes.VolumeSliceDataset(cases[:2], spec_of("NIFTI", d, skip_empty_slices="True"), 16)
    skip.load(progress=False, log=lambda _: None)
    assert 0 < len(skip) < kept_all and all(skip.masks[k].any() for k in range(len(skip)))
    half = volumes.VolumeSliceDataset(cases[:2], spec_of("NIFTI", d, skip_empty_slices="0.5"), 16)
    half.load(progress=False, log=lambda _: None)
    assert len(skip) <= len(half) <= kept_all
    axial = volumes.VolumeSliceDataset(cases[:1], spec_of("NIFTI", d, slice_axis=0), 16)
    axial.load(progress=False, log=lambda _: None)
    assert axial[0]["orig_size"].tolist() == [SHAPE[1], SHAPE[2]]


def test_configure_sets_channels_and_modalities(volume_sets):
    mc, dc = ModelConfig(), DataConfig(data_name="BRATS", data_dir=str(volume_sets["brats"]), modalities="flair,t2")
    volumes.configure(mc, dc)
    assert mc.image_channels == 2 and dc.modalities == "flair,t2"
    mc, dc = ModelConfig(), DataConfig(data_name="NIFTI", data_dir=str(volume_sets["nifti"]))
    volumes.configure(mc, dc)
    assert mc.image_channels == 4 and dc.modalities == "FLAIR,T1w,t1gd,T2w"
    mc = ModelConfig(image_channels=3)
    with pytest.raises(ValueError, match="--image_channels 3 contradicts the 4 --modalities"):
        volumes.configure(mc, DataConfig(data_name="BRATS", data_dir=str(volume_sets["brats"])))
    mc = ModelConfig()
    volumes.configure(mc, DataConfig())  # images: RGB
    assert mc.image_channels == 3


# ------------------------------------------------------------------------------------------ errors
def test_missing_modality_file_is_named(copy_set):
    d = copy_set("brats")
    case = sorted(p for p in d.iterdir() if p.is_dir())[1]
    (case / f"{case.name}_t2.nii.gz").unlink()
    spec = spec_of("BRATS", d)
    with pytest.raises(DataError) as exc:
        volumes.load_case(volumes.find_cases("BRATS", d)[1], spec)
    assert f"{case / case.name}_t2.nii.gz: missing modality file" in error_text(exc)
    d = copy_set("split")
    (d / "imagesTr" / "SYN_002_0003.nii.gz").unlink()  # the last channel (T2w) of one case
    with pytest.raises(DataError) as exc:
        volumes.load_case(volumes.find_cases("NIFTI", d)[2], spec_of("NIFTI", d))
    assert error_text(exc).startswith(f"{d / 'imagesTr' / 'SYN_002_0003.nii.gz'}: missing modality file (T2w")
    (d / "imagesTr" / "SYN_001_0001.nii.gz").unlink()  # a gap in the numbering
    with pytest.raises(DataError) as exc:
        datasets.find_pairs("NIFTI", d)
    assert "case 'SYN_001' are numbered 0000, 0002, 0003" in error_text(exc)


def test_unknown_modality_and_bad_flags_name_the_flag(volume_sets):
    with pytest.raises(ValueError) as exc:
        spec_of("BRATS", volume_sets["brats"], modalities="t1,dwi")
    assert "--modalities: unknown modality 'dwi'" in error_text(exc) and "t1, t1ce, t2, flair" in str(exc.value)
    with pytest.raises(ValueError) as exc:
        spec_of("NIFTI", volume_sets["nifti"], modalities="ADC")
    assert "--modalities" in error_text(exc) and "FLAIR, T1w, t1gd, T2w" in str(exc.value)
    for flags, flag in (({"slice_axis": 3}, "--slice_axis"), ({"labels": "1,x"}, "--labels"),
                        ({"labels": "0"}, "--labels"), ({"norm_percentiles": "99,1"}, "--norm_percentiles"),
                        ({"skip_empty_slices": "2"}, "--skip_empty_slices")):
        with pytest.raises(ValueError) as exc:
            spec_of("BRATS", volume_sets["brats"], **flags)
        assert error_text(exc).startswith(flag), flags


def _write(path, data, affine):
    path.write_bytes(gzip.compress(nib.Nifti1Image(data, affine).to_bytes()))


def test_label_of_another_shape_and_2d_file_are_named(copy_set):
    d = copy_set("brats")
    case = volumes.find_cases("BRATS", d)[0]
    _write(case.mask, np.zeros((24, 20, 11), np.uint8), affine_for(SHAPE, SPACING))
    with pytest.raises(DataError) as exc:
        volumes.load_case(case, spec_of("BRATS", d))
    assert f"label volume {case.mask} is 24x20x11 but its image is 24x20x12" in error_text(exc)
    flat = dict((n, p) for n, p, _ in case.channels)["t1"]
    _write(flat, np.ones((24, 20), np.int16), np.eye(4))
    with pytest.raises(DataError) as exc:
        volumes.load_case(case, spec_of("BRATS", d))
    assert error_text(exc).startswith(f"{flat}: a 2-D image") and "must be 3-D" in str(exc.value)
    other = dict((n, p) for n, p, _ in case.channels)["flair"]
    _write(other, np.ones((24, 20, 10), np.int16), np.eye(4))
    _write(flat, np.ones(SHAPE, np.int16), np.eye(4))
    with pytest.raises(DataError) as exc:
        volumes.load_case(case, spec_of("BRATS", d))
    assert f"{other} is 24x20x10 but" in error_text(exc)
    other.write_bytes(b"not a nifti file")
    with pytest.raises(DataError) as exc:
        volumes.load_case(case, spec_of("BRATS", d))
    assert error_text(exc).startswith(f"{other}: cannot read the NIfTI volume")


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="imagesTr/ folder not found"):
        datasets.find_pairs("NIFTI", tmp_path)
    (tmp_path / "case1").mkdir()
    _write(tmp_path / "case1" / "case1_t1.nii.gz", np.ones(SHAPE, np.int16), np.eye(4))
    with pytest.raises(DataError) as exc:
        datasets.find_pairs("BRATS", tmp_path)
    assert "without a label <case>_seg.nii.gz: case1" in error_text(exc)


def test_all_empty_training_labels_are_an_error(copy_set):
    d = copy_set("nifti")
    for case in volumes.find_cases("NIFTI", d):
        img = nib.load(str(case.mask))
        _write(case.mask, np.zeros(img.shape, np.uint8), img.affine)
    ds = volumes.VolumeSliceDataset(volumes.find_cases("NIFTI", d), spec_of("NIFTI", d), 16)
    with pytest.raises(DataError, match="no foreground .* nothing to learn; check --labels"):
        ds.load(progress=False, log=lambda _: None)


def test_nifti_bytes_keeps_affine_header_and_orientation(volume_sets, tmp_path):
    case = volumes.find_cases("NIFTI", volume_sets["nifti"])[0]  # a 4-D source: the mask is 3-D with its geometry
    src = nib.load(str(case.image))
    data = (np.random.default_rng(0).random(SHAPE) > 0.5).astype(np.uint8)
    path = tmp_path / "m.nii.gz"
    path.write_bytes(volumes.nifti_bytes(data, src, path))
    out = nib.load(str(path))
    assert out.shape == SHAPE and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, src.affine)
    np.testing.assert_allclose(out.header.get_zooms(), SPACING)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine) != ("R", "A", "S")
    assert (np.asarray(out.dataobj) == data).all()
    assert int(out.header["qform_code"]) == int(src.header["qform_code"]) == 1
    assert torch.equal(torch.as_tensor(np.asarray(out.dataobj)), torch.as_tensor(data))
