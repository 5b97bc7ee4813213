"""NIfTI volumes (BraTS and Medical Segmentation Decathlon / nnU-Net layouts) as 2-D slices.

Two layouts, each a list of cases (``Case``; a case is what the split draws, never a slice, so no case has slices
on both sides of the split):
  BRATS   <data_dir>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (BraTS 2020/2021); ``--modalities`` picks the
          channels by their file suffix (default t1,t1ce,t2,flair), the label is ``<case>_seg``.
  NIFTI   <data_dir>/imagesTr/<case>.nii.gz (4-D, channels last; or 3-D, one channel) or
          <data_dir>/imagesTr/<case>_0000.nii.gz, _0001, ... (one file per channel), labels in
          <data_dir>/labelsTr/<case>.nii.gz; ``--modalities`` picks channels by index or by the names in
          dataset.json ("modality" of the Decathlon, "channel_names" of nnU-Net v2); default: all.
The foreground is label > 0 (BraTS: the whole tumour), or the labels ``--labels`` lists. Every channel is
normalised per volume: clipped to its ``--norm_percentiles`` percentiles over its nonzero voxels, then z-scored on
those voxels (mean 0, std 1 there); the background (zero) stays 0. Slices are taken along ``--slice_axis`` (default 2,
the axial axis of both layouts) and resized to the network's square, images bilinearly, masks by nearest neighbour.
Problems with the files are one-line ``DataError``s naming the file or flag.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from guided_diffusion.data.datasets import DataError, _examples, _one_line, _threaded

VOLUME_DATA_NAMES = ("BRATS", "NIFTI")
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS_LABEL = "seg"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
AXES = (0, 1, 2)
DEFAULT_PERCENTILES = "0.5,99.5"


def is_volume_data(data_name) -> bool:
    """Whether ``--data_name`` is one of the NIfTI layouts."""
    return str(data_name).upper() in VOLUME_DATA_NAMES


def nifti_stem(path: Path) -> str | None:
    """The name of a NIfTI file less .nii.gz / .nii; None for any other file."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder`` (hidden and AppleDouble files left out), sorted."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and nifti_stem(p) is not None)


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One volume of a data set: its id, its channel files and its label file.

    ``channels`` maps a channel name to (file, index in that file's 4th axis, or -1 for a 3-D file): BRATS names
    are the modality suffixes (t1, t1ce, ...); NIFTI names are "0", "1", ... (per-channel files, or 4-D ones whose
    channels are only known once the header is read: then ``channels`` is empty and ``four_d`` set).
    """

    id: str
    channels: tuple[tuple[str, Path, int], ...]
    mask: Path
    four_d: Path | None = None

    @property
    def image(self) -> Path:
        """The first image file (the one whose header and affine the predictions copy)."""
        return self.four_d if self.four_d is not None else self.channels[0][1]


def _brats_cases(data_dir: Path) -> list[Case]:
    """BRATS: one folder per case holding <case>_<modality>.nii.gz and <case>_seg.nii.gz."""
    cases, unlabelled = [], []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {}
        for path in nifti_files(folder):
            stem = nifti_stem(path)
            if not stem.startswith(folder.name + "_"):
                continue
            files[stem[len(folder.name) + 1:].lower()] = path
        if not files:
            continue
        if BRATS_LABEL not in files:
            unlabelled.append(folder.name)
            continue
        label = files.pop(BRATS_LABEL)
        cases.append(Case(folder.name, tuple((name, path, -1) for name, path in sorted(files.items())), label))
    if unlabelled:
        raise DataError(f"{len(unlabelled)} BraTS case folder(s) in {data_dir} without a label "
                        f"<case>_{BRATS_LABEL}.nii.gz: {_examples(unlabelled)} (cases without ground truth cannot be "
                        "trained or scored)")
    if not cases:
        raise DataError(f"no BraTS cases in {data_dir}: expected folders <case>/ holding <case>_t1.nii.gz, "
                        f"<case>_t1ce.nii.gz, <case>_t2.nii.gz, <case>_flair.nii.gz and <case>_{BRATS_LABEL}.nii.gz")
    return cases


def _nifti_cases(data_dir: Path) -> list[Case]:
    """NIFTI: labelsTr/<case>.nii.gz with imagesTr/<case>.nii.gz (4-D or 3-D) or imagesTr/<case>_XXXX.nii.gz."""
    image_dir, label_dir = data_dir / "imagesTr", data_dir / "labelsTr"
    for folder, what in ((image_dir, "imagesTr/"), (label_dir, "labelsTr/")):
        if not folder.is_dir():
            raise DataError(f"{what} folder not found: {folder} (--data_name NIFTI is the Decathlon / nnU-Net layout "
                            "imagesTr/ + labelsTr/)")
    images = {nifti_stem(p): p for p in nifti_files(image_dir)}
    cases, lonely = [], []
    for label in nifti_files(label_dir):
        case = nifti_stem(label)
        if case in images:
            cases.append(Case(case, (), label, four_d=images[case]))
            continue
        per_channel = sorted((stem[len(case) + 1:], path) for stem, path in images.items()
                             if stem.startswith(case + "_") and stem[len(case) + 1:].isdigit()
                             and len(stem) - len(case) - 1 == 4)
        if not per_channel:
            lonely.append(label.name)
            continue
        numbers = [int(k) for k, _ in per_channel]
        if numbers != list(range(len(numbers))):
            raise DataError(f"{image_dir}: the channel files of case {case!r} are numbered "
                            f"{', '.join(k for k, _ in per_channel)}; expected _0000, _0001, ... without gaps")
        cases.append(Case(case, tuple((str(int(k)), path, -1) for k, path in per_channel), label))
    if lonely:
        raise DataError(f"{len(lonely)} label(s) in {label_dir} without an image in {image_dir} (<case>.nii.gz or "
                        f"<case>_0000.nii.gz): {_examples(lonely)}")
    if not cases:
        raise DataError(f"no labelled cases in {data_dir}: labelsTr/ holds no .nii.gz files")
    return cases


def find_cases(data_name: str, data_dir) -> list[Case]:
    """All cases of a BRATS or NIFTI folder, sorted by id."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data_dir not found: {data_dir}")
    cases = _brats_cases(data_dir) if str(data_name).upper() == "BRATS" else _nifti_cases(data_dir)
    return sorted(cases, key=lambda c: c.id)


# ---------------------------------------------------------------------------------------------- reading


def _import_nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - a dependency (requirement.txt)
        raise DataError("reading NIfTI volumes needs nibabel: pip install 'nibabel>=5,<6'") from exc
    return nibabel


def open_nifti(path: Path):
    """The NIfTI image at ``path`` (header read; data read lazily); DataError naming it when it cannot be read."""
    nib = _import_nibabel()
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, EOFError, zlib errors...
        raise DataError(f"{path}: cannot read the NIfTI volume ({_one_line(exc) or type(exc).__name__})") from exc


def read_array(img, path: Path) -> np.ndarray:
    """The voxel array of a loaded image (scaled by its slope/intercept), trailing singleton axes past 3 dropped."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # a truncated .nii.gz fails here, not at load
        raise DataError(f"{path}: cannot read the NIfTI volume ({_one_line(exc) or type(exc).__name__})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def spatial_shape(img, path: Path) -> tuple[int, int, int]:
    """The 3-D shape from a header; a 2-D file (or one with fewer than two voxels along an axis) is a DataError."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 1:
        raise DataError(f"{path}: a {len(shape)}-D image of shape {'x'.join(map(str, shape))}; volumes must be 3-D "
                        "(or 4-D with the channels last)")
    return shape[:3]


def channel_names(data_name: str, data_dir, cases: list[Case]) -> list[str]:
    """The channels a data set offers: BRATS, the modality suffixes found in its case folders (the standard four
    first); NIFTI, the names of dataset.json (else "0", "1", ...) for the channel count of the first case."""
    if str(data_name).upper() == "BRATS":
        found = sorted({name for case in cases for name, _, _ in case.channels})
        return [m for m in BRATS_MODALITIES if m in found] + [m for m in found if m not in BRATS_MODALITIES]
    count = _nifti_channel_count(cases[0])
    names = _dataset_json_names(Path(data_dir))
    return [names.get(str(k), str(k)) for k in range(count)]


def _nifti_channel_count(case: Case) -> int:
    if case.four_d is None:
        return len(case.channels)
    img = open_nifti(case.four_d)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        spatial_shape(img, case.four_d)  # its own message
    return int(shape[3]) if len(shape) >= 4 else 1


def _dataset_json_names(data_dir: Path) -> dict[str, str]:
    """Channel index -> name from dataset.json ("modality" or "channel_names"), {} when there is none."""
    path = data_dir / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {_one_line(exc)}") from exc
    names = meta.get("channel_names") or meta.get("modality") or {}
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}


# ---------------------------------------------------------------------------------------------- settings


def parse_labels(spec: str) -> tuple[int, ...]:
    """'--labels 1,4' -> (1, 4); '' -> () (every label > 0)."""
    spec = str(spec or "").strip()
    if not spec:
        return ()
    try:
        labels = tuple(sorted({int(s) for s in spec.split(",") if s.strip()}))
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integer labels, got {spec!r}") from None
    if any(v <= 0 for v in labels):
        raise ValueError(f"--labels lists foreground labels, all > 0 (0 is the background), got {spec!r}")
    return labels


def foreground_text(labels: tuple[int, ...]) -> str:
    """What the foreground is, in words: 'label > 0' or 'label in {1, 4}'."""
    return "label > 0" if not labels else "label in {" + ", ".join(map(str, labels)) + "}"


def parse_percentiles(spec: str) -> tuple[float, float]:
    """'--norm_percentiles 0.5,99.5' -> (0.5, 99.5), 0 <= low < high <= 100."""
    try:
        low, high = (float(s) for s in str(spec).split(","))
    except ValueError:
        raise ValueError(f"--norm_percentiles must be two numbers LOW,HIGH (e.g. {DEFAULT_PERCENTILES}), "
                         f"got {spec!r}") from None
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"--norm_percentiles must satisfy 0 <= LOW < HIGH <= 100, got {spec!r}")
    return low, high


def parse_skip_empty(spec) -> float:
    """--skip_empty_slices: the fraction of empty-mask training slices left out; True is 1 (all), False 0."""
    text = str(spec).strip().lower()
    if text in ("true", "yes"):
        return 1.0
    if text in ("false", "no", ""):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--skip_empty_slices must be True, False or a fraction in [0, 1] of the empty training "
                         f"slices to leave out, got {spec!r}")
    return value


def check_slice_axis(axis) -> int:
    if int(axis) not in AXES:
        raise ValueError(f"--slice_axis must be 0, 1 or 2 (an axis of the 3-D volume; 2 is axial), got {axis}")
    return int(axis)


@dataclass(frozen=True)
class VolumeSpec:
    """How a data set's volumes become network inputs: which channels (by name, and where each lives), which labels
    are foreground, the slice axis and the normalisation; built from the DataConfig and checked against the files."""

    data_name: str
    data_dir: Path
    modalities: tuple[str, ...]
    labels: tuple[int, ...]
    slice_axis: int
    percentiles: tuple[float, float]
    skip_empty: float = 0.0
    available: tuple[str, ...] = ()  # every channel the data set offers (NIFTI: in index order)

    @property
    def foreground(self) -> str:
        return foreground_text(self.labels)

    def record(self) -> dict:
        """What the prediction folder's sampling.json records of the volumes' settings."""
        return {"modalities": ",".join(self.modalities), "labels": ",".join(map(str, self.labels)),
                "slice_axis": self.slice_axis, "norm_percentiles": ",".join(f"{p:g}" for p in self.percentiles)}


def resolve_modalities(spec: str, data_name: str, data_dir, cases: list[Case],
                       available: list[str] | None = None) -> tuple[str, ...]:
    """--modalities resolved against the data: BRATS names (default t1,t1ce,t2,flair); NIFTI names of dataset.json
    or channel indices (default all). An unknown name is a one-line error listing the ones there are."""
    available = list(available) if available is not None else channel_names(data_name, data_dir, cases)
    wanted = [s.strip() for s in str(spec or "").split(",") if s.strip()]
    if str(data_name).upper() == "BRATS":
        wanted = [w.lower() for w in wanted] or list(BRATS_MODALITIES)
    elif not wanted:
        return tuple(available)
    chosen = []
    for name in wanted:
        match = _match_channel(name, available, str(data_name).upper())
        if match is None:
            raise ValueError(f"--modalities: unknown modality {name!r}; the {str(data_name).upper()} cases in "
                             f"{data_dir} have {', '.join(available)}")
        if match in chosen:
            raise ValueError(f"--modalities names {match!r} twice")
        chosen.append(match)
    return tuple(chosen)


def _match_channel(name: str, available: list[str], data_name: str) -> str | None:
    if data_name == "BRATS":
        return name if name in available else None
    for channel in available:
        if channel.lower() == name.lower():
            return channel
    if name.isdigit() and int(name) < len(available):
        return available[int(name)]
    return None


def volume_spec(data_cfg, cases: list[Case] | None = None) -> VolumeSpec:
    """The VolumeSpec of a DataConfig (its --modalities resolved against the folder's cases)."""
    if cases is None:
        cases = find_cases(data_cfg.data_name, data_cfg.data_dir)
    available = tuple(channel_names(data_cfg.data_name, data_cfg.data_dir, cases))
    return VolumeSpec(
        data_name=str(data_cfg.data_name).upper(), data_dir=Path(data_cfg.data_dir),
        modalities=resolve_modalities(data_cfg.modalities, data_cfg.data_name, data_cfg.data_dir, cases, available),
        labels=parse_labels(data_cfg.labels), slice_axis=check_slice_axis(data_cfg.slice_axis),
        percentiles=parse_percentiles(data_cfg.norm_percentiles), skip_empty=parse_skip_empty(data_cfg.skip_empty_slices),
        available=available)


def configure(model_cfg, data_cfg) -> None:
    """Before training: for BRATS/NIFTI, fix --modalities to the resolved channel names (so the checkpoint records
    them) and --image_channels to their number; for images, 3. A contradicting --image_channels is an error."""
    if is_volume_data(data_cfg.data_name):
        spec = volume_spec(data_cfg)
        data_cfg.modalities = ",".join(spec.modalities)
        data_cfg.labels = ",".join(map(str, spec.labels))
        channels, why = len(spec.modalities), f"the {len(spec.modalities)} --modalities {data_cfg.modalities}"
    else:
        channels, why = 3, f"the RGB images of --data_name {data_cfg.data_name}"
    if model_cfg.image_channels not in (0, channels):
        raise ValueError(f"--image_channels {model_cfg.image_channels} contradicts {why} ({channels} channels); "
                         f"leave it at 0 (from the data)")
    model_cfg.image_channels = channels


# ---------------------------------------------------------------------------------------------- volumes


@dataclass
class Volume:
    """One case read and normalised: image (C, X, Y, Z) float32, foreground mask (X, Y, Z) bool (None when not
    read), and the first image file's NIfTI image (header and affine, for writing predictions)."""

    id: str
    image: np.ndarray
    mask: np.ndarray | None
    source: object
    source_path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])


def normalize_channel(x: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Per-volume intensity normalisation of one channel: clip the nonzero voxels to their [low, high] percentiles,
    then z-score them (mean 0, std 1 over the nonzero voxels); zero voxels (outside the head) stay 0. A channel
    without nonzero voxels, or a constant one, is all 0."""
    x = np.asarray(x, dtype=np.float32)
    inside = x != 0
    out = np.zeros_like(x, dtype=np.float32)
    if not inside.any():
        return out
    values = x[inside].astype(np.float64)
    lo, hi = np.percentile(values, [low, high])
    values = np.clip(values, lo, hi)
    std = values.std()
    if std > 0:
        out[inside] = ((values - values.mean()) / std).astype(np.float32)
    return out


def _channel_sources(case: Case, spec: VolumeSpec) -> list[tuple[str, Path, int]]:
    """(name, file, index) of each channel of --modalities in this case; a missing modality file is a DataError."""
    if case.four_d is not None:
        names = [_channel_name(spec, k) for k in range(_nifti_channel_count(case))]
        index = {n: k for k, n in enumerate(names)}
        missing = [m for m in spec.modalities if m not in index]
        if missing:
            raise DataError(f"{case.four_d}: has {len(names)} channel(s) ({', '.join(names)}), no "
                            f"{', '.join(missing)} of --modalities {','.join(spec.modalities)}")
        return [(m, case.four_d, index[m] if len(names) > 1 else -1) for m in spec.modalities]
    by_name = {name: (name, path, k) for name, path, k in case.channels}
    if spec.data_name == "NIFTI":  # per-channel files are numbered; dataset.json may name the numbers
        by_name = {_channel_name(spec, int(n)): (n, path, k) for n, path, k in case.channels}
    sources = []
    for m in spec.modalities:
        if m not in by_name:
            expected = (case.mask.parent / f"{case.id}_{m}.nii.gz" if spec.data_name == "BRATS" else
                        case.mask.parent.parent / "imagesTr" / f"{case.id}_{spec.available.index(m):04d}.nii.gz")
            raise DataError(f"{expected}: missing modality file ({m} of --modalities {','.join(spec.modalities)}) "
                            f"of case {case.id}")
        sources.append(by_name[m])
    return sources


def _channel_name(spec: VolumeSpec, index: int) -> str:
    """The name of NIFTI channel ``index`` (dataset.json's, else the number)."""
    return spec.available[index] if index < len(spec.available) else str(index)


def load_label(path: Path, labels: tuple[int, ...] = (), shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """The foreground of a label volume as bool (X, Y, Z): label > 0, or label in ``labels``; its shape must be
    ``shape`` (its image's) when given."""
    img = open_nifti(path)
    got = spatial_shape(img, path)
    data = read_array(img, path)
    if data.ndim != 3:
        raise DataError(f"{path}: a label volume must be 3-D, got shape {'x'.join(map(str, data.shape))}")
    if shape is not None and got != tuple(shape):
        raise DataError(f"label volume {path} is {'x'.join(map(str, got))} but its image is "
                        f"{'x'.join(map(str, shape))}")
    values = np.rint(np.asarray(data, dtype=np.float64)).astype(np.int64)
    return np.isin(values, labels) if labels else values > 0


def load_case(case: Case, spec: VolumeSpec, with_mask: bool = True) -> Volume:
    """A case's selected channels, normalised (``normalize_channel``), and its foreground mask; every channel and
    the label must have one shape."""
    channels, source, first, shape = [], None, None, None
    opened: dict[Path, tuple[object, np.ndarray]] = {}
    for name, path, index in _channel_sources(case, spec):
        if path not in opened:
            img = open_nifti(path)
            spatial_shape(img, path)
            opened[path] = (img, read_array(img, path))
        img, data = opened[path]
        if index < 0 and data.ndim != 3:
            raise DataError(f"{path}: a {data.ndim}-D volume of shape {'x'.join(map(str, data.shape))} where one "
                            f"3-D channel ({name}) was expected")
        if index >= 0 and (data.ndim != 4 or index >= data.shape[3]):
            raise DataError(f"{path}: no channel {index} ({name}) along its 4th axis (shape "
                            f"{'x'.join(map(str, data.shape))})")
        arr = data if index < 0 else data[..., index]
        if source is None:
            source, first, shape = img, path, arr.shape
        elif arr.shape != shape:
            raise DataError(f"{path} is {'x'.join(map(str, arr.shape))} but {first} of the same case is "
                            f"{'x'.join(map(str, shape))}")
        channels.append(normalize_channel(arr, *spec.percentiles))
    mask = load_label(case.mask, spec.labels, shape) if with_mask else None
    return Volume(case.id, np.stack(channels), mask, source, first)


# ---------------------------------------------------------------------------------------------- slices


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """(C, X, Y, Z) -> (S, C, a, b), or (X, Y, Z) -> (S, a, b): the slices along spatial ``axis`` in order."""
    offset = volume.ndim - 3
    return np.moveaxis(volume, axis + offset, 0)


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``to_slices`` for (S, a, b) -> (X, Y, Z)."""
    return np.moveaxis(slices, 0, axis)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(S, C, a, b) float -> (S, C, size, size): bilinear, antialiased when shrinking (as the 2-D images)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = images.shape[-2] > size or images.shape[-1] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(S, 1, a, b) {0,1} -> (S, 1, size, size) by nearest neighbour (never interpolated, so never dilated)."""
    if tuple(masks.shape[-2:]) == (size, size):
        return masks
    return F.interpolate(masks, size=(size, size), mode="nearest-exact")


def slice_tensors(volume: Volume, axis: int, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A volume's slices as network inputs: images (S, C, size, size) float32 and masks (S, 1, size, size) {0,1}."""
    images = resize_images(torch.from_numpy(np.ascontiguousarray(to_slices(volume.image, axis))), size)
    masks = None
    if volume.mask is not None:
        m = torch.from_numpy(np.ascontiguousarray(to_slices(volume.mask, axis))).float()[:, None]
        masks = resize_masks(m, size)
    return images, masks


def keep_slice(case_id: str, index: int, nonempty: bool, skip_empty: float) -> bool:
    """Whether a training slice is kept: every slice with foreground; an empty one unless it falls in the seeded
    ``skip_empty`` fraction (the same slices in every run and process)."""
    if nonempty or skip_empty <= 0:
        return True
    if skip_empty >= 1:
        return False
    u = zlib.crc32(f"{case_id}:{index}".encode()) / 2 ** 32
    return u >= skip_empty


class VolumeSliceDataset(Dataset):
    """The training slices of some cases, read once (``load``) into RAM at the network's size (float16 images).

    Slices whose channels are all zero (outside the head) are left out, as are the ``skip_empty`` fraction of the
    slices whose mask is empty. Items are the 2-D loader's: image (C, S, S) float z-scores, mask (1, S, S) {0, 1},
    id "<case>@<slice>", orig_size (a, b).
    """

    def __init__(self, cases: list[Case], spec: VolumeSpec, image_size: int, augment: bool = False):
        self.cases, self.spec, self.image_size, self.augment = list(cases), spec, int(image_size), augment
        self.images: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.index: list[tuple[str, int, tuple[int, int]]] = []

    def _read(self, k: int):
        case = self.cases[k]
        volume = load_case(case, self.spec)
        images, masks = slice_tensors(volume, self.spec.slice_axis, self.image_size)
        inside = images.flatten(1).abs().amax(1) > 0
        nonempty = masks.flatten(1).amax(1) > 0
        keep = [s for s in range(images.shape[0]) if bool(inside[s] or nonempty[s])
                and keep_slice(case.id, s, bool(nonempty[s]), self.spec.skip_empty)]
        orig = tuple(int(v) for v in to_slices(volume.mask, self.spec.slice_axis).shape[1:])
        return images[keep].half(), masks[keep].to(torch.uint8), [(case.id, s, orig) for s in keep]

    def load(self, progress: bool = True, log=print) -> int:
        """Read, normalise and slice every case (threads in parallel); returns the bytes held. All training masks
        empty is a DataError."""
        read = _threaded(self._read, len(self.cases), None, "read volumes", progress)
        self.images = torch.cat([r[0] for r in read]) if read else torch.empty(0)
        self.masks = torch.cat([r[1] for r in read]) if read else torch.empty(0)
        self.index = [entry for r in read for entry in r[2]]
        foreground = int((self.masks.flatten(1).amax(1) > 0).sum()) if len(self.index) else 0
        if not foreground:
            raise DataError(f"no foreground ({self.spec.foreground}) in the label volumes of the "
                            f"{len(self.cases)} training cases in {self.spec.data_dir} (e.g. "
                            f"{self.cases[0].mask if self.cases else '-'}): nothing to learn; check --labels")
        held = self.images.numel() * 2 + self.masks.numel()
        log(f"read {len(self.cases)} training volumes ({self.spec.data_name}, --modalities "
            f"{','.join(self.spec.modalities)}, foreground {self.spec.foreground}, --slice_axis "
            f"{self.spec.slice_axis}): {len(self.index)} slices, {foreground} with foreground, "
            f"{held / 2 ** 20:.0f} MiB in RAM")
        return held

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        image, mask = self.images[k].float(), self.masks[k].float()
        if self.augment:
            image, mask = _augment(image, mask)
        case, s, orig = self.index[k]
        return {"image": image, "mask": mask, "id": f"{case}@{s}", "orig_size": torch.tensor(orig, dtype=torch.long)}


def _augment(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint random flips and a small rotation/scale (torch's RNG, seeded per item by the training stream); no
    intensity changes (the channels are z-scores)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                            v2.RandomAffine(degrees=15, scale=(0.9, 1.1),
                                            interpolation=v2.InterpolationMode.BILINEAR)])
    img, msk = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return img.as_subclass(torch.Tensor), (msk.as_subclass(torch.Tensor) > 0.5).float()


def training_slices(cases: list[Case], data_cfg, image_size: int, augment: bool, log=print,
                    progress: bool = True) -> VolumeSliceDataset:
    """The training stream's dataset for BRATS/NIFTI: the slices of the training cases, read once."""
    dataset = VolumeSliceDataset(cases, volume_spec(data_cfg), image_size, augment)
    dataset.load(progress=progress, log=log)
    return dataset


# ---------------------------------------------------------------------------------------------- writing


def nifti_bytes(data: np.ndarray, like, path: Path) -> bytes:
    """The file bytes of ``data`` (3-D) as a NIfTI image with ``like``'s affine, header (units, orientation codes,
    description) and voxel sizes, in data's dtype without scaling; gzip-compressed when ``path`` ends in .gz."""
    nib = _import_nibabel()
    cls = type(like) if isinstance(like, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    header = like.header.copy() if isinstance(like, (nib.Nifti1Image, nib.Nifti2Image)) else None
    if header is not None:
        zooms = header.get_zooms()[:3]
        header.set_data_shape(data.shape)
        header.set_zooms(zooms)
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        header.set_intent("none")
    out = cls(data, like.affine, header=header)
    out.set_qform(like.get_qform(), int(like.header["qform_code"]) if header is not None else 1)
    out.set_sform(like.get_sform(), int(like.header["sform_code"]) if header is not None else 1)
    raw = out.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if str(path).lower().endswith(".gz") else raw
