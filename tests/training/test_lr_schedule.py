"""--lr_schedule: the rate against its closed form, in the log, over a resume, under torchrun, and bad values."""
import math
import signal

import pytest
import torch
from tiny_runs import CPU, ROOT, read_log, tiny, torchrun, train_args

from guided_diffusion.cli import Interrupted
from guided_diffusion.config import RunConfig
from guided_diffusion.training import core
from guided_diffusion.training.diffusion import DiffusionTrainer


def cosine(lr, p):
    return lr * (1 + math.cos(math.pi * p)) / 2


@pytest.mark.parametrize("schedule,expect", [("constant", lambda p: 2e-3), ("cosine", lambda p: cosine(2e-3, p)),
                                             ("linear", lambda p: 2e-3 * (1 - p))])
def test_the_rate_is_the_closed_form_of_the_steps_or_the_minutes_whichever_ends_the_run(schedule, expect):
    by_steps = RunConfig(lr=2e-3, max_steps=200, lr_schedule=schedule)
    for step in (0, 50, 100, 150, 200):
        assert math.isclose(core.scheduled_lr(by_steps, step, 1e6), expect(step / 200), abs_tol=1e-15)
    by_time = RunConfig(lr=2e-3, max_steps=10 ** 9, max_minutes=2.0, lr_schedule=schedule)
    for seconds in (0.0, 30.0, 60.0, 120.0, 500.0):  # past the budget the rate stays at its end value
        assert math.isclose(core.scheduled_lr(by_time, 0, seconds), expect(min(seconds / 120, 1.0)), abs_tol=1e-15)
    both = RunConfig(lr=2e-3, max_steps=100, max_minutes=2.0, lr_schedule=schedule)
    assert math.isclose(core.scheduled_lr(both, 75, 30.0), expect(0.75), abs_tol=1e-15)  # the steps end it first
    assert math.isclose(core.scheduled_lr(both, 25, 90.0), expect(0.75), abs_tol=1e-15)  # the minutes do


def test_every_step_trains_at_the_scheduled_rate_and_the_log_records_it(tmp_path, syn_dir):
    trainer = DiffusionTrainer(*tiny(tmp_path, syn_dir, max_steps=4, lr=1e-3, lr_schedule="cosine"), CPU)
    used = []
    real_step = trainer.opt.step

    def recording_step(*args, **kwargs):
        used.append([g["lr"] for g in trainer.opt.param_groups])
        return real_step(*args, **kwargs)

    trainer.opt.step = recording_step
    trainer.run()
    want = [cosine(1e-3, s / 4) for s in range(4)]  # step s (0-based) runs at progress s / 4
    assert [set(groups) for groups in used] == [{w} for w in want]
    assert [row["lr"] for row in read_log(tmp_path)] == pytest.approx(want, rel=1e-12)


def test_a_run_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, syn_dir, monkeypatch):
    straight = DiffusionTrainer(*tiny(tmp_path / "a", syn_dir, max_steps=6, lr_schedule="cosine"), CPU)
    straight.run()
    stopped = DiffusionTrainer(*tiny(tmp_path / "b", syn_dir, max_steps=6, lr_schedule="cosine"), CPU)
    real = DiffusionTrainer.train_step

    def signal_after_third(self, batch):
        out = real(self, batch)
        if self.step == 3:
            self._signal = signal.SIGTERM  # what the handler records when the cluster's wall time ends
        return out

    monkeypatch.setattr(DiffusionTrainer, "train_step", signal_after_third)
    with pytest.raises(Interrupted):
        stopped.run()
    monkeypatch.setattr(DiffusionTrainer, "train_step", real)
    resumed = DiffusionTrainer(*tiny(tmp_path / "b", syn_dir, max_steps=6, lr_schedule="cosine"), CPU)
    assert resumed.step == 3
    resumed.run()
    for a, b in ((straight.model.state_dict(), resumed.model.state_dict()), (straight.ema.state, resumed.ema.state)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["lr"] for r in read_log(tmp_path / "b")] == [r["lr"] for r in read_log(tmp_path / "a")]


def test_a_changed_schedule_on_resume_is_noted_and_takes_over_where_the_run_is(tmp_path, syn_dir, capsys):
    DiffusionTrainer(*tiny(tmp_path, syn_dir, max_steps=2, lr=1e-3), CPU).run()
    again = DiffusionTrainer(*tiny(tmp_path, syn_dir, max_steps=4, lr=1e-3, lr_schedule="linear"), CPU)
    assert "--lr_schedule constant -> linear" in capsys.readouterr().out
    assert [g["lr"] for g in again.opt.param_groups] == pytest.approx([1e-3 * (1 - 2 / 4)] * len(again.opt.param_groups))


@pytest.mark.slow
def test_a_bad_schedule_is_a_one_line_error_of_either_trainer_before_anything_is_written(tmp_path, syn_dir, script):
    with pytest.raises(ValueError, match=r"--lr_schedule must be constant, cosine, linear, got 'step'"):
        DiffusionTrainer(*tiny(tmp_path / "run", syn_dir, lr_schedule="step"), CPU)
    assert not (tmp_path / "run").exists()
    r = script("train_preseg_network.py", "--data_name", "SYNTHETIC", "--data_dir", syn_dir, "--out_dir",
               tmp_path / "unet", "--lr_schedule", "step", "--device", "cpu", timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --lr_schedule must be constant, cosine, linear, got 'step'"
    assert not (tmp_path / "unet").exists()


@pytest.mark.slow
def test_under_torchrun_every_rank_trains_at_rank_0s_time_following_rate(syn_dir, tmp_path):
    """Each rank's clock runs at its own speed here (rank r: 1 + r seconds a reading); the ranks still use one
    rate at every step, rank 0's, or DDP's replicas would drift apart."""
    r = torchrun(str(ROOT / "tests" / "helpers" / "train_skewed_clocks.py"), str(tmp_path / "rates"),
                 *train_args(syn_dir, tmp_path / "run", 2, 10 ** 6), "--max_minutes", "0.2", "--lr_schedule", "cosine",
                 "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-4000:]
    rates = [(tmp_path / "rates" / f"rank{k}.txt").read_text().split() for k in (0, 1)]
    assert len(rates[0]) > 2 and rates[0] == rates[1]
    assert float(rates[0][0]) == 1e-3 and float(rates[0][-1]) < 1e-3  # it did fall, by rank 0's clock
