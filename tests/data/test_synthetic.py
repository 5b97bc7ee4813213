"""Tests for the built-in synthetic set (data/synthetic.py, made through datasets.make_synthetic/ensure_dataset)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from image_files import error_text, make_folder
from PIL import Image

from guided_diffusion.data import datasets as D
from guided_diffusion.data.datasets import DataError


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic_and_varied(tmp_path):
    a = D.make_synthetic(tmp_path / "a", num_images=30, seed=0)
    b = D.make_synthetic(tmp_path / "b", num_images=30, seed=0)
    assert _tree(a) == _tree(b) and len(_tree(a)) == 61
    assert _tree(D.make_synthetic(tmp_path / "c", num_images=30, seed=1)) != _tree(a)
    meta = json.loads((a / "meta.json").read_text())
    assert meta["num_images"] == 30 and meta["seed"] == 0 and "version" in meta
    pairs, official = D.find_pairs("SYNTHETIC", a)
    assert len(pairs) == 30 and official is None
    masks = [D.load_mask(p.mask) for p in pairs]
    for p in pairs:
        assert set(np.unique(np.asarray(Image.open(p.mask))).tolist()) <= {0, 255}
    assert sum(not m.any() for m in masks) == 3  # every 10th image has no lesion
    border = [m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for m in masks]
    assert 1 <= sum(border) < 20
    shapes = {m.shape for m in masks}
    assert len(shapes) > 10 and any(h != w for h, w in shapes)
    assert all(64 <= h <= 128 and 64 <= w <= 128 for h, w in shapes)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_synthetic_reuse_and_conflicts(tmp_path):
    root = D.make_synthetic(tmp_path / "s", num_images=12)
    stamp = (root / "images" / "synth_0000.png").stat().st_mtime_ns
    assert D.make_synthetic(root, num_images=12) == root
    assert (root / "images" / "synth_0000.png").stat().st_mtime_ns == stamp  # not regenerated
    D.ensure_dataset("SYNTHETIC", root)  # an existing generated set is accepted as it is
    with pytest.raises(DataError) as exc:
        D.make_synthetic(root, num_images=13)
    assert "--data_dir" in error_text(exc) and str(root / "meta.json") in str(exc.value)
    foreign = make_folder(tmp_path / "foreign", ["a"])
    with pytest.raises(DataError) as exc:
        D.make_synthetic(foreign)
    assert str(foreign) in error_text(exc) and "--data_dir" in str(exc.value)


def test_synthetic_concurrent_generation(tmp_path):
    root = tmp_path / "shared"
    with ThreadPoolExecutor(3) as pool:  # like several torchrun ranks calling ensure_dataset at once
        results = list(pool.map(lambda _: D.make_synthetic(root, num_images=8), range(3)))
    assert results == [root] * 3
    assert _tree(root) == _tree(D.make_synthetic(tmp_path / "alone", num_images=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "shared"]


def test_ensure_dataset_generates_default_synthetic(tmp_path):
    root = tmp_path / "synthetic"
    D.ensure_dataset("SYNTHETIC", root)
    assert json.loads((root / "meta.json").read_text())["num_images"] == 240
    (tmp_path / "empty").mkdir()
    assert len(D.find_pairs("SYNTHETIC", tmp_path / "empty")[0]) == 240  # generated on first use
    item = D.SegmentationDataset(D.list_pairs("SYNTHETIC", root, "train"), 64, augment=True)[0]
    assert item["image"].shape == (3, 64, 64)
