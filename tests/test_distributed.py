"""torchrun on CPU: 2 gloo processes started by the tests themselves.

N-process training equals 1-process training with the global batch (loss curve and final weights), resume
under torchrun is exact, sharded sampling writes every image once with the single-process outputs, and an
error on one rank ends the whole job with that error shown.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import distributed
from guided_diffusion.reports import train_speed
from guided_diffusion.checkpoint import find_latest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

TINY = ["--image_size", "16", "--num_channels", "8", "--num_res_blocks", "1", "--attention_resolutions", "8",
        "--diffusion_steps", "20", "--num_workers", "0", "--device", "cpu", "--log_interval", "1",
        "--save_interval", "2", "--ema_rate", "0.9"]
SAMPLE = ["--sampler", "dpm_solver++", "--steps", "3", "--num_ensemble", "2", "--batch_size", "2", "--split", "all",
          "--max_images", "7", "--num_workers", "0", "--device", "cpu"]  # 7 images: shards of 4 and 3


def torchrun(script: str, *args: str, nproc: int = 2, extra_env: dict | None = None, timeout: int = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})}
    env.pop("SEG_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def train_args(data_dir, out_dir, batch_size, max_steps):
    return ["--data_name", "SYNTHETIC", "--data_dir", str(data_dir), "--out_dir", str(out_dir),
            "--batch_size", str(batch_size), "--max_steps", str(max_steps), *TINY]


def read_log(out_dir):
    with open(Path(out_dir) / "log.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def load(out_dir):
    return torch.load(find_latest(out_dir), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step run with global batch 4: one process with batch 4, and torchrun with 2 x 2."""
    import segmentation_train
    from guided_diffusion.data.datasets import make_synthetic

    root = tmp_path_factory.mktemp("dist")
    syn = make_synthetic(root / "syn", num_images=24)
    segmentation_train.main(train_args(syn, root / "single", 4, 4))
    r = torchrun(str(SCRIPTS / "segmentation_train.py"), *train_args(syn, root / "ddp", 2, 4))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "global batch 4 = 2 x 2 process(es)" in r.stdout
    return {"syn": syn, "single": root / "single", "ddp": root / "ddp", "root": root}


def test_two_processes_train_like_one_with_the_global_batch(runs):
    single, ddp = read_log(runs["single"]), read_log(runs["ddp"])
    assert [r["step"] for r in ddp] == [1, 2, 3, 4] == [r["step"] for r in single]
    for a, b in zip(single, ddp):
        for key in ("loss", "mse", "vb", "cal"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a["step"])
    a, b = load(runs["single"]), load(runs["ddp"])
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], atol=1e-5, rtol=1e-4, msg=f"{part} {k}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        for s in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[k][s], sa[k][s], atol=1e-6, rtol=1e-4)
    # only rank 0 wrote: one log row per step, no stray temporary files
    assert not list(runs["ddp"].glob(".*tmp*"))


def test_compiled_ddp_trains_like_eager_ddp(runs, tmp_path):
    """--compile under torchrun: torch.compile of the DDP wrapper (DDP's optimizer splits the graph at its
    gradient buckets) gives the eager DDP run's weights; compiled with dynamo's eager backend (see the helper)."""
    helper = str(ROOT / "tests" / "helpers" / "train_compiled_eager.py")
    r = torchrun(helper, *train_args(runs["syn"], tmp_path, 2, 4), "--compile", "True")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = load(runs["ddp"]), load(tmp_path)
    assert b["step"] == 4 and b["config"]["train"]["compile"] is True
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=1e-5, msg=k)


def test_resume_under_torchrun_is_exact(runs, tmp_path):
    script = str(SCRIPTS / "segmentation_train.py")
    r = torchrun(script, *train_args(runs["syn"], tmp_path, 2, 2))
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun(script, *train_args(runs["syn"], tmp_path, 2, 4))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming at step 2" in r.stdout
    a, b = load(runs["ddp"]), load(tmp_path)
    assert b["step"] == 4
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    timing = ("images_per_s", "data_wait")
    rows = lambda out: [{k: v for k, v in row.items() if k not in timing} for row in read_log(out)]  # noqa: E731
    assert rows(tmp_path) == rows(runs["ddp"])  # one log, rows 1-4 as in the straight run


def _pngs(folder):
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_sharded_sampling_equals_single_process(runs, tmp_path):
    import segmentation_sample

    segmentation_sample.main(["--model_path", str(runs["single"]), "--out_dir", str(tmp_path / "one"), *SAMPLE])
    r = torchrun(str(SCRIPTS / "segmentation_sample.py"), "--model_path", str(runs["single"]),
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


def test_an_error_on_one_rank_ends_the_job_with_the_error_shown(runs, tmp_path):
    script = tmp_path / "crash_train.py"
    script.write_text(CRASH.format(scripts=str(SCRIPTS)))
    r = torchrun(str(script), *train_args(runs["syn"], tmp_path / "out", 2, 4), timeout=120)
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


def test_benchmark_train_script_on_cpu(runs, tmp_path):
    import benchmark_train

    benchmark_train.main(["--data_dir", str(runs["syn"]), "--image_size", "16", "--num_channels", "8",
                          "--num_res_blocks", "1", "--attention_resolutions", "8", "--diffusion_steps", "20",
                          "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--warmup", "1",
                          "--steps", "2", "--variants", "fp32,channels_last,bf16,tf32", "--out_dir", str(tmp_path),
                          "--data", "memory,loader,loader_only"])
    with open(tmp_path / "benchmark_train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    alone, rows = rows[:2], rows[2:]
    assert [(r["variant"], r["data"]) for r in alone] == [("preload False", "loader_only"),
                                                           ("preload True", "loader_only")]
    assert all(float(r["images_per_s"]) > 0 and r["data_wait"] == "" for r in alone)
    assert float(alone[0]["speedup"]) == 1.0
    assert float(alone[1]["speedup"]) == pytest.approx(float(alone[1]["images_per_s"]) / float(alone[0]["images_per_s"]))
    assert [(r["variant"], r["data"]) for r in rows] == [
        (v, d) for v in ("fp32", "channels_last", "bf16", "tf32") for d in ("memory", "loader")]
    for r in rows[:6]:
        assert float(r["images_per_s"]) > 0 and float(r["peak_mem_mib"]) > 0 and r["note"] == ""
        assert 0.0 <= float(r["data_wait"]) < 1.0
    assert float(rows[0]["data_wait"]) == 0.0 and float(rows[0]["speedup"]) == 1.0
    assert rows[6]["note"] == "tf32: CUDA only" and rows[6]["images_per_s"] == ""
    assert "| variant | data | images/s |" in (tmp_path / "benchmark_train.md").read_text()


def test_variant_parsing():
    assert train_speed.parse_variants("fp32, bf16+channels_last") == [frozenset(), {"bf16", "channels_last"}]
    assert train_speed.variant_name(frozenset({"compile", "bf16"})) == "bf16+compile"
    with pytest.raises(ValueError, match="unknown option 'fast'"):
        train_speed.parse_variants("fp32,fast")
    with pytest.raises(ValueError, match="both bf16 and fp16"):
        train_speed.parse_variants("bf16+fp16")
    assert train_speed.parse_data_modes("loader_only, memory") == ("loader_only", "memory")
    with pytest.raises(ValueError, match="--data must be a comma-separated list of memory, loader, loader_only"):
        train_speed.parse_data_modes("disk")


def test_channels_last_trains_like_the_default_layout(runs, tmp_path):
    import segmentation_train

    segmentation_train.main(train_args(runs["syn"], tmp_path, 4, 4) + ["--channels_last", "True"])
    a, b = read_log(runs["single"]), read_log(tmp_path)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    wa, wb = load(runs["single"])["model"], load(tmp_path)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-3)
    assert 0.0 <= b[-1]["data_wait"] < 1.0
