"""Fixtures shared across the suite: script runners, the tiny synthetic set, and the small trained runs that
several test modules read (each built once per session)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
for _path in (ROOT, HELPERS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
pytest.register_assert_rewrite("image_files")  # its checks report like a test's own asserts

from tiny_runs import TINY_AUX_FLAGS, train_args  # noqa: E402

SCRIPTS = ROOT / "scripts"


# ----- running scripts/*.py --------------------------------------------------------------------------
def _load_script(name):
    """scripts/<name> as a fresh module, to call its main() in-process (faster than a subprocess)."""
    spec = importlib.util.spec_from_file_location(name[:-3], SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(name, *args):
    """main() of scripts/<name> in-process, with every argument as a string."""
    return _load_script(name).main([str(a) for a in args])


def _script(name, *args, timeout=600):
    """scripts/<name> in a subprocess, run as users do from the repository root."""
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def load_script():
    """load_script(name): scripts/<name> imported as a fresh module."""
    return _load_script


@pytest.fixture(scope="session")
def run_script():
    """run_script(name, *args): scripts/<name>'s main() in this process."""
    return _run_script


@pytest.fixture(scope="session")
def script():
    """script(name, *args, timeout=600): scripts/<name> in a subprocess; returns the CompletedProcess."""
    return _script


# ----- torch.compile ---------------------------------------------------------------------------------
@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's 'eager' backend: the same graph capture (and graph breaks) as a real compile,
    without inductor's C++ build, which takes minutes on a CI CPU. Yields (what was compiled, dynamo's counters)."""
    import torch
    from torch._dynamo.utils import counters

    real, compiled = torch.compile, []

    def recording(fn, **kw):
        compiled.append(fn)
        return real(fn, backend="eager")

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", recording)
    yield compiled, counters
    torch._dynamo.reset()


# ----- data and trained runs, built once per session (tests only read them) ------------------------------
@pytest.fixture(scope="session")
def syn_dir(tmp_path_factory):
    """The synthetic set with 24 images (the training, torchrun and train-speed tests read it)."""
    from guided_diffusion.data.datasets import make_synthetic
    d = tmp_path_factory.mktemp("syn")
    make_synthetic(d, num_images=24)
    return d


@pytest.fixture(scope="session")
def single_run(syn_dir, tmp_path_factory, run_script):
    """A 4-step single-process run with batch 4 (tiny_runs.TINY_TRAIN_FLAGS): the reference of the torchrun
    and channels_last training tests, and the checkpoint the sharded-sampling test samples from."""
    out = tmp_path_factory.mktemp("dist") / "single"
    run_script("segmentation_train.py", *train_args(syn_dir, out, 4, 4))
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory, run_script):
    """ADDPM's three checkpoints on one split: a diffusion model (diff/), a pre-segmentation network (preseg/)
    and a denoising network (den/), trained a few steps through the scripts on a 20-image synthetic set (data/)."""
    from guided_diffusion.data.datasets import make_synthetic
    base = tmp_path_factory.mktemp("addpm")
    make_synthetic(base / "data", num_images=20)
    run_script("segmentation_train.py", "--data_name", "SYNTHETIC", "--data_dir", base / "data", "--out_dir",
               base / "diff", "--num_res_blocks", 1, "--diffusion_steps", 40, "--noise_schedule", "cosine",
               "--learn_sigma", "False", "--batch_size", 4, "--max_steps", 2, *TINY_AUX_FLAGS)
    # the seed's flags (--batch_size 12 --lr 0.001 [--T]) with the diffusion run's split, data and schedule
    run_script("train_preseg_network.py", "--batch_size", 12, "--lr", 0.001, "--split_from", base / "diff",
               "--out_dir", base / "preseg", "--max_steps", 2, *TINY_AUX_FLAGS)
    run_script("train_denoising_network.py", "--batch_size", 12, "--lr", 0.001, "--T", 10, "--split_from",
               base / "diff", "--out_dir", base / "den", "--max_steps", 2, *TINY_AUX_FLAGS)
    return base


@pytest.fixture(scope="session")
def trained(tmp_path_factory, script):
    """A 2-step diffusion model (run/) trained by segmentation_train.py in a subprocess on a 20-image synthetic
    set (data/); the sampling and benchmark tests write their outputs beside it."""
    from guided_diffusion.data.datasets import make_synthetic
    base = tmp_path_factory.mktemp("run")
    make_synthetic(base / "data", num_images=20)
    r = script("segmentation_train.py", "--data_name", "SYNTHETIC", "--data_dir", base / "data", "--out_dir",
               base / "run", "--image_size", 16, "--num_channels", 8, "--num_res_blocks", 1,
               "--diffusion_steps", 40, "--batch_size", 4, "--max_steps", 2, "--num_workers", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return base
