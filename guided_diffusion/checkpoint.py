"""Self-describing checkpoints: weights, EMA, optimizer, scaler, step, RNG states, config, split and kind.

Files are written to a temporary name and renamed (fileio.atomic_write), so a crash never leaves a half-written
checkpoint; `<out_dir>/latest` names the newest complete one. Every checkpoint says what it holds ("kind": a
diffusion model, or one of ADDPM's auxiliary networks; checkpoints without the key are diffusion models), so one
kind is never loaded as another.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guided_diffusion.fileio import atomic_write
from guided_diffusion.layout import CHECKPOINT_GLOB, LATEST, checkpoint_name

FORMAT = "medsegdiff-fast/1"
DIFFUSION = "diffusion"
DESCRIBE = {DIFFUSION: "diffusion model", "preseg": "pre-segmentation network", "denoiser": "denoising network"}
TRAIN_SCRIPT = {DIFFUSION: "scripts/segmentation_train.py", "preseg": "scripts/train_preseg_network.py",
                "denoiser": "scripts/train_denoising_network.py"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of the wrong kind, or not one of ours (one line naming the file)."""


class UnreadableCheckpoint(CheckpointError):
    """The file is truncated, corrupt, or not a torch file."""


def save_checkpoint(out_dir: Path, step: int, payload: dict[str, Any], keep: int = 0) -> Path:
    """Write model_<step>.pt atomically, point `latest` at it, and drop all but the `keep` newest."""
    out_dir = Path(out_dir)
    path = out_dir / checkpoint_name(step)
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp))
    atomic_write(out_dir / LATEST, path.name + "\n")
    if keep > 0:
        for old in sorted(out_dir.glob(CHECKPOINT_GLOB))[:-keep]:
            old.unlink()
    return path


def candidates(out_dir: Path) -> list[Path]:
    """out_dir's checkpoints, newest (highest step) first; none when out_dir is not a folder."""
    out_dir = Path(out_dir)
    return sorted(out_dir.glob(CHECKPOINT_GLOB), reverse=True) if out_dir.is_dir() else []


def find_latest(out_dir: Path) -> Path | None:
    """The highest-step model_*.pt in out_dir (the one `latest` names after a clean save), else None."""
    found = candidates(out_dir)
    return found[0] if found else None


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's file name (model_0000123.pt -> 123)."""
    return int(Path(path).stem.split("_")[-1])


def checkpoint_kind(ckpt: dict) -> str:
    """'diffusion', 'preseg' or 'denoiser' (a checkpoint without a kind is a diffusion model's)."""
    return ckpt.get("kind", DIFFUSION)


def load_checkpoint(path: Path | str, flag: str = "--model_path", kind: str | None = None, hint: str = "",
                    map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint (a file, or a run folder whose latest is taken). Every error is a CheckpointError whose
    one line names `flag`, the flag the path came from; with `kind`, a checkpoint of another kind is one too
    (ending with `hint`, by default the script that trains the right kind)."""
    path = Path(path)
    if path.is_dir():
        return _load_newest_intact(path, flag, kind, hint, map_location)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file
        raise UnreadableCheckpoint(f"{flag} {path}: not a readable checkpoint ({type(exc).__name__}: {exc})"
                              .splitlines()[0]) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{flag} {path}: not a checkpoint of this toolkit (no '{FORMAT}' format tag)")
    ckpt["path"] = str(path)
    found = checkpoint_kind(ckpt)
    if kind is not None and found != kind:
        raise CheckpointError(f"{flag} {path} is a {DESCRIBE.get(found, found)} checkpoint, not a {DESCRIBE[kind]} "
                              f"one; {hint or 'train that with ' + TRAIN_SCRIPT[kind]}")
    return ckpt


def _load_newest_intact(folder: Path, flag: str, kind: str | None, hint: str, map_location) -> dict[str, Any]:
    """A run folder's newest readable checkpoint; a truncated or corrupt newer one (a full disk, a copy cut short)
    is skipped with a warning naming it, so the intact previous one is used instead of stopping the run."""
    found = candidates(folder)
    if not found:
        raise CheckpointError(f"{flag} {folder}: folder holds no model_*.pt checkpoint")
    skipped = []
    for path in found:
        try:
            ckpt = load_checkpoint(path, flag, kind, hint, map_location)
        except UnreadableCheckpoint as exc:
            skipped.append(str(exc))
            continue
        for line in skipped:
            print(f"warning: {line}; using the previous intact checkpoint {path.name}", file=sys.stderr, flush=True)
        return ckpt
    raise CheckpointError(f"{flag} {folder}: no readable checkpoint ({skipped[0]})")


def check_flags(given: dict[str, Any], saved: dict[str, Any], where: str, hint: str = "",
                skip: tuple[str, ...] = ()) -> None:
    """A flag that contradicts a checkpoint is a one-line error, never a silent mismatch: every key of `given`
    with a value (None: not given) must equal `saved`'s, unless the key is in `skip` or unknown to `saved`."""
    for key, value in given.items():
        if value is None or key in skip or key not in saved or saved[key] == value:
            continue
        extra = hint(key) if callable(hint) else hint
        raise ValueError(f"--{key} {value} contradicts {where} ({saved[key]})" + (f"; {extra}" if extra else ""))


# ----- RNG state, as tensors and plain values so checkpoints load with weights_only=True ----------
def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    np_state = np.random.get_state()
    state = {
        "python": _tuplify_to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    random.setstate(_lists_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _tuplify_to_lists(v):
    return [_tuplify_to_lists(x) for x in v] if isinstance(v, (tuple, list)) else v


def _lists_to_tuples(v):
    return tuple(_lists_to_tuples(x) for x in v) if isinstance(v, list) else v
