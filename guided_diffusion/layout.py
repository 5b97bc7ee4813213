"""Where everything lives inside the folders the toolkit writes: the one definition of the run-folder layout.

A training run (`--out_dir` of the trainers):
    model_<step>.pt   checkpoints (checkpoint.py)        latest     the name of the newest complete checkpoint
    split.json        the train/val/test ids              log.csv    the training log
A prediction folder (`--out_dir` of segmentation_sample.py; the contract of the README's "Sample" section):
    <id>.png  prob/<id>.png  uncertainty/<id>.png  overlays/<id>.png  manifest.csv  split.json
    sampling.json (the settings its masks were sampled with)  .lock (held while a run writes the folder)
and, when a report scored it, eval/ with evaluation.csv, evaluation.json and the split scored (segmentation_env.py
writes evaluation.csv and evaluation.json at the top level by default).
A quickstart folder: model/ (a training run), samples/<row>/ (prediction folders), report.md and figures.
"""
from __future__ import annotations

from pathlib import Path

SPLIT_FILE = "split.json"
LOG_FILE = "log.csv"
LATEST = "latest"
CHECKPOINT_GLOB = "model_*.pt"

MANIFEST = "manifest.csv"
SAMPLING_SETTINGS = "sampling.json"  # no digits, no image suffix: the ISIC scorer ignores it
PROB_DIR, UNCERTAINTY_DIR, OVERLAY_DIR = "prob", "uncertainty", "overlays"
EVAL_DIR = "eval"
EVAL_CSV, EVAL_JSON = "evaluation.csv", "evaluation.json"

QUICKSTART_MODEL, QUICKSTART_SAMPLES, QUICKSTART_REPORT = "model", "samples", "report.md"


def checkpoint_name(step: int) -> str:
    """model_0000123.pt: zero-padded so names sort by step."""
    return f"model_{step:07d}.pt"


def prediction_paths(out_dir: Path, image_id: str) -> dict[str, Path]:
    """Where each output of one image goes in a prediction folder."""
    name = f"{image_id}.png"
    out_dir = Path(out_dir)
    return {"mask": out_dir / name, "prob": out_dir / PROB_DIR / name,
            "uncertainty": out_dir / UNCERTAINTY_DIR / name, "overlay": out_dir / OVERLAY_DIR / name}


def eval_paths(pred_dir: Path) -> dict[str, Path]:
    """The report files a benchmark writes beside a prediction folder's masks (eval/)."""
    d = Path(pred_dir) / EVAL_DIR
    return {"csv": d / EVAL_CSV, "json": d / EVAL_JSON, "split": d / SPLIT_FILE}


VIEWS_TAG = "views"  # a row folder's tag part views<N>: sampled with --views N (tags joined by +: "seed+views4")


def row_views(tag: str | None) -> int:
    """The --views of a row folder's tag ('views4', 'seed+views4' -> 4; no views<N> part -> 1)."""
    parts = [t for t in (tag or "").split("+") if t.startswith(VIEWS_TAG) and t[len(VIEWS_TAG):].isdigit()]
    return int(parts[0][len(VIEWS_TAG):]) if parts else 1


def row_folder(root: Path, label: str, steps: int, num_ensemble: int, tag: str = "") -> Path:
    """A benchmark row's prediction folder: <root>/<sampler>-<steps>-n<members>[-<tag>]."""
    return Path(root) / (f"{label}-{steps}-n{num_ensemble}" + (f"-{tag}" if tag else ""))
