"""Writing the sampler's prediction folder (the README's "Sample" section; layout.py).

Layout under out_dir:
    <id>.png               binary mask, 0/255 8-bit grayscale, at the source image's original size
    prob/<id>.png          fused foreground probability, 0..255 for 0..1, original size
    uncertainty/<id>.png   uncertainty map, 0..255 for 0..1, original size
    overlays/<id>.png      (when asked) mask contour and uncertainty tint on the source image
    manifest.csv           one row per id: id, sampler, steps, nfe, seconds (+ any extra keys)

The ISIC challenge scorer pairs each ground truth with the one top-level file whose name holds
its 7-digit number, so the top level holds only the masks and files whose names carry no id:
temporary files are hidden, named from random letters only (never digits), end in no image
suffix, and are renamed away before a write returns. Every file is written to a temporary name
in its final folder and moved into place with os.replace, so a reader or an interrupted run
never sees a half-written file; the top-level mask is written last, so `done(id)` implies that
everything else for that id is on disk.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from guided_diffusion.fileio import atomic_write
from guided_diffusion.layout import MANIFEST, OVERLAY_DIR, PROB_DIR, UNCERTAINTY_DIR, prediction_paths
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
    h0, w0 = int(size[0]), int(size[1])
    x = prob.float()
    if tuple(x.shape) == (h0, w0):
        return x.clamp(0.0, 1.0)
    shrink = h0 < x.shape[0] or w0 < x.shape[1]
    y = F.interpolate(x[None, None], size=(h0, w0), mode="bilinear", align_corners=False, antialias=shrink)
    return y[0, 0].clamp(0.0, 1.0)


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


def _check_id(id: str) -> str:
    """Reject ids that are not plain file stems (they would escape out_dir or hide as temp files)."""
    if not isinstance(id, str) or not id or id.startswith(".") or any(c in id for c in "/\\\0"):
        raise ValueError(f"prediction id must be a plain file stem, got {id!r}")
    return id


class PredictionWriter:
    """Writes one image's mask, probability, uncertainty (and overlay) and keeps the run's manifest.

    Resumable: `done(id)` says an id is complete from an earlier (possibly interrupted) run, and
    the manifest rows of earlier runs are read back and kept for ids this run does not rewrite.
    The manifest is rewritten atomically at `close()` and at most every `flush_every_s` seconds
    during a run, so a crash loses at most that many seconds of manifest rows. Several writers may
    share one out_dir (one per torchrun rank, each with its own ids): every flush re-reads the
    manifest under an exclusive lock on the folder (POSIX flock) and adds only this writer's rows.
    """

    def __init__(
        self, out_dir: Path, save_overlays: bool = False, overwrite: bool = False, flush_every_s: float = 60.0
    ) -> None:
        self.out_dir = Path(out_dir)
        self.save_overlays = save_overlays
        self.overwrite = overwrite
        self.flush_every_s = flush_every_s
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._previous: dict[str, dict] = self._read_manifest()
        self._rows: dict[str, dict] = {}  # rows written by this writer
        self._last_flush = time.monotonic()

    def _read_manifest(self) -> dict[str, dict]:
        """Rows of an earlier run's manifest keyed by id (strings as written), empty if none."""
        path = self.out_dir / MANIFEST
        if not path.exists():
            return {}
        with open(path, newline="") as fh:
            return {row["id"]: dict(row) for row in csv.DictReader(fh) if row.get("id")}

    def _paths(self, id: str) -> dict[str, Path]:
        """Where each output of `id` goes."""
        return prediction_paths(self.out_dir, _check_id(id))

    def done(self, id: str) -> bool:
        """True when every output of `id` exists (overlay too when asked) and overwrite is off."""
        if self.overwrite:
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

        self._rows[id] = row
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

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

    def flush(self) -> None:
        """Rewrite manifest.csv atomically: earlier and concurrent writers' rows, then this writer's."""
        with self._locked():
            rows = {**self._previous, **self._read_manifest(), **self._rows}
            atomic_write(self.out_dir / MANIFEST, _manifest_csv(list(rows.values())))
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Write the manifest (always, so a run that wrote nothing still leaves one)."""
        self.flush()

    def __enter__(self) -> "PredictionWriter":
        """Use as a context manager so the manifest is written even when sampling raises."""
        return self

    def __exit__(self, *exc) -> None:
        """Write the manifest on the way out."""
        self.close()
