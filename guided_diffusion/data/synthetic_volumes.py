"""Synthetic multi-modal MRI volumes in the BraTS and Decathlon layouts, for tests and for trying the volume path.

Each case: a head-like ellipsoid of nonzero voxels (the background is exactly 0, as in skull-stripped BraTS), smooth
tissue texture and Gaussian noise in four channels with different intensity scales (t1, t1ce, t2, flair), and a
random ellipsoid "tumour" in BraTS labels (2 oedema outside, 4 enhancing shell, 1 necrotic core; the Decathlon's
Task01 numbering 1 oedema, 3 enhancing, 2 non-enhancing in the NIFTI layout), each modality showing its part of it
brighter or darker. Voxels are anisotropic (default 1.0 x 1.2 x 2.5 mm) and the affine is not the identity
(rotated about z, x and y flipped, shifted), so a reader that ignores the header gets distances and orientation
wrong. Deterministic in (seed, case index).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from guided_diffusion.data.datasets import DataError
from guided_diffusion.fileio import atomic_write

LAYOUTS = ("brats", "nifti")
MODALITIES = ("t1", "t1ce", "t2", "flair")
DECATHLON_NAMES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}  # MSD Task01_BrainTumour's channel order
DECATHLON_ORDER = ("flair", "t1", "t1ce", "t2")
BRATS_TO_DECATHLON = {2: 1, 1: 2, 4: 3}
DEFAULT_SHAPE = (64, 64, 24)
DEFAULT_SPACING = (1.0, 1.2, 2.5)
# mean intensity of (brain, oedema, enhancing, necrosis) per modality; every case scales them by its own factor
LEVELS = {"t1": (400, 340, 300, 220), "t1ce": (450, 470, 950, 260), "t2": (600, 1100, 900, 1300),
          "flair": (300, 720, 600, 420)}


def affine_for(shape: tuple[int, int, int], spacing: tuple[float, float, float], angle_deg: float = 12.0) -> np.ndarray:
    """A voxel-to-world affine: x and y flipped (LPS-like storage), rotated about z, scaled by spacing, and shifted so
    the volume's centre is near the world origin."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    linear = rot @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ (np.asarray(shape, dtype=float) / 2) + np.array([3.0, -7.0, 11.0])
    return affine


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    """Squared normalised radius sum(((x - c) / r)^2) over a mm grid."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


def _smooth_noise(rng: np.random.Generator, shape, passes: int = 2) -> np.ndarray:
    """Low-frequency texture in about [-1, 1]: white noise box-blurred a few times."""
    x = rng.standard_normal(shape)
    for _ in range(passes):
        for axis in range(3):
            x = (np.roll(x, 1, axis) + x + np.roll(x, -1, axis)) / 3.0
    return x / max(float(np.abs(x).max()), 1e-6)


def make_case(index: int, seed: int = 0, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING,
              empty: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One case: {modality: float32 (X, Y, Z)} and its BraTS label volume (uint8; 0, 1, 2, 4)."""
    rng = np.random.default_rng([seed, index])
    shape = tuple(int(s) for s in shape)
    extent = np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)
    grid = np.meshgrid(*[(np.arange(n) + 0.5) * d for n, d in zip(shape, spacing)], indexing="ij")
    centre = extent / 2 + rng.uniform(-0.03, 0.03, 3) * extent
    head_r = extent * rng.uniform(0.38, 0.45, 3)
    head = _ellipsoid(grid, centre, head_r) <= 1.0
    label = np.zeros(shape, dtype=np.uint8)
    if not empty:
        offset = rng.uniform(-0.35, 0.35, 3) * head_r
        offset[2] = rng.uniform(-0.15, 0.15) * head_r[2]
        radii = head_r * rng.uniform(0.25, 0.42, 3)
        radii[2] = max(radii[2], 2.6 * spacing[2])  # at least a few slices thick
        r2 = _ellipsoid(grid, centre + offset, radii)
        label[(r2 <= 1.0) & head] = 2
        label[(r2 <= 0.45) & head] = 4
        label[(r2 <= 0.15) & head] = 1
    texture = _smooth_noise(rng, shape)
    scale = rng.uniform(0.7, 1.4)
    channels = {}
    for name in MODALITIES:
        brain, oedema, enhancing, necrosis = LEVELS[name]
        x = np.full(shape, float(brain))
        x[label == 2], x[label == 4], x[label == 1] = oedema, enhancing, necrosis
        x = x * (1.0 + 0.12 * texture) + rng.normal(0.0, 0.1 * brain, shape)
        x = np.clip(x * scale, 1.0, None)
        x[~head] = 0.0
        channels[name] = x.astype(np.float32)
    return channels, label


def _nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write one volume (scanner-coordinate qform and sform, mm units) atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    atomic_write(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def write_volumes(out_dir, layout: str = "brats", cases: int = 8, seed: int = 0, shape=DEFAULT_SHAPE,
                  spacing=DEFAULT_SPACING, channels_layout: str = "4d", empty_cases: int = 0) -> Path:
    """A synthetic data set in ``layout`` (brats: <case>/<case>_<mod>.nii.gz; nifti: imagesTr/ + labelsTr/ +
    dataset.json, images 4-D channels-last or, with channels_layout='split', one <case>_000k file per channel).
    The last ``empty_cases`` cases have no tumour. Generated beside ``out_dir`` and renamed into place; an existing
    non-empty ``out_dir`` is an error."""
    layout = str(layout).lower()
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be brats or nifti, got {layout!r}")
    if channels_layout not in ("4d", "split"):
        raise ValueError(f"--channels_layout must be 4d or split, got {channels_layout!r}")
    if cases < 1:
        raise ValueError(f"--cases must be >= 1, got {cases}")
    if len(shape) != 3 or min(shape) < 2 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"--shape needs 3 sizes >= 2 and --spacing 3 positive sizes, got {shape} and {spacing}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"--out_dir {out_dir} exists and is not empty; give a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"
    affine = affine_for(shape, spacing)
    training = []
    try:
        for i in range(cases):
            channels, label = make_case(i, seed, shape, spacing, empty=i >= cases - empty_cases)
            if layout == "brats":
                case = f"SynBraTS_{i:05d}"
                for name in MODALITIES:
                    _nifti(np.rint(channels[name]).astype(np.int16), affine, tmp / case / f"{case}_{name}.nii.gz")
                _nifti(label, affine, tmp / case / f"{case}_seg.nii.gz")
                continue
            case = f"SYN_{i:03d}"
            ordered = [channels[m] for m in DECATHLON_ORDER]
            if channels_layout == "4d":
                _nifti(np.stack(ordered, axis=-1), affine, tmp / "imagesTr" / f"{case}.nii.gz")
            else:
                for k, x in enumerate(ordered):
                    _nifti(x, affine, tmp / "imagesTr" / f"{case}_{k:04d}.nii.gz")
            relabelled = np.zeros_like(label)
            for old, new in BRATS_TO_DECATHLON.items():
                relabelled[label == old] = new
            _nifti(relabelled, affine, tmp / "labelsTr" / f"{case}.nii.gz")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        if layout == "nifti":
            meta = {"name": "synthetic", "description": "guided_diffusion.data.synthetic_volumes", "tensorImageSize": "4D",
                    "modality": DECATHLON_NAMES, "labels": {"0": "background", "1": "edema",
                                                             "2": "non-enhancing tumor", "3": "enhancing tumour"},
                    "numTraining": cases, "numTest": 0, "training": training, "test": []}
            atomic_write(tmp / "dataset.json", json.dumps(meta, indent=1) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
