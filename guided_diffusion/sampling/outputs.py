"""Writing the sampler's prediction folder (the README's "Sample" section; layout.py).

Layout under out_dir:
    <id>.png               binary mask, 0/255 8-bit grayscale, at the source image's original size
    prob/<id>.png          fused foreground probability, 0..255 for 0..1, original size
    uncertainty/<id>.png   uncertainty map, 0..255 for 0..1, original size
    overlays/<id>.png      (when asked) mask contour and uncertainty tint on the source image
    manifest.csv           one row per id: id, sampler, steps, nfe, seconds (+ any extra keys)
    sampling.json          the settings the masks were sampled with (model, sampler, members, seed...)

The ISIC challenge scorer pairs each ground truth with the one top-level file whose name holds
its 7-digit number, so the top level holds only the masks and files whose names carry no id:
temporary files are hidden, named from random letters only (never digits), end in no image
suffix, and are renamed away before a write returns. Every file is written to a temporary name
in its final folder and moved into place with os.replace, so a reader or an interrupted run
never sees a half-written file; the top-level mask is written last, and its manifest row right after it, so
`done(id)` (every file and the row) implies that everything of that id is on disk. A run killed between the mask
and its row leaves a mask without a row: a resumed run samples that image again, so the manifest holds exactly
one row per mask.

The folder-level helpers below keep one folder to one set of settings (sampling.json): a run with other
settings stops before writing (`settings_conflict`), `--overwrite True` clears the earlier outputs
(`clear_prediction_folder`), and a run that fails before writing any mask removes what it created (`NewFiles`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from guided_diffusion.fileio import LOCK_FILE, atomic_write
from guided_diffusion.layout import (EVAL_CSV, EVAL_DIR, EVAL_JSON, MANIFEST, OVERLAY_DIR, PROB_DIR, SAMPLING_SETTINGS,
                                     SPLIT_FILE, UNCERTAINTY_DIR, prediction_paths)
from guided_diffusion.sampling.ensemble import threshold

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per folder is then the caller's job
    fcntl = None

REQUIRED_COLUMNS = ("id", "sampler", "steps", "nfe", "seconds")
SUBDIRS = (PROB_DIR, UNCERTAINTY_DIR, OVERLAY_DIR)

CONTOUR_RGB = (0, 255, 0)  # bright green: visible on skin and on colonoscopy mucosa
UNCERTAINTY_RGB = (255, 0, 255)  # magenta tint where the ensemble disagrees
UNCERTAINTY_ALPHA = 0.6  # tint opacity at uncertainty 1 (linear in the uncertainty)


def atomic_write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG via a temporary file and os.replace."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"atomic_write_png needs uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"atomic_write_png needs (H, W) or (H, W, 3), got {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def to_uint8(prob: np.ndarray | Tensor) -> np.ndarray:
    """Map [0, 1] to 0..255 by rounding (values outside clipped, NaN to 0) for 8-bit PNGs."""
    if torch.is_tensor(prob):
        prob = prob.detach().float().cpu().numpy()
    x = np.nan_to_num(np.asarray(prob, dtype=np.float64), nan=0.0)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def resize_prob(prob: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of an (H, W) probability map to size (H0, W0), result clamped to [0, 1].

    Resizing the probability and thresholding afterwards gives a smooth mask at the original size;
    nearest-upsampling a coarse binary mask would give a blocky one. Antialiased when shrinking.
    """
    if not torch.is_tensor(prob):
        prob = torch.as_tensor(np.asarray(prob))
    if prob.dim() != 2:
        raise ValueError(f"resize_prob needs an (H, W) map, got shape {tuple(prob.shape)}")
    return resize_probs(prob[None], size)[0]


def resize_probs(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """resize_prob of a stack of (S, H, W) maps (a volume's slices) in one call."""
    h0, w0 = int(size[0]), int(size[1])
    x = maps.float()
    if tuple(x.shape[-2:]) == (h0, w0):
        return x.clamp(0.0, 1.0)
    shrink = h0 < x.shape[-2] or w0 < x.shape[-1]
    y = F.interpolate(x[:, None], size=(h0, w0), mode="bilinear", align_corners=False, antialias=shrink)
    return y[:, 0].clamp(0.0, 1.0)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)^2 square via an integral image (cost independent of r); outside is background."""
    k = 2 * radius + 1
    bg = np.pad(~mask, radius + 1, constant_values=True).astype(np.int32)
    integral = bg.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    h, w = mask.shape
    window = (
        integral[k : k + h, k : k + w]
        - integral[0:h, k : k + w]
        - integral[k : k + h, 0:w]
        + integral[0:h, 0:w]
    )
    return window == 0


def _rgb(image: np.ndarray) -> np.ndarray:
    """An image as uint8 (H, W, 3): grayscale replicated, alpha dropped."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"overlay needs a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[:, :, :3]
    raise ValueError(f"overlay needs (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")


def overlay(image: np.ndarray, mask: np.ndarray, uncertainty: np.ndarray | None = None) -> np.ndarray:
    """The mask's contour (mask minus its erosion) in bright green on the image, plus a magenta uncertainty tint.

    The contour is about 1/300 of the shorter side thick (at least 1 px) so it shows on large dermoscopy images;
    `uncertainty` (float in [0, 1] or uint8 0..255) blends the tint with opacity UNCERTAINTY_ALPHA x u.
    """
    rgb = _rgb(image)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    if uncertainty is not None:
        u = uncertainty.detach().float().cpu().numpy() if torch.is_tensor(uncertainty) else np.asarray(uncertainty)
        u = u.astype(np.float32) / 255.0 if u.dtype == np.uint8 else np.clip(u.astype(np.float32), 0.0, 1.0)
        if u.shape != mask.shape:
            raise ValueError(f"uncertainty shape {u.shape} differs from image shape {mask.shape}")
        alpha = (UNCERTAINTY_ALPHA * u)[:, :, None]
        out = (1.0 - alpha) * out + alpha * np.asarray(UNCERTAINTY_RGB, dtype=np.float32)
    thickness = max(1, round(min(mask.shape) / 300))
    contour = mask & ~_erode(mask, thickness)
    out[contour] = CONTOUR_RGB
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _manifest_csv(rows: list[dict]) -> str:
    """CSV text of the manifest: required columns first, then extra keys in order of first appearance."""
    cols = list(REQUIRED_COLUMNS)
    for row in rows:
        cols += [k for k in row if k not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _manifest_header(path: Path) -> list[str] | None:
    """The manifest's column names, None when there is no manifest (or an empty one)."""
    if not path.exists():
        return None
    with open(path, newline="") as fh:
        return next(csv.reader(fh), None)


def _ends_with_newline(path: Path) -> bool:
    """True for an empty file or one whose last byte is a newline."""
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _check_id(id: str) -> str:
    """Reject ids that are not plain file stems (they would escape out_dir or hide as temp files)."""
    if not isinstance(id, str) or not id or id.startswith(".") or any(c in id for c in "/\\\0"):
        raise ValueError(f"prediction id must be a plain file stem, got {id!r}")
    return id


class PredictionWriter:
    """Writes one image's mask, probability, uncertainty (and overlay) and keeps the run's manifest.

    Resumable: `done(id)` says an id is complete from an earlier (possibly interrupted or killed) run, and
    the manifest rows of earlier runs are read back and kept for ids this run does not rewrite (rows whose
    mask is gone are dropped). Each row is appended to manifest.csv as soon as its mask is on disk, so a
    killed run loses no row of a finished image; `close()` rewrites the manifest atomically, one row per id.
    Several writers may share one out_dir (one per torchrun rank, each with its own ids): every manifest
    write happens under an exclusive lock on the folder (POSIX flock) and keeps the other writers' rows.
    """

    def __init__(self, out_dir: Path, save_overlays: bool = False, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.save_overlays = save_overlays
        self.overwrite = overwrite
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._previous: dict[str, dict] = self._read_manifest()
        self._rows: dict[str, dict] = {}  # rows written by this writer
        self.written = 0  # masks this writer put on disk

    def _read_manifest(self) -> dict[str, dict]:
        """Rows of the manifest on disk keyed by id (strings as written), empty if none; a row cut short (a
        killed write) or whose mask is gone is left out."""
        path = self.out_dir / MANIFEST
        if not path.exists():
            return {}
        with open(path, newline="") as fh:
            rows = [dict(row) for row in csv.DictReader(fh)]
        return {row["id"]: row for row in rows
                if row.get("id") and None not in row and None not in row.values() and self._has_mask(row["id"])}

    def _has_mask(self, id: str) -> bool:
        try:
            return self._paths(id)["mask"].is_file()
        except ValueError:  # not an id this writer would have written
            return False

    def _paths(self, id: str) -> dict[str, Path]:
        """Where each output of `id` goes."""
        return prediction_paths(self.out_dir, _check_id(id))

    def done(self, id: str) -> bool:
        """True when every output of `id` exists (overlay too when asked), the manifest has its row, and
        overwrite is off."""
        if self.overwrite or (id not in self._rows and id not in self._previous):
            return False
        paths = self._paths(id)
        needed = ["prob", "uncertainty", "mask"] + (["overlay"] if self.save_overlays else [])
        return all(paths[k].is_file() for k in needed)

    def write(
        self,
        id: str,
        prob: Tensor,
        unc: Tensor,
        orig_size: tuple[int, int],
        image: np.ndarray | None = None,
        record: dict | None = None,
    ) -> None:
        """Resize prob/unc to orig_size, write prob, uncertainty, overlay, then the mask last; record the row.

        `record` must hold sampler, steps, nfe and seconds (its id, if present, must equal `id`);
        with record=None the row holds only the id, for callers that time nothing.
        """
        paths = self._paths(id)
        row = self._make_row(id, record)
        size = (int(orig_size[0]), int(orig_size[1]))
        rgb = self._overlay_image(id, image, size) if self.save_overlays else None
        prob_big = resize_prob(torch.as_tensor(prob), size)
        unc_big = resize_prob(torch.as_tensor(unc), size)
        mask = threshold(prob_big).cpu().numpy()
        unc_u8 = to_uint8(unc_big)

        atomic_write_png(paths["prob"], to_uint8(prob_big))
        atomic_write_png(paths["uncertainty"], unc_u8)
        if rgb is not None:
            atomic_write_png(paths["overlay"], overlay(rgb, mask, unc_u8))
        atomic_write_png(paths["mask"], mask.astype(np.uint8) * 255)
        self.written += 1
        self._rows[id] = row
        self._append(row)

    @staticmethod
    def _overlay_image(id: str, image: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
        """The source image as RGB, checked before anything is written so a bad call leaves no files."""
        if image is None:
            raise ValueError("save_overlays is on but no source image was given to write()")
        rgb = _rgb(image)
        if rgb.shape[:2] != size:
            raise ValueError(f"image of {id} is {rgb.shape[:2]}, expected its original size {size}")
        return rgb

    @staticmethod
    def _make_row(id: str, record: dict | None) -> dict:
        """The manifest row of `id`, checked to hold the contract's columns."""
        if record is None:
            return {"id": id}
        row = dict(record)
        if str(row.setdefault("id", id)) != id:
            raise ValueError(f"record id {row['id']!r} differs from the written id {id!r}")
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"manifest record of {id!r} lacks {', '.join(missing)}")
        return row

    @contextlib.contextmanager
    def _locked(self):
        """Hold an exclusive advisory lock on out_dir itself (no lock file, so nothing new at top level)."""
        if fcntl is None:
            yield
            return
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _append(self, row: dict) -> None:
        """Add one row to manifest.csv at once (the file is flushed to the OS before this returns, so a killed
        run keeps it); a manifest with other columns, or none yet, is rewritten whole instead."""
        path = self.out_dir / MANIFEST
        with self._locked():
            header = _manifest_header(path)
            if header is None or header[:len(REQUIRED_COLUMNS)] != list(REQUIRED_COLUMNS) or not set(row) <= set(header):
                self._rewrite()
                return
            with open(path, "a", newline="") as fh:
                if not _ends_with_newline(path):  # a write cut short: that row reads as incomplete, and is dropped
                    fh.write("\n")
                csv.DictWriter(fh, fieldnames=header, restval="", lineterminator="\n").writerow(row)

    def _rewrite(self) -> None:
        """manifest.csv rewritten atomically: earlier and concurrent writers' rows, then this writer's (hold the
        lock)."""
        rows = {**self._previous, **self._read_manifest(), **self._rows}
        atomic_write(self.out_dir / MANIFEST, _manifest_csv(list(rows.values())))

    def flush(self) -> None:
        """Rewrite manifest.csv atomically, one row per id."""
        with self._locked():
            self._rewrite()

    def close(self) -> None:
        """Write the manifest (always, so a run that wrote nothing still leaves one)."""
        self.flush()

    def __enter__(self) -> "PredictionWriter":
        """Use as a context manager so the manifest is written even when sampling raises."""
        return self

    def __exit__(self, *exc) -> None:
        """Write the manifest on the way out."""
        self.close()


# ---------------------------------------------------------------- the folder: settings, overwrite, clean-up
# What a sampling run writes into its folder besides the per-image files; a run that fails before writing any mask
# removes the ones it created (NewFiles).
RUN_FILES = (SPLIT_FILE, MANIFEST, SAMPLING_SETTINGS, LOCK_FILE, *SUBDIRS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
VOLUME_SUFFIXES = (".nii.gz", ".nii")  # a BRATS/NIFTI prediction folder's masks (sampling/volumes.py)


def top_level_images(out_dir: Path) -> list[Path]:
    """Image files at the folder's top level: a prediction folder's masks (or, in a folder that is not one, the
    user's images, which no run may overwrite or remove)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.suffix.lower() in IMAGE_SUFFIXES or p.name.lower().endswith(VOLUME_SUFFIXES)))


def is_prediction_folder(out_dir: Path) -> bool:
    """Whether the folder was written by the sampler (its settings, manifest or map folders are there)."""
    return any((Path(out_dir) / name).exists() for name in (SAMPLING_SETTINGS, MANIFEST, PROB_DIR, UNCERTAINTY_DIR))


def read_settings(out_dir: Path) -> dict | None:
    """The settings recorded in out_dir/sampling.json, None when there are none."""
    path = Path(out_dir) / SAMPLING_SETTINGS
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--out_dir {out_dir}: cannot read {path} ({exc}); use --overwrite True to replace the "
                         f"folder's outputs, or another --out_dir") from None
    if not isinstance(found, dict):
        raise ValueError(f"--out_dir {out_dir}: {path} is not a settings record; use --overwrite True to replace the "
                         f"folder's outputs, or another --out_dir")
    return found


def write_settings(out_dir: Path, settings: dict) -> Path:
    """Record the settings of the folder's masks (atomically)."""
    return atomic_write(Path(out_dir) / SAMPLING_SETTINGS, json.dumps(settings, indent=2) + "\n")


def _network_names(old: dict, new: dict) -> tuple[str, str]:
    """How to tell two checkpoints apart in one line: their file names, else their paths."""
    for key in ("file", "path"):
        if old.get(key) != new.get(key):
            return str(old.get(key)), str(new.get(key))
    return f"{old.get('file')} (other weights)", f"{new.get('file')} (its current weights)"


def _show(value) -> str:
    return "none" if value is None else str(value)


# settings recorded only when they are not their default, so that folders sampled before they existed stay valid
IMPLIED_SETTINGS = {"views": 1}


def settings_conflict(out_dir: Path, old: dict, new: dict) -> str | None:
    """None when the masks in out_dir were sampled with `new`'s settings, else the one-line error naming what
    differs (the model by its weights, every other setting as its flag)."""
    new = json.loads(json.dumps(new))  # compare as stored (lists, not tuples)
    old_parts, new_parts = [], []
    old_model, new_model = old.get("model") or {}, new.get("model") or {}
    model_differs = old_model.get("weights") != new_model.get("weights")
    old_name, new_name = (_network_names(old_model, new_model) if model_differs
                          else (str(new_model.get("file")), str(new_model.get("file"))))
    old_nets, new_nets = old.get("networks") or {}, new.get("networks") or {}
    for flag in [*new_nets, *(k for k in old_nets if k not in new_nets)]:
        a, b = old_nets.get(flag), new_nets.get(flag)
        if (a or {}).get("weights") != (b or {}).get("weights"):
            shown = _network_names(a or {"file": None}, b or {"file": None}) if a and b else \
                (_show(a and a.get("file")), _show(b and b.get("file")))
            old_parts.append(f"--{flag} {shown[0]}")
            new_parts.append(f"--{flag} {shown[1]}")
    old_set, new_set = ({**IMPLIED_SETTINGS, **(side.get("settings") or {})} for side in (old, new))
    for key in new_set:
        if key in old_set and old_set[key] != new_set[key]:
            old_parts.append(f"--{key} {_show(old_set[key])}")
            new_parts.append(f"--{key} {_show(new_set[key])}")
    # a setting only one side has belongs to a sampler only one side uses, named above; else it is the difference
    one_sided = [k for k in [*new_set, *old_set] if (k in new_set) != (k in old_set)]
    if one_sided and not old_parts:
        for key in dict.fromkeys(one_sided):
            old_parts.append(f"--{key} {_show(old_set[key]) if key in old_set else '(not set)'}")
            new_parts.append(f"--{key} {_show(new_set[key]) if key in new_set else '(not set)'}")
    if not model_differs and not old_parts:
        return None
    held = f"masks of {old_name}" + (f" with {' '.join(old_parts)}" if old_parts else "")
    this = " with ".join(part for part in (new_name if model_differs else "", " ".join(new_parts)) if part)
    return (f"--out_dir {out_dir} holds {held}; this run: {this}; use --overwrite True to replace them, or another "
            f"--out_dir")


def clear_prediction_folder(out_dir: Path) -> list[str]:
    """--overwrite True: remove an earlier run's outputs (masks, prob/, uncertainty/, overlays/, manifest, settings,
    eval/ and segmentation_env.py's reports) so the run starts afresh; returns what was removed. A folder whose
    top-level images were not written by the sampler (no settings, manifest or map folders) is left alone: an
    error, so --overwrite never deletes a user's images."""
    out_dir = Path(out_dir)
    masks = top_level_images(out_dir)
    if masks and not is_prediction_folder(out_dir):
        raise ValueError(f"--out_dir {out_dir} holds {len(masks)} image files but is not a prediction folder (no "
                         f"{SAMPLING_SETTINGS} or {MANIFEST}): --overwrite True removes only a sampler's outputs; use "
                         f"another --out_dir")
    removed = [p.name for p in masks]
    for p in masks:
        p.unlink()
    for name in (*SUBDIRS, EVAL_DIR):
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
            removed.append(name + "/")
    for name in (MANIFEST, SAMPLING_SETTINGS, EVAL_CSV, EVAL_JSON):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed.append(name)
    return removed


class NewFiles:
    """What one run creates in its --out_dir (the folder itself, split.json, the manifest, the settings, the lock,
    the map folders): `undo()` removes exactly those, and only when the run wrote no mask, so a run that fails at
    set-up leaves a new folder as it found it while a user's files and an earlier run's outputs stay."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.existed = self.out_dir.is_dir()
        self.before = {name for name in RUN_FILES if (self.out_dir / name).exists()}
        self.masks_before = {p.name for p in top_level_images(self.out_dir)}

    def undo(self) -> list[str]:
        """Remove what this run created, unless a mask was written meanwhile (then every file stays, for a resume);
        returns the names removed."""
        if {p.name for p in top_level_images(self.out_dir)} - self.masks_before:
            return []
        removed = []
        for name in RUN_FILES:
            path = self.out_dir / name
            if name in self.before or not (path.exists() or path.is_symlink()):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(name)
        if not self.existed and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()
            removed.append(str(self.out_dir))
        return removed
