"""Data sets: find image/mask pairs (ISIC, Kvasir-SEG, folder, synthetic), split them, load and transform them.

One loading path for every script: ``find_pairs`` knows the layouts, ``resolve_split`` fixes which ids are
train/val/test (official split, a saved split file, or a seeded split that never changes between training
and sampling), and ``SegmentationDataset`` turns pairs into tensors with image/mask geometry kept in step.
Every problem with the user's data is a one-line ``DataError`` that names the offending path or flag.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from guided_diffusion.data import synthetic
from guided_diffusion.progress import is_terminal
from guided_diffusion.progress import progress as progress_bar

DATA_NAMES = ("ISIC", "KVASIR", "FOLDER", "SYNTHETIC", "BRATS", "NIFTI")  # the last two: NIfTI volumes (volumes.py)
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")  # every reader of image folders
MASK_SUFFIXES = ("_segmentation", "_mask")  # matched case-insensitively: _Segmentation, _Mask too
IGNORED_SUFFIXES = ("_superpixels",)  # ISIC 2017 ships superpixel maps beside the images
LOSSLESS_EXTS = (".png", ".bmp", ".tif", ".tiff", ".gif")  # mask files whose values are exact (no JPEG noise)
LABEL_MAX = 31  # a mask whose largest value is 1..LABEL_MAX is a label map ({0,1}, {0,2}, {0,1,2,4}): label > 0
COLOUR_SPREAD = 64  # an RGB mask whose channels differ by more than this somewhere is coloured (red/blue on black)
_SHOW = 3  # how many offending files an error message names


class DataError(ValueError):
    """A problem with the user's data or data flags; the one-line message names the path or flag."""


@dataclass(frozen=True)
class Pair:
    """One sample: its id (the image's file stem) and the image and mask files."""

    id: str
    image: Path
    mask: Path


# ----------------------------------------------------------------------------------------------- files


def _one_line(text: object) -> str:
    """Collapse an exception text to one line so every DataError stays a one-liner."""
    return " ".join(str(text).split())


_NOTED: set = set()
_NOTE_LOCK = threading.Lock()


def _note(key, message: str) -> None:
    """``message`` on stderr once per process for ``key``, from rank 0 only (in a loader, from its first worker)."""
    with _NOTE_LOCK:
        if key in _NOTED:
            return
        _NOTED.add(key)
    if os.environ.get("RANK", "0") not in ("", "0"):
        return
    worker = torch.utils.data.get_worker_info()
    if worker is not None and worker.id != 0:
        return
    if is_terminal():  # above a live progress bar, not through it
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def _examples(names: Iterable[str]) -> str:
    """'a, b, c and 4 more': a short, readable list of offending names."""
    names = sorted(names)
    head = ", ".join(names[:_SHOW])
    return head + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (no subfolders, hidden/AppleDouble files or ISIC superpixel maps)."""
    return sorted(
        p for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS
        and not p.stem.lower().endswith(IGNORED_SUFFIXES)
    )


def _mask_id(stem: str) -> str | None:
    """The image id a mask stem names when it carries a mask suffix (``_mask``, ``_segmentation``), else None."""
    lower = stem.lower()
    for suffix in MASK_SUFFIXES:
        if lower.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return None


def _require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a DataError saying which folder is missing."""
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


def _index_by_stem(files: list[Path], where: Path) -> dict[str, Path]:
    """Map file stem -> path; two files with one stem (a.png and a.jpg) are ambiguous."""
    index: dict[str, Path] = {}
    for path in files:
        if path.stem in index:
            raise DataError(f"two files for id {path.stem!r} in {where}: {index[path.stem].name} and {path.name}")
        index[path.stem] = path
    return index


def _pair_files(images: list[Path], masks: list[Path], image_dir: Path, mask_dir: Path) -> list[Pair]:
    """Pair images with masks by stem (mask stem may add a mask suffix); every file must find its partner."""
    by_id = _index_by_stem(images, image_dir)
    mask_of: dict[str, Path] = {}
    orphans = []
    for mask in masks:
        key = mask.stem if mask.stem in by_id else _mask_id(mask.stem)
        if key not in by_id:
            orphans.append(mask.name)
        elif key in mask_of:
            raise DataError(f"two masks for image {key!r} in {mask_dir}: {mask_of[key].name} and {mask.name}")
        else:
            mask_of[key] = mask
    if orphans:
        raise DataError(f"{len(orphans)} mask(s) in {mask_dir} without an image in {image_dir}: {_examples(orphans)}")
    lonely = [by_id[i].name for i in by_id if i not in mask_of]
    if lonely:
        raise DataError(f"{len(lonely)} image(s) in {image_dir} without a mask in {mask_dir}: {_examples(lonely)}")
    return [Pair(i, by_id[i], mask_of[i]) for i in sorted(by_id)]


def _split_masks(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Separate images from masks kept in one folder (ISIC 2016 Part3B keeps them side by side)."""
    masks = [p for p in files if _mask_id(p.stem) is not None]
    return [p for p in files if _mask_id(p.stem) is None], masks


# ------------------------------------------------------------------------------------------- layouts


def _folder_pairs(data_dir: Path) -> list[Pair]:
    """FOLDER / KVASIR / SYNTHETIC layout: ``images/`` and ``masks/`` paired by file stem."""
    image_dir = _require_dir(data_dir / "images", "images/ folder")
    mask_dir = _require_dir(data_dir / "masks", "masks/ folder")
    return _pair_files(image_files(image_dir), image_files(mask_dir), image_dir, mask_dir)


@dataclass(frozen=True)
class _IsicPart:
    """One ISIC image folder with where its masks and (ISIC 2016) its id list live."""

    image_dir: Path
    mask_dir: Path
    role: str | None  # "train" | "val" | "test" | None when the name says nothing
    csv: Path | None


def _isic_role(name: str) -> str | None:
    """Split role from an ISIC folder name: Training -> train, Validation -> val, Test -> test."""
    tokens = set(re.split(r"[_\-\s.]+", name.lower()))
    for role, words in (("train", {"training", "train"}), ("val", {"validation", "val"}), ("test", {"test"})):
        if tokens & words:
            return role
    return None


def _isic_year(name: str) -> str | None:
    """Challenge year in an ISIC folder name (2016, 2017, 2018...), to match images with their ground truth."""
    found = re.search(r"20\d\d", name)
    return found.group(0) if found else None


def _is_isic_image_dir(path: Path) -> bool:
    """An ISIC image folder: ``*_Data`` or ``*_Input``, not ground truth, not the classification-only Task 3."""
    name = path.name.lower()
    return (path.is_dir() and name.endswith(("_data", "_input")) and "groundtruth" not in name
            and "task3" not in name)


def _is_isic_mask_dir(path: Path) -> bool:
    """An ISIC segmentation ground-truth folder (Part 1 / Task 1; Part 2/3 and Task 2/3 hold other labels)."""
    name = path.name.lower()
    return path.is_dir() and "groundtruth" in name and not re.search(r"(part|task)[23]", name)


def _isic_parts(data_dir: Path) -> list[_IsicPart]:
    """Detect the ISIC folders: 2017/2018 (ground truth in a sibling folder) or 2016 Part3B (masks beside images)."""
    entries = sorted(data_dir.iterdir())
    image_dirs = [p for p in entries if _is_isic_image_dir(p)]
    if not image_dirs:
        raise DataError(f"no ISIC image folder (*_Data or *_Input) in {data_dir}; "
                        "for images/ + masks/ use --data_name FOLDER")
    mask_dirs = [p for p in entries if _is_isic_mask_dir(p)]
    parts = []
    for image_dir in image_dirs:
        role, year = _isic_role(image_dir.name), _isic_year(image_dir.name)
        matches = [m for m in mask_dirs if _isic_role(m.name) == role and _isic_year(m.name) == year]
        if len(matches) > 1:
            raise DataError(f"several ground-truth folders match {image_dir}: {_examples(m.name for m in matches)}")
        stem = image_dir.name[: image_dir.name.rfind("_")]
        table = data_dir / f"{stem}_GroundTruth.csv"
        mask_dir = matches[0] if matches else image_dir
        parts.append(_IsicPart(image_dir, mask_dir, role, table if table.is_file() else None))
    return parts


def _read_id_csv(table: Path) -> list[str]:
    """Ids from an ISIC 2016 ground-truth CSV: no header row, id in column 0 (the first row is data)."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row and row[0].strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {table}: {_one_line(exc)}") from exc
    ids = [row[0].strip() for row in rows]
    return [i[: -len(Path(i).suffix)] if Path(i).suffix.lower() in IMAGE_EXTS else i for i in ids]


def _csv_pairs(part: _IsicPart) -> list[Pair]:
    """Pairs listed by an ISIC 2016 CSV, which defines the official split.

    A listed id whose image or mask file is absent is an error, and so is a CSV that lists nothing (it would
    silently turn the official split into a seeded one); images in the folder the CSV does not list are left
    out, with a one-line warning that counts them.
    """
    images = _index_by_stem(_split_masks(image_files(part.image_dir))[0], part.image_dir)
    masks = {_mask_id(p.stem): p for p in image_files(part.mask_dir) if _mask_id(p.stem)}
    ids = _read_id_csv(part.csv)
    if not ids:
        what = f"the official {part.role} split" if part.role else "the images"
        raise DataError(f"{part.csv} lists no images, but it defines {what} of {part.image_dir}: restore it from "
                        "the ISIC archive, or delete it to pair the files in the folder")
    pairs = []
    for row, sample_id in enumerate(ids, start=1):
        if sample_id not in images:
            missing = part.image_dir / f"{sample_id}.jpg"
            raise DataError(f"{part.csv} row {row} lists {sample_id!r} but its image {missing} is missing")
        if sample_id not in masks:
            missing = part.mask_dir / f"{sample_id}_Segmentation.png"
            raise DataError(f"{part.csv} row {row} lists {sample_id!r} but its mask {missing} is missing")
        pairs.append(Pair(sample_id, images[sample_id], masks[sample_id]))
    others = sorted(set(images) - set(ids))
    if others:
        _note(("csv", str(part.csv)),
              f"warning: {part.csv.name} lists {len(images) - len(others)} of the {len(images)} images in "
              f"{part.image_dir}; the {len(others)} others are left out ({_examples(others)})")
    return pairs


def _part_pairs(part: _IsicPart) -> list[Pair]:
    """Pairs of one ISIC part: from its CSV when there is one, else by pairing the files."""
    if part.csv is not None:
        return _csv_pairs(part)
    files = image_files(part.image_dir)
    if part.mask_dir == part.image_dir:
        images, masks = _split_masks(files)
        if not masks:
            raise DataError(f"no ground truth for {part.image_dir}: expected a matching *_GroundTruth folder "
                            "or ISIC_<id>_Segmentation.png masks beside the images")
        return _pair_files(images, masks, part.image_dir, part.mask_dir)
    return _pair_files(_split_masks(files)[0], image_files(part.mask_dir), part.image_dir, part.mask_dir)


def _isic_pairs(data_dir: Path) -> tuple[list[Pair], dict[str, list[str]] | None]:
    """All ISIC pairs and, when the folders name more than one role, the official split (val may be empty)."""
    parts = _isic_parts(data_dir)
    by_role: dict[str | None, list[str]] = {}
    pairs: dict[str, Pair] = {}
    for part in parts:
        for pair in _part_pairs(part):
            if pair.id in pairs:
                raise DataError(f"id {pair.id!r} appears twice: {pairs[pair.id].image} and {pair.image}")
            pairs[pair.id] = pair
            by_role.setdefault(part.role, []).append(pair.id)
    roles = set(by_role)
    official = None
    if len(roles) > 1 and None not in roles:
        official = {role: sorted(by_role.get(role, [])) for role in SPLITS}
    return [pairs[i] for i in sorted(pairs)], official


# --------------------------------------------------------------------------------------------- pairs


def normalize_data_name(data_name: str) -> str:
    """Upper-case ``data_name`` and check it is known (the ``--data_name`` flag)."""
    name = str(data_name).upper()
    if name not in DATA_NAMES:
        raise DataError(f"unknown --data_name {data_name!r}; choose one of {', '.join(DATA_NAMES)}")
    return name


def find_pairs(data_name: str, data_dir) -> tuple[list[Pair], dict[str, list[str]] | None]:
    """All pairs of the data set sorted by id, and its official split (name -> ids) when the layout has one.

    SYNTHETIC is generated on first use, so every caller sees the same files.
    """
    name = normalize_data_name(data_name)
    data_dir = Path(data_dir)
    ensure_dataset(name, data_dir)
    if name == "ISIC":
        pairs, official = _isic_pairs(data_dir)
    elif name in ("BRATS", "NIFTI"):  # one volumes.Case per volume: splits draw cases, never slices
        from guided_diffusion.data.volumes import find_cases

        pairs, official = find_cases(name, data_dir), None
    else:
        pairs, official = _folder_pairs(data_dir), None
    if not pairs:
        raise DataError(f"no image/mask pairs found in {data_dir}")
    return pairs, official


# --------------------------------------------------------------------------------------------- split


def make_split(ids, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> dict[str, list[str]]:
    """Seeded train/val/test split of the sorted ids: the same ids and seed always give the same split."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    ordered = sorted(set(map(str, ids)))
    n = len(ordered)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n >= 3:  # every part asked for is non-empty, and train keeps at least one id
        n_test = min(max(n_test, int(test_fraction > 0)), n - 2)
        n_val = min(max(n_val, int(val_fraction > 0)), n - 1 - n_test)
    elif n == 2:
        n_test, n_val = int(test_fraction > 0), 0
    else:
        n_test, n_val = 0, 0
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ordered[i] for i in order]
    return {
        "train": sorted(shuffled[n_test + n_val:]),
        "val": sorted(shuffled[n_test:n_test + n_val]),
        "test": sorted(shuffled[:n_test]),
    }


def make_fold_split(ids, folds: int, fold: int, seed: int = 0, val_fraction: float = 0.1) -> dict[str, list[str]]:
    """Fold `fold` of a seeded k-fold cross-validation (--folds k --fold i): the sorted ids, permuted by `seed`, are
    cut into k near-equal contiguous parts (sizes differ by at most one); part i is the test set, the first
    round(val_fraction * rest) of the other ids in permuted order the validation set, the others train. The k test
    sets are disjoint and cover every id once, so k runs score each image exactly once."""
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"--fold must be in [0, {folds - 1}] and --folds >= 2, got --fold {fold} --folds {folds}")
    ordered = sorted(set(map(str, ids)))
    if len(ordered) < folds + 1:
        raise ValueError(f"--folds {folds} needs more than {folds} ids, got {len(ordered)}")
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    bounds = [round(j * len(shuffled) / folds) for j in range(folds + 1)]
    test = shuffled[bounds[fold]:bounds[fold + 1]]
    rest = shuffled[:bounds[fold]] + shuffled[bounds[fold + 1]:]
    n_val = min(round(len(rest) * val_fraction), len(rest) - 1)
    return {"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": sorted(test)}


def _check_split(split: dict, path: Path) -> dict:
    """A loaded split must hold train/val/test lists of string ids that do not overlap."""
    if not isinstance(split, dict) or any(not isinstance(split.get(k), list) for k in SPLITS):
        raise DataError(f"split file {path} must be a JSON object with 'train', 'val' and 'test' lists of ids")
    seen: dict[str, str] = {}
    for key in SPLITS:
        for sample_id in split[key]:
            if not isinstance(sample_id, str):
                raise DataError(f"split file {path}: {key} holds a non-string id {sample_id!r}")
            if sample_id in seen:
                raise DataError(f"split file {path}: id {sample_id!r} is in both {seen[sample_id]} and {key}")
            seen[sample_id] = key
    return split


def save_split(split: dict, path) -> None:
    """Write the split as JSON atomically (temp file then ``os.replace``) so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(split, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_split(path) -> dict:
    """Read a split file written by ``save_split``; missing, corrupt or malformed -> DataError naming it."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read split file {path}: {_one_line(exc)}") from exc
    return _check_split(split, path)


def resolve_split(data_name, data_dir, split_file=None, seed: int = 0, folds: int = 0, fold: int = 0) -> dict:
    """The split to use: ``split_file`` when given, else the official split, else a seeded split (fold `fold` of a
    seeded k-fold cross-validation with ``folds`` = k >= 2; a data set with an official split is then an error).

    ISIC 2016 and any ISIC layout without a validation folder gives an official split with ``val == []``.
    """
    name = normalize_data_name(data_name)
    return _resolve(name, data_dir, *find_pairs(name, data_dir), split_file, seed, folds, fold)


def _resolve(name: str, data_dir, pairs: list[Pair], official: dict | None, split_file, seed: int,
             folds: int = 0, fold: int = 0) -> dict:
    """``resolve_split`` on pairs already found (so ``list_pairs`` scans the folders once)."""
    if split_file is not None:
        loaded = load_split(split_file)
        known = {p.id for p in pairs}
        unknown = [i for key in SPLITS for i in loaded[key] if i not in known]
        if unknown:
            raise DataError(f"split file {split_file} names {len(unknown)} id(s) absent from {data_dir}: "
                            f"{_examples(unknown)}")
        parts, source, seed = {k: sorted(loaded[k]) for k in SPLITS}, "file", loaded.get("seed", seed)
    elif official is not None:
        if folds:
            raise DataError(f"--folds {folds}: {data_dir} has an official {name} split; cross-validation is for "
                            f"data sets split by seed (KVASIR, FOLDER, SYNTHETIC, volumes), or give --folds 0")
        parts, source = official, "official"
    elif folds:
        parts, source = make_fold_split([p.id for p in pairs], folds, fold, seed), "fold"
        return {**parts, "source": source, "seed": seed, "folds": folds, "fold": fold, "data_name": name}
    else:
        parts, source = make_split([p.id for p in pairs], seed), "seeded"
    return {**parts, "source": source, "seed": seed, "data_name": name}


def list_pairs(data_name, data_dir, split: str = "test", split_file=None, seed: int = 0) -> list[Pair]:
    """The pairs of one split ("train", "val", "test" or "all"), sorted by id; an empty split is an error."""
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown split {split!r}; choose one of {', '.join((*SPLITS, 'all'))}")
    name = normalize_data_name(data_name)
    pairs, official = find_pairs(name, data_dir)
    if split == "all":
        return pairs
    wanted = set(_resolve(name, data_dir, pairs, official, split_file, seed)[split])
    chosen = [p for p in pairs if p.id in wanted]
    if not chosen:
        raise DataError(f"split {split!r} of {data_dir} is empty")
    return chosen


# ------------------------------------------------------------------------------------------- loading


def _open(path: Path, what: str, draft: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode an image file, with its full (width, height); any failure is a DataError naming it.

    ``draft`` (width, height) lets a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling), never below that size.
    """
    try:
        with Image.open(path) as img:
            full = img.size
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()
            return (img.copy() if img.mode != "P" else
                    img.convert("RGBA" if "transparency" in img.info else "RGB")), full
    except Exception as exc:  # PIL raises many types for corrupt or truncated files
        raise _unreadable(path, what, exc) from exc


def _unreadable(path: Path, what: str, exc: BaseException) -> DataError:
    """'<path>: cannot read the <what> (<reason>)', the path first, so it survives any wrapping of the message."""
    reason = _one_line(exc).replace(f"'{path}'", "").replace(str(path), "").replace("  ", " ").strip(" :")
    return DataError(f"{path}: cannot read the {what} ({reason or type(exc).__name__})")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / int / float single-channel images as 8-bit grayscale (PIL cannot convert them to RGB well)."""
    arr = np.asarray(img).astype(np.float64)
    scale = 257.0 if img.mode.startswith("I;16") else max(arr.max() / 255.0, 1.0)
    return Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8))


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith(("I", "F")):
        img = _high_depth_to_l(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path) -> Image.Image:
    """The image at ``path`` as RGB; grayscale, palette, RGBA and 16-bit files are accepted."""
    return _rgb(_open(Path(path), "image")[0])


def _mask_values(img: Image.Image) -> np.ndarray:
    """A decoded mask as one uint8 value per pixel.

    8-bit masks: their grayscale (as PIL converts it). Coloured RGB masks (red or blue foreground, whose
    grayscale would fall below the threshold): their brightest channel. 16-bit / int / float masks: their own
    values when all fit in 0..255 (label maps, 0/255 or 0/1 floats, rounded), else stretched so their largest
    value is 255 (a 0/65535 or 0/4095 mask reads as 0/255).
    """
    if img.mode.startswith(("I", "F")):
        arr = np.asarray(img).astype(np.float64)
        top = arr.max(initial=0)
        if top > 255:
            arr = arr * (255.0 / top)
        return np.clip(np.round(arr), 0, 255).astype(np.uint8)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[..., :3]
        brightest = rgb.max(axis=-1)
        if int((brightest - rgb.min(axis=-1)).max(initial=0)) > COLOUR_SPREAD:
            return brightest
    return np.asarray(img.convert("L"))


def _read_mask(path: Path, threshold: int = 128) -> tuple[np.ndarray, int]:
    """``load_mask``'s boolean mask and the largest value of the file (after ``_mask_values``)."""
    values = _mask_values(_open(path, "mask")[0])
    top = int(values.max(initial=0))
    if not 0 < top <= min(LABEL_MAX, threshold):
        return values > threshold, top
    if path.suffix.lower() in LOSSLESS_EXTS:
        _note("label map", f"note: {path} is a label map (largest value {top}): its foreground is label > 0, "
                           "as for every mask like it (noted once)")
        return values > 0, top
    level = int(np.bincount(values.ravel(), minlength=top + 1)[1:].argmax()) + 1  # flat interiors decode exactly
    _note("lossy label map", f"note: {path} is a label map saved with lossy compression (largest value {top}): its "
                             f"foreground is value > {level / 2:g}, half its most common non-zero value, as for "
                             "every mask like it (noted once)")
    return values > level / 2, top


def load_mask(path, threshold: int = 128) -> np.ndarray:
    """Boolean HxW mask: value > ``threshold`` (ISIC scorer rule; robust to JPEG noise), values as ``_mask_values``.

    A mask whose largest value is 1..LABEL_MAX (and not above ``threshold``) is a label map ({0,1}, {0,2},
    {0,1,2,4}...), which the threshold would read as empty: lossless files (PNG, TIFF, BMP, GIF) read as
    label > 0, lossy ones (JPEG, WebP) as value > half the most common non-zero value, robust to compression
    noise. The first such file is named once on stderr.
    """
    return _read_mask(Path(path), threshold)[0]


# ------------------------------------------------------------------------------------------- dataset


def _to_tensors(image: Image.Image, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """uint8 (3,H,W) image and uint8 (1,H,W) {0,1} mask, typed so v2 transforms treat each correctly."""
    return tv_tensors.Image(TF.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))[None])


def _augmentation(size: int, aspect: float) -> v2.Compose:
    """Joint random geometry (crop, flips, rotation) for image and mask; colour jitter touches the image only.

    Crops keep the aspect ratio around the source's own (``aspect`` = W/H) so the squash to a square
    matches the one seen without augmentation.
    """
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(aspect * 3 / 4, aspect * 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(20, interpolation=v2.InterpolationMode.BILINEAR,
                          fill={tv_tensors.Image: 0, tv_tensors.Mask: 0}),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
    ])


PRELOAD_SCALE = 2  # preloaded copies keep a short side of at least PRELOAD_SCALE * image_size
PRELOAD_AUTO_GIB = 4.0  # --preload auto: preload when the copies take at most this much RAM per process
PRELOAD_HELP = (f"decode the training images once, into RAM copies with a short side of {PRELOAD_SCALE} x image_size, "
                f"so the loader workers only augment: True, False, or auto (when the copies take <= "
                f"{PRELOAD_AUTO_GIB:g} GiB per process)")


def preload_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) of a preloaded copy: shrunk so the short side is PRELOAD_SCALE * image_size, never enlarged.

    Training crops keep at least 3/4 of the area before the final resize to image_size, so every crop of the
    copy still has more pixels than the output in each direction: the copy loses nothing the model sees.
    """
    scale = min(1.0, PRELOAD_SCALE * image_size / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class SegmentationDataset(Dataset):
    """Image/mask pairs as tensors at ``image_size`` x ``image_size``, optionally jointly augmented.

    Images are resized with antialiased bilinear interpolation, masks with nearest neighbour (never
    interpolated then thresholded, which dilates thin structures); ``orig_size`` lets predictions go back.
    ``preload()`` decodes every pair once into reduced in-memory copies, so loader workers only augment;
    ``check_masks()`` refuses a set whose masks are all empty. A file that cannot be read is a DataError whose
    message starts with its path, also from inside a DataLoader worker.
    """

    def __init__(self, pairs: list[Pair], image_size: int, augment: bool = False):
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.pairs = list(pairs)
        self.image_size = int(image_size)
        self.augment = augment
        self._cache: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] | None = None
        self._mask_info: list[tuple[bool, int]] | None = None  # per pair (has foreground, largest value)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The pair's image and boolean mask at original size; their sizes must agree."""
        pair = self.pairs[index]
        image, mask = load_image(pair.image), load_mask(pair.mask)
        _check_same_size(pair, image.size, mask)
        return image, mask

    def _naming_files(self, fn, index: int):
        """fn(index), where anything but a DataError that goes wrong reading a pair becomes one naming its files."""
        try:
            return fn(index)
        except (DataError, MemoryError):
            raise
        except Exception as exc:
            pair = self.pairs[index]
            raise DataError(f"{pair.image}: cannot load it with its mask {pair.mask} "
                            f"({type(exc).__name__}: {_one_line(exc)})") from exc

    def _decode_reduced(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[bool, int]]:
        """One pair as a preloaded copy: uint8 image (3,h,w), uint8 mask (1,h,w), original (H, W), and the
        full-size mask's (has foreground, largest value) for ``check_masks``."""
        pair = self.pairs[index]
        mask, top = _read_mask(pair.mask)
        height, width = mask.shape
        h, w = preload_shape(height, width, self.image_size)
        image, full_size = _open(pair.image, "image", draft=(w, h))
        _check_same_size(pair, full_size, mask)
        img_t, mask_t = _to_tensors(_rgb(image), mask)
        if (h, w) != (height, width) or img_t.shape[-2:] != (h, w):
            img_t = TF.resize(img_t, [h, w], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            mask_t = TF.resize(mask_t, [h, w], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        facts = (bool(mask.any()), top)
        return img_t.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor), (height, width), facts

    def preload_bytes(self) -> int:
        """RAM the preloaded copies would take, from the files' headers (nothing is decoded)."""
        total = 0
        for pair in self.pairs:
            try:
                with Image.open(pair.mask) as img:
                    width, height = img.size
            except Exception as exc:
                raise _unreadable(pair.mask, "mask", exc) from exc
            h, w = preload_shape(height, width, self.image_size)
            total += 4 * h * w  # 3 image channels + 1 mask channel, uint8
        return total

    def preload(self, threads: int | None = None, progress: bool = True) -> int:
        """Decode every pair once (threads in parallel: decoding releases the GIL); returns the bytes held.

        Loader workers forked afterwards share the copies; bad files are reported here, before training.
        """
        decoded = _threaded(lambda i: self._naming_files(self._decode_reduced, i), len(self.pairs), threads,
                            "preload", progress)
        self._cache = [item[:3] for item in decoded]
        self._mask_info = [item[3] for item in decoded]
        return sum(img.numel() + mask.numel() for img, mask, _ in self._cache)

    def _mask_facts(self, index: int) -> tuple[bool, int]:
        mask, top = _read_mask(self.pairs[index].mask)
        return bool(mask.any()), top

    def check_masks(self, threads: int | None = None, progress: bool = True, log=print, what: str = "training") -> int:
        """The number of empty masks (said once through ``log``); every mask empty is a DataError naming the folder.

        Uses what ``preload()`` saw, else reads every mask once (threads in parallel).
        """
        info = self._mask_info
        if info is None:
            info = _threaded(self._mask_facts, len(self.pairs), threads, "check masks", progress)
        empty = [pair for pair, (nonempty, _) in zip(self.pairs, info) if not nonempty]
        if self.pairs and len(empty) == len(self.pairs):
            folders = _examples({str(pair.mask.parent) for pair in self.pairs})
            top = max(t for _, t in info)
            why = ("every pixel is 0" if top == 0 else
                   f"no value above 128, and their largest, {top}, is too large for a label map")
            raise DataError(f"all {len(empty)} {what} masks in {folders} are empty ({why}): nothing to learn; "
                            f"foreground must be > 128 (0/255 masks) or a label 1..{LABEL_MAX} (label maps)")
        if empty:
            log(f"note: {len(empty)} of {len(self.pairs)} {what} masks are empty (no foreground): "
                f"{_examples(pair.mask.name for pair in empty)}")
        return len(empty)

    def __getitem__(self, index: int) -> dict:
        if self._cache is not None:
            img, mask, (height, width) = self._cache[index]
            img_t, mask_t = tv_tensors.Image(img), tv_tensors.Mask(mask)
        else:
            image, mask = self._naming_files(self.load, index)
            height, width = mask.shape
            img_t, mask_t = _to_tensors(image, mask)
        size = [self.image_size, self.image_size]
        if self.augment:
            img_t, mask_t = _augmentation(size, width / height)(img_t, mask_t)
        else:
            img_t = TF.resize(img_t, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            mask_t = TF.resize(mask_t, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
        return {
            "image": img_t.as_subclass(torch.Tensor).float().div_(255.0).clamp_(0.0, 1.0),
            "mask": (mask_t.as_subclass(torch.Tensor) > 0).float(),
            "id": self.pairs[index].id,
            "orig_size": torch.tensor([height, width], dtype=torch.long),
        }


def _check_same_size(pair: Pair, image_size: tuple[int, int], mask: np.ndarray) -> None:
    """The image's (width, height) must be the mask's."""
    if (image_size[1], image_size[0]) != mask.shape:
        raise DataError(f"image {pair.image} is {image_size[0]}x{image_size[1]} "
                        f"but mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]}")


def _threaded(fn, count: int, threads: int | None, desc: str, progress: bool) -> list:
    """[fn(0), ..., fn(count - 1)] on a thread pool (decoding releases the GIL), with a progress bar."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, threads or available_cpus())) as pool:
        return list(progress_bar(pool.map(fn, range(count)), total=count, desc=desc, unit="img",
                                 disable=not progress))


def available_cpus() -> int:
    """CPU cores this process may use, shared among the processes torchrun starts on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def preload_choice(mode) -> str:
    """--preload as auto, true or false; anything else is a one-line error naming the flag."""
    choice = str(mode).strip().lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"--preload must be auto, True or False, got {mode!r}")
    return choice


def _size_text(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.1f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.0f} MiB"


def maybe_preload(dataset: SegmentationDataset, mode, log=print, progress: bool = True) -> bool:
    """--preload auto|True|False for a training set: preload it (auto: when the copies fit PRELOAD_AUTO_GIB).

    Either way the masks are checked before training (``check_masks``): all empty is a DataError, some
    empty is one note through ``log``.
    """
    choice = preload_choice(mode)
    preload = choice != "false"
    need = dataset.preload_bytes() if choice == "auto" else 0  # True: no estimate needed
    if need > PRELOAD_AUTO_GIB * 2 ** 30:
        log(f"not preloading the {len(dataset)} training images: their copies would take {_size_text(need)} "
            f"(> {PRELOAD_AUTO_GIB:g} GiB per process); --preload True forces it")
        preload = False
    if preload:
        start = time.perf_counter()
        held = dataset.preload(progress=progress)
        log(f"preloaded {len(dataset)} training pairs in {time.perf_counter() - start:.1f} s: {_size_text(held)} "
            f"in RAM (short side at most {PRELOAD_SCALE * dataset.image_size} px)")
    dataset.check_masks(progress=progress, log=log)
    return preload


# ----------------------------------------------------------------------------------------- synthetic


def _synthetic_meta(num_images: int, seed: int) -> dict:
    """What identifies a generated set: generator version, its knobs, size and seed."""
    return {"generator": "guided_diffusion.synthetic", "version": synthetic.GENERATOR_VERSION,
            "num_images": int(num_images), "seed": int(seed), "config": synthetic.SynthConfig().to_dict()}


def _check_synthetic(data_dir: Path, meta: dict) -> bool:
    """True when ``data_dir`` already holds this very set; DataError when it holds something else."""
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        if data_dir.is_dir() and any(data_dir.iterdir()):
            raise DataError(f"{data_dir} is not empty and has no meta.json, so it is not a synthetic set; "
                            "use another --data_dir")
        return False
    try:
        found = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {meta_path}: {_one_line(exc)}") from exc
    if found != meta:
        raise DataError(f"{meta_path} describes another synthetic set ({found.get('num_images')} images, "
                        f"seed {found.get('seed')}, version {found.get('version')}); use another --data_dir")
    return True


def make_synthetic(data_dir, num_images: int = 240, seed: int = 0) -> Path:
    """Write the built-in synthetic set (FOLDER layout + meta.json) into ``data_dir`` unless it is there.

    Generated beside ``data_dir`` and renamed into place in one step, so an interrupted or concurrent
    run never leaves a half-written set behind.
    """
    data_dir = Path(data_dir)
    meta = _synthetic_meta(num_images, seed)
    if _check_synthetic(data_dir, meta):
        return data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_dir.parent / f".{data_dir.name}.{uuid.uuid4().hex}.tmp"  # unique across processes and nodes
    try:
        synthetic.write_synthetic(tmp, num_images, seed)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.replace(tmp, data_dir)  # atomic; succeeds onto an absent or empty directory
        except OSError:
            if not _check_synthetic(data_dir, meta):  # someone else finished first, or a real clash
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_dir


def ensure_dataset(data_name, data_dir) -> None:
    """Make the data usable: generate the default SYNTHETIC set when absent; for the others, the folder must exist."""
    name = normalize_data_name(data_name)
    data_dir = Path(data_dir)
    if name == "SYNTHETIC":
        if not (data_dir / "meta.json").is_file():  # any generated set is accepted as it is
            make_synthetic(data_dir)
    elif not data_dir.is_dir():
        raise DataError(f"--data_dir not found: {data_dir}")
