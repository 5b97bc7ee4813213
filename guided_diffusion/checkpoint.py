"""Self-describing checkpoints: weights, EMA, optimizer, scaler, step, RNG states, config and split.

Files are written to a temporary name and renamed, so a crash never leaves a half-written checkpoint;
`<out_dir>/latest` names the newest complete one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "medsegdiff-fast/1"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one of ours (one-line message naming the file)."""


def checkpoint_name(step: int) -> str:
    return f"model_{step:07d}.pt"


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(tmp_path) and rename the result to `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(out_dir: Path, step: int, payload: dict[str, Any], keep: int = 0) -> Path:
    """Write model_<step>.pt atomically, point `latest` at it, and drop all but the `keep` newest."""
    out_dir = Path(out_dir)
    path = out_dir / checkpoint_name(step)
    atomic_write_bytes(path, lambda tmp: torch.save({"format": FORMAT, **payload}, tmp))
    atomic_write_bytes(out_dir / LATEST, lambda tmp: tmp.write_text(path.name + "\n"))
    if keep > 0:
        for old in sorted(out_dir.glob("model_*.pt"))[:-keep]:
            old.unlink()
    return path


def find_latest(out_dir: Path) -> Path | None:
    """The checkpoint `latest` names in out_dir, else the highest-step model_*.pt, else None."""
    out_dir = Path(out_dir)
    pointer = out_dir / LATEST
    if pointer.is_file():
        candidate = out_dir / pointer.read_text().strip()
        if candidate.is_file():
            return candidate
    found = sorted(out_dir.glob("model_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path | str, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint (a file, or a run folder whose latest is taken); CheckpointError if it is not ours."""
    path = Path(path)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"--model_path {path}: folder holds no model_*.pt checkpoint")
        path = latest
    if not path.is_file():
        raise CheckpointError(f"--model_path {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (no '{FORMAT}' format tag)")
    ckpt["path"] = str(path)
    return ckpt


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
