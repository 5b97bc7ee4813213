"""Built-in synthetic lesion data set: deterministic, lesion-like images with exact binary masks.

Pixels only; file layout, metadata and errors live in ``datasets.make_synthetic``.
Each image is drawn from its own ``numpy.random.Generator`` seeded by ``(seed, index)``, so any image
can be regenerated alone and two generations are byte-identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; part of the metadata so a changed knob is a different data set."""

    min_size: int = 64
    max_size: int = 128
    empty_every: int = 10  # every 10th image (index % 10 == 9) has no lesion
    square_prob: float = 0.3
    border_prob: float = 0.25
    low_contrast_prob: float = 0.3

    def to_dict(self) -> dict:
        """Plain dict for meta.json."""
        return asdict(self)


def synth_id(index: int) -> str:
    """File stem of image ``index``."""
    return f"synth_{index:04d}"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise: the texture primitive."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-8)


def _jitter_colour(rng: np.random.Generator, base: tuple[float, float, float], scale: tuple[float, float],
                   spread: float) -> np.ndarray:
    """A random colour near ``base``: global brightness factor in ``scale`` plus per-channel spread."""
    colour = np.asarray(base) * rng.uniform(*scale) + rng.uniform(-spread, spread, 3)
    return np.clip(colour, 0.02, 0.98)


def _skin(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Skin-like background: tinted base colour, low- and high-frequency brightness texture."""
    base = _jitter_colour(rng, (0.86, 0.66, 0.56), (0.8, 1.08), 0.05)
    shade = 1.0 + rng.uniform(0.03, 0.08) * _smooth_noise(rng, (h, w), rng.uniform(6, 14))
    grain = rng.uniform(0.01, 0.04) * _smooth_noise(rng, (h, w), 1.0)
    return base[None, None, :] * (shade + grain)[..., None]


def _erythema(rng: np.random.Generator, img: np.ndarray) -> None:
    """Large diffuse reddish patch without an edge: a colour distractor with the wrong shape."""
    h, w, _ = img.shape
    field = np.clip(_smooth_noise(rng, (h, w), min(h, w) / 5), 0, None)
    field = field / (field.max() + 1e-8) * rng.uniform(0.1, 0.3)
    tint = np.array([-0.05, -0.35, -0.3])
    img *= 1.0 + field[..., None] * tint


def _radial_blob(rng: np.random.Generator, h: int, w: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Irregular lesion mask: radius modulated by random Fourier harmonics plus a rough edge."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle, stretch = rng.uniform(0, np.pi), rng.uniform(0.7, 1.0)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / stretch
    theta, dist = np.arctan2(v, u), np.hypot(u, v)
    r = np.ones_like(theta)
    for k in range(2, 8):
        r += rng.uniform(0, 0.22 / k**0.7) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.45, None) * radius
    rough = rng.uniform(0.0, 0.08) * radius * _smooth_noise(rng, (h, w), 1.5)
    return dist < r + rough


def _place_centre(rng: np.random.Generator, h: int, w: int, radius: float, at_border: bool) -> tuple[float, float]:
    """Lesion centre: inside the frame, or straddling a random edge when ``at_border``."""
    if at_border:
        side, off = rng.integers(4), rng.uniform(-0.3, 0.5) * radius
        along_y, along_x = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
        return [(off, along_x), (h - 1 - off, along_x), (along_y, off), (along_y, w - 1 - off)][side]
    my, mx = min(1.05 * radius, h / 2), min(1.05 * radius, w / 2)
    return rng.uniform(my, h - my), rng.uniform(mx, w - mx)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend a per-pixel colour (HxWx3 or 3) into ``img`` in place."""
    img *= 1.0 - alpha[..., None]
    img += alpha[..., None] * colour


def _lesion(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, colour: np.ndarray, contrast: float) -> None:
    """Textured lesion: mottled pigment, darker core, globules, soft boundary blended at ``contrast``."""
    h, w, _ = img.shape
    soft = ndimage.gaussian_filter(mask.astype(np.float64), rng.uniform(0.5, 1.5))
    depth = ndimage.distance_transform_edt(mask)
    core = 1.0 - rng.uniform(0.1, 0.35) * np.clip(depth / (depth.max() + 1e-8), 0, 1)
    mottle = 1.0 + rng.uniform(0.1, 0.25) * _smooth_noise(rng, (h, w), rng.uniform(1.0, 2.5))
    pigment = colour[None, None, :] * (core * mottle)[..., None]
    globules = (rng.random((h, w)) < rng.uniform(0.0, 0.02)) & (depth > 2)
    globules = ndimage.binary_dilation(globules) & mask
    pigment[globules] *= rng.uniform(0.4, 0.7)
    _paint(img, np.clip(soft * contrast * rng.uniform(0.9, 1.0), 0, 1), pigment)


def _freckles(rng: np.random.Generator, img: np.ndarray, colour: np.ndarray, contrast: float) -> None:
    """Small round uniform spots of lesion-like colour: distractors that differ in shape, size and texture."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(0, 5)):
        r = rng.uniform(0.025, 0.06) * min(h, w)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        spot = ndimage.gaussian_filter(((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float64), 0.7)
        _paint(img, spot * contrast * rng.uniform(0.8, 1.1), colour * rng.uniform(0.85, 1.15))


def _hairs(rng: np.random.Generator, img: np.ndarray) -> None:
    """Thin dark curved lines crossing everything, lesion included (the mask ignores them)."""
    h, w, _ = img.shape
    n = rng.integers(1, 7) if rng.random() < 0.5 else 0
    t = np.linspace(0, 1, 4 * (h + w))[:, None]
    for _ in range(n):
        p0, p1, p2 = (rng.uniform([-0.1 * h, -0.1 * w], [1.1 * h, 1.1 * w]) for _ in range(3))
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        ys, xs = np.round(pts).astype(int).T
        keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        line = np.zeros((h, w))
        line[ys[keep], xs[keep]] = 1.0
        _paint(img, line * rng.uniform(0.5, 0.9), _jitter_colour(rng, (0.15, 0.1, 0.08), (0.6, 1.4), 0.03))


def _highlights(rng: np.random.Generator, img: np.ndarray) -> None:
    """A few specular highlights / air bubbles: bright small spots."""
    h, w, _ = img.shape
    dots = ndimage.gaussian_filter((rng.random((h, w)) < rng.uniform(0, 0.0008)).astype(np.float64), 0.8) * 6
    _paint(img, np.clip(dots, 0, 1), np.array([0.97, 0.97, 0.95]))


def _vignette(rng: np.random.Generator, img: np.ndarray) -> None:
    """Dermoscope-style darkening towards the corners, sometimes a hard dark aperture edge."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    rad = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2))
    kind = rng.random()
    if kind < 0.4:
        fall = np.clip((rad - 0.8) / 0.6, 0, 1) ** 2 * rng.uniform(0.3, 0.7)
    elif kind < 0.55:
        fall = ndimage.gaussian_filter((rad > rng.uniform(1.1, 1.3)).astype(np.float64), 1.5) * rng.uniform(0.7, 0.95)
    else:
        return
    img *= 1.0 - fall[..., None]


def synth_sample(index: int, seed: int = 0, config: SynthConfig = SynthConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the set: (HxWx3 uint8 image, HxW uint8 mask in {0, 255})."""
    rng = np.random.default_rng([seed, index])
    h = int(rng.integers(config.min_size, config.max_size + 1))
    w = h if rng.random() < config.square_prob else int(rng.integers(config.min_size, config.max_size + 1))
    img = _skin(rng, h, w)
    if rng.random() < 0.4:
        _erythema(rng, img)
    colour = _jitter_colour(rng, (0.45, 0.28, 0.2), (0.55, 1.25), 0.05)
    low = rng.random() < config.low_contrast_prob
    contrast = rng.uniform(0.25, 0.45) if low else rng.uniform(0.55, 0.95)
    mask = np.zeros((h, w), dtype=bool)
    if index % config.empty_every != config.empty_every - 1:
        radius = rng.uniform(0.14, 0.36) * min(h, w)
        cy, cx = _place_centre(rng, h, w, radius, rng.random() < config.border_prob)
        mask = _radial_blob(rng, h, w, cy, cx, radius)
        _lesion(rng, img, mask, colour, contrast)
    _freckles(rng, img, colour, contrast * rng.uniform(0.8, 1.2))
    _hairs(rng, img)
    _highlights(rng, img)
    _vignette(rng, img)
    img += rng.uniform(0.005, 0.03) * rng.standard_normal(img.shape)
    image = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return image, (mask * 255).astype(np.uint8)


def write_synthetic(out_dir: Path, num_images: int, seed: int = 0, config: SynthConfig = SynthConfig()) -> list[str]:
    """Write ``images/<id>.png`` and ``masks/<id>.png`` under ``out_dir``; returns the ids."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    ids = []
    for index in range(num_images):
        image, mask = synth_sample(index, seed, config)
        ids.append(synth_id(index))
        Image.fromarray(image).save(out_dir / "images" / f"{ids[-1]}.png")
        Image.fromarray(mask).save(out_dir / "masks" / f"{ids[-1]}.png")
    return ids
