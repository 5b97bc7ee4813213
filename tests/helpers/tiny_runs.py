"""Tiny training set-ups: trainer configs (tiny), the script flags of the torchrun and ADDPM runs, and readers of
a run's log and latest checkpoint."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from guided_diffusion.checkpoint import find_latest
from guided_diffusion.config import DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from guided_diffusion.distributed import DistInfo


def tiny(tmp_path, data_dir, **train):
    """(model, diffusion, data, train) configs of a 16 px, 50-step DiffusionTrainer run on CPU."""
    mc = ModelConfig(image_size=16, num_channels=8, num_res_blocks=1, attention_resolutions="8")
    dc = DiffusionConfig(diffusion_steps=50, learn_sigma=train.pop("learn_sigma", True))
    data = DataConfig(data_name="SYNTHETIC", data_dir=str(data_dir))
    opts = dict(out_dir=str(tmp_path), batch_size=4, max_steps=4, save_interval=2, log_interval=1,
                num_workers=0, device="cpu", ema_rate=0.9)
    tc = TrainConfig(**{**opts, **train})
    return mc, dc, data, tc


CPU = DistInfo(0, 1, 0, torch.device("cpu"))
ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: str, *args: str, nproc: int = 2, extra_env: dict | None = None, timeout: int = 240):
    """`script` under torchrun with nproc CPU (gloo) processes of one thread each, from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})}
    env.pop("SEG_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


# segmentation_train.py on 16 px images with 8 channels: the torchrun, channels_last and train-speed runs
TINY_TRAIN_FLAGS = ["--image_size", "16", "--num_channels", "8", "--num_res_blocks", "1",
                    "--attention_resolutions", "8", "--diffusion_steps", "20", "--num_workers", "0", "--device", "cpu",
                    "--log_interval", "1", "--save_interval", "2", "--ema_rate", "0.9"]


def train_args(data_dir, out_dir, batch_size, max_steps):
    """segmentation_train.py flags for a tiny SYNTHETIC run."""
    return ["--data_name", "SYNTHETIC", "--data_dir", str(data_dir), "--out_dir", str(out_dir),
            "--batch_size", str(batch_size), "--max_steps", str(max_steps), *TINY_TRAIN_FLAGS]


def read_log(out_dir):
    """A run's log.csv as rows of floats."""
    with open(Path(out_dir) / "log.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def load(out_dir):
    """A run's latest checkpoint."""
    return torch.load(find_latest(out_dir), map_location="cpu", weights_only=True)


# the ADDPM runs' shared flags (conftest's `runs`, and the auxiliary trainers' resume test)
TINY_AUX_FLAGS = ["--image_size", 16, "--num_channels", 8, "--num_workers", 0, "--device", "cpu"]
