"""Reruns, faults and bad input of training (issue 14): never a mixed or silently wrong run folder."""
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import CPU, read_log, tiny, train_args

from guided_diffusion import cli
from guided_diffusion.checkpoint import find_latest, load_checkpoint
from guided_diffusion.fileio import OutDirLock
from guided_diffusion.training import core
from guided_diffusion.training.diffusion import DiffusionTrainer

ROOT = Path(__file__).resolve().parents[2]


def trainer(tmp_path, syn_dir, **train):
    return DiffusionTrainer(*tiny(tmp_path, syn_dir, **train), CPU)


def steps_of(out_dir):
    return [int(r["step"]) for r in read_log(out_dir)]


def test_resume_none_into_a_run_folder_stops_and_overwrite_replaces_the_old_run(tmp_path, syn_dir):
    trainer(tmp_path, syn_dir, max_steps=6, keep_checkpoints=2).run()
    with pytest.raises(ValueError, match=r"already holds a run up to step 6 \(model_0000006.pt\); --resume auto "
                                         r"continues it, --overwrite True replaces it"):
        trainer(tmp_path, syn_dir, max_steps=2, resume="none")
    assert sorted(p.name for p in tmp_path.glob("model_*.pt")) == ["model_0000004.pt", "model_0000006.pt"]

    path = trainer(tmp_path, syn_dir, max_steps=2, resume="none", overwrite=True, keep_checkpoints=2).run()
    assert sorted(p.name for p in tmp_path.glob("model_*.pt")) == ["model_0000002.pt"]  # none of the old run's
    assert find_latest(tmp_path) == path and (tmp_path / "latest").read_text().strip() == path.name
    assert steps_of(tmp_path) == [1, 2]  # the log is the new run's alone


def test_resume_from_an_older_checkpoint_needs_overwrite_and_keeps_one_log_row_per_step(tmp_path, syn_dir):
    trainer(tmp_path, syn_dir, max_steps=6, keep_checkpoints=0).run()
    older = tmp_path / "model_0000002.pt"
    with pytest.raises(ValueError, match="checkpoints after the resumed step 2 .*--overwrite True"):
        trainer(tmp_path, syn_dir, max_steps=6, resume=str(older))
    trainer(tmp_path, syn_dir, max_steps=6, resume=str(older), overwrite=True).run()
    assert steps_of(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, syn_dir, capsys):
    trainer(tmp_path, syn_dir, max_steps=4, keep_checkpoints=0).run()
    newest = tmp_path / "model_0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short / a full disk
    assert load_checkpoint(tmp_path)["step"] == 2
    assert "model_0000004.pt: not a readable checkpoint" in capsys.readouterr().err
    again = trainer(tmp_path, syn_dir, max_steps=4, keep_checkpoints=0)
    assert again.step == 2 and (tmp_path / "model_0000004.pt.corrupt").is_file()
    again.run()
    assert load_checkpoint(tmp_path)["step"] == 4 and steps_of(tmp_path) == [1, 2, 3, 4]


def test_changed_lr_and_weight_decay_reach_the_optimizer_on_resume(tmp_path, syn_dir):
    trainer(tmp_path, syn_dir, max_steps=2, lr=1e-4, weight_decay=0.0).run()
    again = trainer(tmp_path, syn_dir, max_steps=4, lr=5e-4, weight_decay=0.01)
    assert [g["lr"] for g in again.opt.param_groups] == [5e-4] * len(again.opt.param_groups)
    decays = {g["weight_decay"] for g in again.opt.param_groups}
    assert 0.01 in decays and decays <= {0.01, 0.0}  # the FF-Parser group stays undecayed
    again.run()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 5e-4 == ckpt["config"]["train"]["lr"]
    assert read_log(tmp_path)[-1]["lr"] == 5e-4


def test_stale_temp_files_are_removed_and_a_second_run_is_locked_out(tmp_path, syn_dir):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".tmp-abcdefghijklmnop.part"
    stale.write_bytes(b"x" * 100)
    first = trainer(tmp_path, syn_dir, max_steps=2)
    assert not stale.exists()
    with pytest.raises(ValueError, match="is being written by another run"):
        trainer(tmp_path, syn_dir, max_steps=2)
    first.run()  # finishing releases the lock
    trainer(tmp_path, syn_dir, max_steps=4).run()


def test_lock_is_held_against_another_process(tmp_path):
    lock = OutDirLock(tmp_path / "run").acquire()
    code = ("import sys; from guided_diffusion.fileio import OutDirLock\n"
            "try:\n OutDirLock(sys.argv[1]).acquire()\nexcept ValueError as e:\n print(e); sys.exit(3)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                         text=True)
    lock.release()
    assert out.returncode == 3 and f"(pid {os.getpid()})" in out.stdout


def test_a_failure_before_the_first_checkpoint_leaves_no_split_behind(tmp_path, syn_dir, monkeypatch):
    def broken(self):
        raise RuntimeError("network cannot be built")

    monkeypatch.setattr(DiffusionTrainer, "build_network", broken)
    with pytest.raises(RuntimeError):
        trainer(tmp_path / "run", syn_dir)
    assert not (tmp_path / "run").exists()
    user_split = tmp_path / "mine" / "split.json"  # a split the user placed is theirs: kept
    monkeypatch.undo()
    trainer(tmp_path / "made", syn_dir, max_steps=1).run()
    user_split.parent.mkdir()
    user_split.write_bytes((tmp_path / "made" / "split.json").read_bytes())
    monkeypatch.setattr(DiffusionTrainer, "build_network", broken)
    with pytest.raises(RuntimeError):
        trainer(user_split.parent, syn_dir)
    assert user_split.is_file()


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, syn_dir, monkeypatch):
    run = trainer(tmp_path, syn_dir, max_steps=50, save_interval=1000)
    step = run.train_step

    def step_then_signal(batch):
        out = step(batch)
        if run.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(run, "train_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Interrupted, match="stopped by SIGTERM at step 3; saved .*model_0000003.pt") as info:
        run.run()
    assert info.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert load_checkpoint(tmp_path)["step"] == 3
    assert trainer(tmp_path, syn_dir, max_steps=5).step == 3


@pytest.mark.parametrize("flags, needle", [
    (dict(attention_resolutions="7"), "--attention_resolutions 7: 7 is not a feature-map size of a 16 px network"),
    (dict(diffusion_steps=1), "--diffusion_steps must be >= 2"),
])
def test_impossible_network_flags_are_one_line_errors_before_anything_is_written(tmp_path, syn_dir, flags, needle):
    from dataclasses import replace

    mc, dc, data, tc = tiny(tmp_path / "run", syn_dir)
    mc = replace(mc, **{k: v for k, v in flags.items() if hasattr(mc, k)})
    dc = replace(dc, **{k: v for k, v in flags.items() if hasattr(dc, k)})
    with pytest.raises(ValueError, match=needle):
        DiffusionTrainer(mc, dc, data, tc, CPU)
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file_is_one_line(tmp_path, syn_dir):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(ValueError, match="--out_dir .*afile is a file, not a folder"):
        trainer(target, syn_dir)


@pytest.mark.parametrize("exc, needle", [
    (PermissionError(errno.EACCES, "Permission denied", "/ro/run/split.json"),
     "error: /ro/run/split.json: Permission denied; check the path"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/model.pt"), "No space left on device; free space"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 320006400000 bytes"),
     "error: out of memory: lower --batch_size or --image_size"),
])
def test_environment_errors_are_one_line_with_exit_code_2(exc, needle, capsys):
    def main():
        raise exc

    with pytest.raises(SystemExit) as out:
        cli.run_cli(main)
    err = capsys.readouterr().err
    assert out.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_a_bug_still_shows_its_traceback():
    def main():
        raise RuntimeError("index out of range in a kernel")

    with pytest.raises(RuntimeError, match="kernel"):
        cli.run_cli(main)


class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from guided_diffusion.data.datasets import DataError

        raise DataError("/data/masks/case_7.png: cannot read the image (truncated file)")


def test_an_error_inside_a_dataloader_worker_is_its_own_one_line(capsys):
    def main():
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))

    with pytest.raises(SystemExit):
        cli.run_cli(main)
    err = capsys.readouterr().err
    assert err == "error: /data/masks/case_7.png: cannot read the image (truncated file)\n"


@pytest.mark.slow
def test_training_piped_to_a_file_writes_a_few_kb_and_still_shows_progress(tmp_path, syn_dir):
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "scripts/segmentation_train.py",
                        *train_args(syn_dir, tmp_path / "run", 2, 300), "--save_interval", "100",
                        "--log_interval", "10"], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "SEG_PROGRESS_SECONDS": "2"})
    text = log.read_text()
    assert "\r" not in text and len(text) < 4096, text[-2000:]
    assert "train diffusion: 300/300 step (100%)" in text and "img/s=" in text
    assert len(read_log(tmp_path / "run")) == 30  # the CSV log is unchanged: one row per --log_interval


def test_train_help_shows_each_default_once():
    from guided_diffusion.config import train_parser

    for action in train_parser()._actions:
        if action.help:
            assert "(default: )" not in action.help and action.help.count("(default:") <= 1, action.help


@pytest.mark.parametrize("flag", ["eta", "td"])
def test_negative_ddim_knobs_are_one_line_errors(flag):
    from guided_diffusion.sampling.pipeline import SampleConfig, _validate

    with pytest.raises(ValueError, match=f"--{flag} must be >= 0, got -1"):
        _validate(SampleConfig(model_path="run", **{flag: -1.0}))
