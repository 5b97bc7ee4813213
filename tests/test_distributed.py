"""torchrun on CPU: 2 gloo processes started by the tests themselves.

N-process training equals 1-process training with the global batch (loss curve and final weights), resume
under torchrun is exact, sharded sampling writes every image once with the single-process outputs, and an
error on one rank ends the whole job with that error shown.
"""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import load, read_log, torchrun, train_args

from guided_diffusion import distributed
from guided_diffusion.checkpoint import find_latest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SAMPLE = ["--sampler", "dpm_solver++", "--steps", "3", "--num_ensemble", "2", "--batch_size", "2", "--split", "all",
          "--max_images", "7", "--num_workers", "0", "--device", "cpu"]  # 7 images: shards of 4 and 3


@pytest.fixture(scope="module")
def ddp_runs(syn_dir, single_run, tmp_path_factory):
    """A 4-step run with global batch 4: one process with batch 4 (conftest's single_run), and torchrun with 2 x 2."""
    root = tmp_path_factory.mktemp("ddp")
    r = torchrun(str(SCRIPTS / "segmentation_train.py"), *train_args(syn_dir, root / "ddp", 2, 4))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "global batch 4 = 2 x 2 process(es)" in r.stdout
    return {"syn": syn_dir, "single": single_run, "ddp": root / "ddp"}


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_global_batch(ddp_runs):
    single, ddp = read_log(ddp_runs["single"]), read_log(ddp_runs["ddp"])
    assert [r["step"] for r in ddp] == [1, 2, 3, 4] == [r["step"] for r in single]
    for a, b in zip(single, ddp):
        for key in ("loss", "mse", "vb", "cal"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a["step"])
    a, b = load(ddp_runs["single"]), load(ddp_runs["ddp"])
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], atol=1e-5, rtol=1e-4, msg=f"{part} {k}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        for s in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[k][s], sa[k][s], atol=1e-6, rtol=1e-4)
    # only rank 0 wrote: one log row per step, no stray temporary files
    assert not list(ddp_runs["ddp"].glob(".*tmp*"))


@pytest.mark.slow
def test_two_processes_train_the_self_conditioned_decoupled_preset_like_one(syn_dir, tmp_path, run_script):
    """--preset cpu: the decoupled network, whose self-conditioning first pass (every step here) runs inside its one
    DDP forward on the shared image encoding; 2 x 2 processes end on the weights of 1 x 4."""
    preset = ["--preset", "cpu", "--self_condition_rate", "1"]
    run_script("segmentation_train.py", *train_args(syn_dir, tmp_path / "one", 4, 3), *preset)
    r = torchrun(str(SCRIPTS / "segmentation_train.py"), *train_args(syn_dir, tmp_path / "two", 2, 3), *preset)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["config"]["model"]["network"] == "decoupled" and a["config"]["diffusion"]["self_condition"]
    for a_row, b_row in zip(read_log(tmp_path / "one"), read_log(tmp_path / "two")):
        for key in ("loss", "mse", "cal", "mask"):
            assert b_row[key] == pytest.approx(a_row[key], rel=1e-5, abs=1e-6), (key, a_row["step"])
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_compiled_ddp_trains_like_eager_ddp(ddp_runs, tmp_path):
    """--compile under torchrun: torch.compile of the DDP wrapper (DDP's optimizer splits the graph at its
    gradient buckets) gives the eager DDP run's weights; compiled with dynamo's eager backend (see the helper)."""
    helper = str(ROOT / "tests" / "helpers" / "train_compiled_eager.py")
    r = torchrun(helper, *train_args(ddp_runs["syn"], tmp_path, 2, 4), "--compile", "True")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = load(ddp_runs["ddp"]), load(tmp_path)
    assert b["step"] == 4 and b["config"]["train"]["compile"] is True
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.slow
def test_resume_under_torchrun_is_exact(ddp_runs, tmp_path):
    script = str(SCRIPTS / "segmentation_train.py")
    r = torchrun(script, *train_args(ddp_runs["syn"], tmp_path, 2, 2))
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun(script, *train_args(ddp_runs["syn"], tmp_path, 2, 4))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming at step 2" in r.stdout
    a, b = load(ddp_runs["ddp"]), load(tmp_path)
    assert b["step"] == 4
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    timing = ("images_per_s", "data_wait")
    rows = lambda out: [{k: v for k, v in row.items() if k not in timing} for row in read_log(out)]  # noqa: E731
    assert rows(tmp_path) == rows(ddp_runs["ddp"])  # one log, rows 1-4 as in the straight run


def _pngs(folder):
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.mark.slow
def test_sharded_sampling_equals_single_process(single_run, tmp_path, run_script):
    run_script("segmentation_sample.py", "--model_path", single_run, "--out_dir", tmp_path / "one", *SAMPLE)
    r = torchrun(str(SCRIPTS / "segmentation_sample.py"), "--model_path", str(single_run),
                 "--out_dir", str(tmp_path / "two"), *SAMPLE)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "7 images sampled" in r.stdout, r.stdout[-2000:]  # the summary counts every rank's shard
    one, two = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert len([k for k in one if "/" not in k]) == 7 and one.keys() == two.keys()
    for k in one:
        assert one[k].shape == two[k].shape
        assert np.abs(one[k].astype(int) - two[k].astype(int)).max() <= 1, k
    with open(tmp_path / "two" / "manifest.csv", newline="") as fh:
        ids = [row["id"] for row in csv.DictReader(fh)]
    assert sorted(ids) == sorted(k[:-4] for k in one if "/" not in k)  # every image exactly once


CRASH = """
import sys
sys.path.insert(0, {scripts!r})
from guided_diffusion.data import datasets
from guided_diffusion.training import core
real = core.Trainer.train_step

def failing(self, batch):
    if self.di.rank == 1 and self.step == 1:
        raise datasets.DataError("cannot read image broken_0007.png (injected)")
    return real(self, batch)

core.Trainer.train_step = failing
import segmentation_train
from guided_diffusion.cli import run_cli
run_cli(segmentation_train.main)
"""


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_job_with_the_error_shown(syn_dir, tmp_path):
    script = tmp_path / "crash_train.py"
    script.write_text(CRASH.format(scripts=str(SCRIPTS)))
    r = torchrun(str(script), *train_args(syn_dir, tmp_path / "out", 2, 4), timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "error: cannot read image broken_0007.png (injected)" in out  # the failing rank's own line
    assert "stopped because another rank failed" in out  # its peer left its collective in one line
    # torchrun's summary names rank 1 as the root cause, with the message
    root_cause = out.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause and "broken_0007.png" in root_cause
    assert find_latest(tmp_path / "out") is None or load(tmp_path / "out")["step"] < 2


def test_peer_loss_is_recognised():
    assert distributed.is_peer_loss(RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:2742"))
    assert not distributed.is_peer_loss(RuntimeError("CUDA out of memory"))
    assert not distributed.is_peer_loss(ValueError("Connection closed by peer"))


def test_cuda_device_index_under_torchrun_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--device cuda"):
        distributed.setup("cuda:1")


def test_loader_workers_are_capped_at_the_usable_cpus(monkeypatch):
    import os
    from guided_diffusion.distributed import loader_workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    notes = []
    assert loader_workers(4, log=notes.append) == 1
    assert notes == ["--num_workers 4: this process may use 1 CPU(s); loading with 1 worker(s)"]
    assert loader_workers(1, log=notes.append) == 1 and loader_workers(0, log=notes.append) == 0
    assert len(notes) == 1
