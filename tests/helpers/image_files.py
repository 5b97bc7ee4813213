"""Small image and mask files the tests write and read, and the one-line error text the data layer must give."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from guided_diffusion import fileio


def write_image(path: Path, size=(12, 10), mode: str = "RGB", seed: int = 0) -> Path:
    """A small random image (size is W, H) in the given PIL mode."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if mode == "P":
        img = img.quantize(16)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def blob(size=(12, 10)) -> np.ndarray:
    """A rectangular foreground blob (bool HxW) for a W x H image."""
    mask = np.zeros((size[1], size[0]), dtype=bool)
    mask[2:7, 3:9] = True
    return mask


def write_mask(path: Path, mask: np.ndarray, rgb: bool = False) -> Path:
    """Mask as 0/255 grayscale (or 3-channel) file; JPEG paths get JPEG noise like Kvasir-SEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = mask.astype(np.uint8) * 255
    img = Image.fromarray(np.repeat(arr[..., None], 3, axis=2) if rgb else arr)
    img.save(path, **({"quality": 75} if path.suffix == ".jpg" else {}))
    return path


def make_folder(root: Path, stems, mask_stems=None, ext=".png", mask_ext=".png") -> Path:
    """FOLDER layout with one image/mask per stem."""
    for i, stem in enumerate(stems):
        write_image(root / "images" / f"{stem}{ext}", seed=i)
    for stem in mask_stems if mask_stems is not None else stems:
        write_mask(root / "masks" / f"{stem}{mask_ext}", blob())
    return root


def error_text(exc_info) -> str:
    """The DataError message, checked to be one line."""
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def read_png(path) -> np.ndarray:
    """A PNG file as a numpy array."""
    with Image.open(path) as im:
        return np.asarray(im)


def temp_files(root):
    """Every leftover temporary file under root."""
    return [p for p in root.rglob("*") if p.name.startswith(fileio.TMP_PREFIX)]
